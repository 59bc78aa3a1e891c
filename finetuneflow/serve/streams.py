"""Token streaming in the server: what the model thread hands the requests of one engine batch.

`BatchSink` is the engine's TokenSink (engine/streaming.py) for one micro-batch: row k of the
batch is dialogue `index` of request `job`. A streaming request (one with an event queue) gets
each piece of its summary as a `Delta` event, stamped on the model thread when it was made (the
time-to-first-token and inter-token metrics read the stamps); a request whose client hung up, or
whose deadline passed, stops its row (the other rows of the batch go on).

`StopCut` is the OpenAI stream's view of one choice: `stop` strings cut the text, so a piece
that might be the start of a stop string is held back until the next piece settles it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from finetuneflow.engine.streaming import TokenSink


@dataclass
class Delta:
    """The next piece of dialogue `dialogue`'s summary (or, with `part`, of one of its windows'
    partial summaries: a long dialogue's part, streamed as it is generated)."""
    dialogue: int
    text: str
    at: float = field(default_factory=time.monotonic)   # when the model thread made it
    final: bool = False                                  # (events are Parts or Deltas; neither is final)
    part: object = None                                  # the long_input Part this piece belongs to


class PartsSink(TokenSink):
    """The engine's sink for one engine call of a long job: text k becomes `parts[k]` (dialogue
    numbers already the request's: `dialogues[k]`); a final part streams as the summary itself."""

    def __init__(self, job, parts: list, dialogues: list[int]):
        self.job, self.parts, self.dialogues = job, parts, dialogues

    def wants(self, row: int) -> bool:
        return self.job.events is not None

    def text(self, row: int, piece: str) -> None:
        if not self.job.cancelled:
            part = self.parts[row]
            self.job.stream(Delta(self.dialogues[row], piece, part=None if part.final else part))

    def stopped(self, row: int) -> bool:
        return self.job.stop_reason() is not None


class BatchSink(TokenSink):
    """The engine's sink for one micro-batch: `members[k]` = (job, dialogue index) of row k. A
    batch that runs again (out-of-memory halving, or a failed shared batch rerun per request)
    regenerates the text a client already has: only what goes past it is sent (`job.sent`)."""

    def __init__(self, members: list[tuple[object, int]]):
        self.members = members
        self.seen = [""] * len(members)       # what this engine call made for each row

    def wants(self, row: int) -> bool:
        job, _ = self.members[row]
        return job.events is not None

    def text(self, row: int, piece: str) -> None:
        job, index = self.members[row]
        if job.cancelled:
            return
        seen = self.seen[row] = self.seen[row] + piece
        already = job.sent.get(index, "")
        new = seen[len(already):] if seen.startswith(already) else "" if already.startswith(seen) else piece
        if new:
            job.sent[index] = already + new
            job.stream(Delta(index, new))

    def stopped(self, row: int) -> bool:
        job, _ = self.members[row]
        return job.stop_reason() is not None


class StopCut:
    """One OpenAI choice's streamed text with its stop strings applied (see the module doc)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.seen = ""          # every piece so far
        self.sent = ""          # what went to the client
        self.done = False       # a stop string was found: nothing more is sent

    def push(self, piece: str) -> str:
        """The text that can be sent after `piece`."""
        if self.done:
            return ""
        self.seen += piece
        hits = [self.seen.find(s) for s in self.stops if s in self.seen]
        if hits:
            self.done = True
            return self._send(self.seen[:min(hits)])
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.seen.endswith(s[:n])), default=0)
        return self._send(self.seen[:len(self.seen) - hold])

    def finish(self, final: str) -> str:
        """The rest of the choice's final text (already cut at its stop string)."""
        if not final.startswith(self.sent):
            return ""
        return self._send(final)

    def _send(self, text: str) -> str:
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += piece
        return piece
