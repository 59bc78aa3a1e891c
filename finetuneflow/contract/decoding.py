"""Decoding settings: what every stage that generates shares, and what the run record carries."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

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
