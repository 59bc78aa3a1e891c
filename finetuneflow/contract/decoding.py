"""Decoding settings: declared once here, resolved once per model, handed typed to every backend.

* `GenerationSettings`: the five decoding settings a stage (or a request) asks for; `None` = not
  set. Every generating stage declares them in its settings block under the UPPER_CASE names
  (`SPECS`); a library settings object that carries them inherits `DecodingFields`, which is made
  from GenerationSettings' own fields, so the five exist once. A stage fills what it left at None
  from the upstream run record (`RunRecord.inherit_into`), so training's decoding carries to
  evaluation, export and serving.
* `Sampling`: temperature / top_p / seed, when a caller (the server) asks for sampled decoding.
* `ResolvedGeneration`: what generation really uses: the request over the model family's
  defaults (model/family.py `Family.resolve_generation`, the one place defaults live), with the
  limits every backend needs already worked out (`max_new`, `min_new`), so no backend has a
  fallback of its own. The engine hands it to `Backend.generate_batch`; `as_record()` is what run
  records and responses carry.
* `LongInput`: LONG_INPUT (truncate | chunk | chunk_join | error), parsed once.

A new decoding method (e.g. `decoding = greedy | beam | mbr`) or sampling knob is a field here,
its default in family.py, and `Capabilities` on the backends that run it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass

from finetuneflow.contract.errors import UserError

# The settings block every generating stage declares (same names, same specs).
SPECS = {"NUM_BEAMS": "int >= 1 | None", "MAX_NEW_TOKENS": "int >= 1 | None", "MIN_NEW_TOKENS": "int >= 0 | None",
         "NO_REPEAT_NGRAM_SIZE": "int >= 0 | None", "LENGTH_PENALTY": "float | None"}


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; `None` keeps the model's own generation config (or the causal defaults)."""
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None

    def __post_init__(self):
        if self.min_new_tokens is not None and self.max_new_tokens is not None \
                and self.min_new_tokens > self.max_new_tokens:
            raise UserError(f"MIN_NEW_TOKENS={self.min_new_tokens} is more than MAX_NEW_TOKENS={self.max_new_tokens}; "
                            f"lower MIN_NEW_TOKENS or raise MAX_NEW_TOKENS")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The stage settings (UPPER_CASE) these fields come from."""
        return tuple(f.name.upper() for f in fields(cls))

    @classmethod
    def from_config(cls, cfg: dict) -> "GenerationSettings":
        return cls(**{f.name: cfg.get(f.name.upper()) for f in fields(cls)})

    @classmethod
    def from_record(cls, data: dict | None) -> "GenerationSettings":
        data = data or {}
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def overrides(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def as_dict(self) -> dict:
        return asdict(self)


def _generation(self) -> GenerationSettings:
    """The decoding settings this settings object carries."""
    return GenerationSettings(**{f.name: getattr(self, f.name) for f in fields(GenerationSettings)})


# The five fields for a settings dataclass (`@dataclass(frozen=True) class X(FromConfig, DecodingFields)`):
# keyword-only, so they mix with a subclass's required fields; `.generation()` gives them typed.
DecodingFields = make_dataclass("DecodingFields",
                                [(f.name, f.type, field(default=None, kw_only=True))
                                 for f in fields(GenerationSettings)],
                                frozen=True, namespace={"generation": _generation})


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding (one beam): the server's temperature > 0, seeded so it repeats."""
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> "Sampling | None":
        """None (deterministic decoding) for no data; unknown keys are a programming error."""
        return cls(**data) if data else None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ResolvedGeneration:
    """The decoding one generation call really uses (see the module doc); made by
    `Family.resolve_generation`, never by hand."""
    num_beams: int
    max_new_tokens: int | None          # asked for, or the family's default (seq2seq: the model's own, maybe None)
    min_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    max_length: int | None = None       # a seq2seq model's own limits (they count the decoder start token);
    min_length: int | None = None       # None once max_new_tokens / min_new_tokens are asked for
    max_new: int = 1                    # new tokens a backend generates at most (resolved by the family)
    min_new: int = 0                    # ... at least (stop tokens are held back until then); <= max_new
    sampling: Sampling | None = None    # None: deterministic (greedy or beam search)

    @property
    def do_sample(self) -> bool:
        return self.sampling is not None

    def settings(self) -> GenerationSettings:
        """The five settings as resolved (what a run record passes on to the next stage)."""
        return GenerationSettings(self.num_beams, self.max_new_tokens, self.min_new_tokens,
                                  self.no_repeat_ngram_size, self.length_penalty)

    def as_record(self) -> dict:
        """The effective settings as records and responses show them."""
        record = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        for key in ("max_length", "min_length", "min_new_tokens", "no_repeat_ngram_size", "length_penalty"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        record["do_sample"] = self.do_sample
        if self.sampling is not None:
            record.update(self.sampling.as_dict())
        return record


class LongInput(str):
    """LONG_INPUT, parsed once: what happens to a dialogue over the model's input limit.
    truncate: cut it; error: refuse it; chunk: summarize windows, then their joined summaries
    (map-reduce); chunk_join: the window summaries, joined in order, are the summary."""
    MODES = ("truncate", "chunk", "chunk_join", "error")

    @classmethod
    def parse(cls, value) -> "LongInput":
        if isinstance(value, LongInput):
            return value
        if value not in cls.MODES:
            raise UserError(f"LONG_INPUT={value!r} is not one of {', '.join(cls.MODES)}")
        return cls(value)

    @property
    def windows(self) -> bool:
        """Long dialogues are summarized in windows (chunk, chunk_join)."""
        return self in ("chunk", "chunk_join")

    @property
    def joins(self) -> bool:
        """The window summaries are joined as they are (chunk_join), not summarized again."""
        return self == "chunk_join"
