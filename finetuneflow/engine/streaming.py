"""Token streaming: a summary's text as its tokens are chosen, in pieces whose concatenation is
exactly the summary the engine returns.

The engine's summary of a row is `tokenizer.decode(new ids, skip_special_tokens=True).strip()`.
`TextStream` defines the stream so that it adds up to that text: after every token it decodes
the row's ids so far, drops what is not settled yet (a character split across tokens, which a
byte-level tokenizer decodes as U+FFFD; whitespace at either end, which the final strip may
remove) and hands out the part past what it already gave. `finish(final)` hands out the rest of
the final text. A tokenizer whose decode of a longer id list changes text it already gave (it
should not: byte-level BPE and SentencePiece do not) is caught there: the rest is then withheld
from the stream until the end and logged (`diverged`).

A caller that streams passes the engine a `TokenSink`: `text(row, piece)` hears each piece of row
`row` (an index into the caller's dialogues), `stopped(row)` says whether the row's consumer is
gone (its client hung up), so the backend stops generating it; `wants(row)` whether that row's
text is wanted at all (no decoding per token for a row nobody streams).
"""
from __future__ import annotations

import logging

log = logging.getLogger("finetuneflow.engine")
REPLACEMENT = "\ufffd"


class TokenSink:
    """What a streaming caller hears from the engine (see the module doc); the defaults do nothing."""

    def wants(self, row: int) -> bool:
        return False

    def text(self, row: int, piece: str) -> None:
        """The next piece of row `row`'s summary (never empty)."""

    def stopped(self, row: int) -> bool:
        """True when nobody waits for row `row` any more: its generation may stop."""
        return False


class TextStream:
    """One row's incremental detokenization (UTF-8 safe; see the module doc)."""

    def __init__(self, tokenizer, stops: set[int] = frozenset()):
        self.tokenizer, self.stops = tokenizer, set(stops)
        self.ids: list[int] = []
        self.sent = ""            # what the stream has handed out so far
        self.ended = False        # a stop token came: later tokens (padding) are not the summary's
        self.diverged = False
        self.tokens = 0           # tokens pushed (the summary's, not the stop token)

    def settled(self) -> str:
        """The text so far that no later token can change under the final strip."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        text = text.rstrip(REPLACEMENT)          # an incomplete UTF-8 character: wait for its other bytes
        return text.rstrip()                     # trailing whitespace may be stripped at the end

    def push(self, token: int) -> str:
        """The next piece after `token` ("" while nothing new is settled)."""
        if self.ended or token in self.stops:
            self.ended = True
            return ""
        self.ids.append(int(token))
        self.tokens += 1
        if self.diverged:
            return ""
        text = self.settled()
        if not text.startswith(self.sent):
            self.diverged = True
            log.warning("the tokenizer's decode changed text already streamed; the rest comes at the end")
            return ""
        piece = text[len(self.sent):]
        self.sent = text
        return piece

    def finish(self, final: str) -> str:
        """The rest of the row's final text (the engine's summary)."""
        if not final.startswith(self.sent):
            log.warning("streamed text is not a prefix of the final summary (%r vs %r)", self.sent, final)
            return ""
        piece = final[len(self.sent):]
        self.sent = final
        return piece
