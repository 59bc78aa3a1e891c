"""One side of the deploy gate's comparison: the summaries of the held-out rows by one loaded model
through the engine (ship/deploy_gate.py), with what the verdict needs from them: the finish reason of
each summary ("stop": an end token; "length": the token limit), which inputs were cut, and the
shipped unsupported-mention check of each summary against its dialogue (computed once, on demand).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from finetuneflow.ship.gate_rows import Decoding


@dataclass
class Side:
    summaries: list[str]
    timing: dict
    how: str
    decoding: dict
    finish_reasons: list[str] | None = None     # "stop" | "length" per summary (None: unknown)
    finish_how: str = "the engine's finish reasons"
    truncated: list[bool] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    _unsupported: list | None = None

    def unsupported(self, rows: list[dict]) -> list[bool | None]:
        """Per summary: an unsupported mention (the shipped faithfulness check), computed once."""
        if self._unsupported is None:
            from finetuneflow.ship.gate_verdict import unsupported_flags
            self._unsupported = unsupported_flags(self.summaries, [r["dialogue"] for r in rows])
        return self._unsupported

    def runaway(self) -> list[bool] | None:
        return None if self.finish_reasons is None else [r == "length" for r in self.finish_reasons]


def run_side(loaded, rows: list[dict], decoding: Decoding, batch_size: int, how: str, warm_up: bool = True) -> Side:
    """Summaries of the rows through the engine, after one warm-up batch (first-call allocations
    and a runtime's context creation are not throughput)."""
    from finetuneflow.engine.long_input import summarize_long
    from finetuneflow.quality.mbr import choose_rows
    dialogues, ids = [r["dialogue"] for r in rows], [r["id"] for r in rows]
    if warm_up:
        summarize_long(loaded, dialogues[:batch_size], decoding.generation, batch_size, decoding.max_input_length,
                       decoding.instruction or "", decoding.long_input, progress=False,
                       chooser=choose_rows)   # warm-up: the first batch
    result = summarize_long(loaded, dialogues, decoding.generation, batch_size, decoding.max_input_length,
                            decoding.instruction or "", decoding.long_input, progress=False, ids=ids,
                            chooser=choose_rows)
    return Side(result.summaries, result.timing(), how, {**decoding.as_dict(), "backend": loaded.backend.name},
                finish_reasons=list(result.finish_reasons) or None, truncated=list(result.truncated),
                windows=list(result.windows))


def summaries_alone(loaded, rows: list[dict], decoding: Decoding) -> list[str]:
    """Each row decoded on its own (batch size 1): the in-process run's batch-order noise is where
    these differ from the batched summaries."""
    return [run_side(loaded, [row], decoding, 1, "alone", warm_up=False).summaries[0] for row in rows]


def estimated_finish(tokenizer, summaries: list[str], max_new: int) -> list[str]:
    """Finish reasons of summaries whose run recorded none (an evaluation's CSV): "length" when the
    summary re-encodes to at least `max_new` tokens (an estimate: re-encoding can merge tokens)."""
    from finetuneflow.model.prompts import text_ids
    return ["length" if len(ids) >= max_new else "stop" for ids in text_ids(tokenizer, summaries)] if summaries \
        else []
