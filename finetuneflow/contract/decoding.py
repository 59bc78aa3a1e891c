"""Decoding settings: declared once here, resolved once per model, handed typed to every backend.

* `GenerationSettings`: the decoding settings a stage (or a request) asks for; `None` = not
  set. Every generating stage declares them in its settings block under the UPPER_CASE names
  (`SPECS`); a library settings object that carries them inherits `DecodingFields`, which is made
  from GenerationSettings' own fields, so they exist once. A stage fills what it left at None
  from the upstream run record (`RunRecord.inherit_into`), so training's decoding carries to
  evaluation, export and serving.
* `DECODING` (greedy | beam | mbr; None: beam search when NUM_BEAMS > 1, else greedy) and the
  MBR knobs are fields of GenerationSettings too, so they are declared, inherited and recorded like
  NUM_BEAMS. `Mbr` is the resolved consensus decoding (minimum Bayes risk): the greedy summary plus
  `samples` seeded samples per row, the one with the highest mean agreement (`utility`) with the
  others wins (quality/mbr.py). A row's samples are seeded from (seed, the row's prompt ids), so
  they do not depend on its batch or on the process of a sharded run.
* Inheritance treats DECODING and NUM_BEAMS as one choice (`coupled_skips`): an explicit
  `--decoding=greedy|mbr` does not inherit a record's beams, an explicit `--num_beams` does not
  inherit a record's DECODING, and an explicit non-MBR DECODING does not inherit MBR knobs.
* `Sampling`: temperature / top_p / seed, when a caller (the server) asks for sampled decoding.
* `ResolvedGeneration`: what generation really uses: the request over the model family's
  defaults (model/family.py `Family.resolve_generation`, the one place defaults live), with the
  limits every backend needs already worked out (`max_new`, `min_new`), so no backend has a
  fallback of its own. The engine hands it to `Backend.generate_batch`; `as_record()` is what run
  records and responses carry.
* `LongInput`: LONG_INPUT (truncate | chunk | chunk_join | error), parsed once.

A new decoding method or sampling knob is a field here, its default in family.py, and
`Capabilities` on the backends that run it.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace

from finetuneflow.contract.errors import UserError

# The settings block every generating stage declares (same names, same specs).
SPECS = {"NUM_BEAMS": "int >= 1 | None", "MAX_NEW_TOKENS": "int >= 1 | None", "MIN_NEW_TOKENS": "int >= 0 | None",
         "NO_REPEAT_NGRAM_SIZE": "int >= 0 | None", "LENGTH_PENALTY": "float | None",
         "DECODING": "greedy | beam | mbr | None", "MBR_SAMPLES": "int >= 1 | None",
         "MBR_TEMPERATURE": "float > 0 | None", "MBR_TOP_P": "0 < float <= 1 | None",
         "MBR_UTILITY": "rougeL | chrf | minilm | None", "MBR_FAITHFUL": "bool | None", "MBR_SEED": "int >= 0 | None"}
DECODINGS = ("greedy", "beam", "mbr")
MBR_UTILITIES = ("rougeL", "chrf", "minilm")
MBR_FIELDS = ("mbr_samples", "mbr_temperature", "mbr_top_p", "mbr_utility", "mbr_faithful", "mbr_seed")
# MBR knobs left at None (and not in the upstream record): these (Freitag et al. 2022 sample at ~0.7-1.0)
MBR_DEFAULTS = {"mbr_samples": 8, "mbr_temperature": 0.7, "mbr_top_p": 0.95, "mbr_utility": "rougeL",
                "mbr_faithful": True}
DEFAULT_SEED = 42     # MBR_SEED of a stage without a SEED of its own (inference, the server)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; `None` keeps the model's own generation config (or the causal defaults)."""
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    decoding: str | None = None              # greedy | beam | mbr; None: beam when num_beams > 1, else greedy
    mbr_samples: int | None = None           # the MBR knobs (DECODING=mbr only; None: MBR_DEFAULTS)
    mbr_temperature: float | None = None
    mbr_top_p: float | None = None
    mbr_utility: str | None = None
    mbr_faithful: bool | None = None
    mbr_seed: int | None = None

    def __post_init__(self):
        if self.min_new_tokens is not None and self.max_new_tokens is not None \
                and self.min_new_tokens > self.max_new_tokens:
            raise UserError(f"MIN_NEW_TOKENS={self.min_new_tokens} is more than MAX_NEW_TOKENS={self.max_new_tokens}; "
                            f"lower MIN_NEW_TOKENS or raise MAX_NEW_TOKENS")
        check_decoding(self)

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

    def without_mbr(self) -> "GenerationSettings":
        """The same settings decoding greedily where they ask for MBR (MBR's own greedy part): what
        in-training evaluation runs, and what a backend without sampling could run."""
        if self.decoding != "mbr":
            return self
        return GenerationSettings(**{**asdict(self), "decoding": "greedy", **dict.fromkeys(MBR_FIELDS)})


def check_decoding(settings: GenerationSettings) -> None:
    """DECODING, NUM_BEAMS and the MBR knobs that contradict each other: one line each."""
    decoding, beams = settings.decoding, settings.num_beams
    if decoding is not None and decoding not in DECODINGS:
        raise UserError(f"DECODING={decoding!r} is not one of {', '.join(DECODINGS)}")
    if decoding in ("greedy", "mbr") and beams is not None and beams > 1:
        raise UserError(f"DECODING={decoding} decodes with one beam, but NUM_BEAMS={beams} asks for beam search; drop "
                        f"--num_beams (or set it to 1), or use --decoding=beam")
    if decoding == "beam" and beams == 1:
        raise UserError("DECODING=beam needs NUM_BEAMS >= 2 (NUM_BEAMS=1 is greedy decoding); set --num_beams=4, "
                        "or use --decoding=greedy")
    knobs = [name.upper() for name in MBR_FIELDS if getattr(settings, name) is not None]
    if knobs and decoding != "mbr":
        raise UserError(f"{knobs[0]}={getattr(settings, knobs[0].lower())} only applies to DECODING=mbr (DECODING is "
                        f"{decoding or 'not set: greedy or beam'}); add --decoding=mbr, or drop {', '.join(knobs)}")
    if settings.mbr_utility is not None and settings.mbr_utility not in MBR_UTILITIES:
        raise UserError(f"MBR_UTILITY={settings.mbr_utility!r} is not one of {', '.join(MBR_UTILITIES)}")


def coupled_skips(cfg: dict) -> set[str]:
    """Settings a stage must not inherit from an upstream record, because what it set itself
    already decides them (see the module doc): DECODING and NUM_BEAMS are one choice."""
    decoding, skip = cfg.get("DECODING"), set()
    if decoding in ("greedy", "mbr"):
        skip.add("NUM_BEAMS")
    if decoding is not None and decoding != "mbr":
        skip.update(name.upper() for name in MBR_FIELDS)
    if decoding is None and cfg.get("NUM_BEAMS") is not None:
        skip.update(("DECODING", *(name.upper() for name in MBR_FIELDS)))
    return skip


def override(base: GenerationSettings, overrides: dict, mbr_knobs: dict | None = None) -> GenerationSettings:
    """`overrides` (a request's lower-case fields) over `base` (a server's defaults), DECODING and
    NUM_BEAMS as one choice (`coupled_skips`); a request that asks for MBR gets `mbr_knobs` where
    neither it nor `base` sets them."""
    values = asdict(base)
    for name in coupled_skips({k.upper(): v for k, v in overrides.items()}):
        values[name.lower()] = None
    values.update(overrides)
    if values["decoding"] == "mbr":
        values.update({k: v for k, v in (mbr_knobs or {}).items() if values.get(k) is None})
    return GenerationSettings(**values)


def _generation(self) -> GenerationSettings:
    """The decoding settings this settings object carries."""
    return GenerationSettings(**{f.name: getattr(self, f.name) for f in fields(GenerationSettings)})


# The decoding fields for a settings dataclass (`@dataclass(frozen=True) class X(FromConfig, DecodingFields)`):
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
class Mbr:
    """Consensus decoding as resolved (see the module doc); quality/mbr.py chooses."""
    samples: int = MBR_DEFAULTS["mbr_samples"]
    temperature: float = MBR_DEFAULTS["mbr_temperature"]
    top_p: float = MBR_DEFAULTS["mbr_top_p"]
    utility: str = MBR_DEFAULTS["mbr_utility"]
    faithful: bool = MBR_DEFAULTS["mbr_faithful"]
    seed: int = DEFAULT_SEED

    @classmethod
    def resolve(cls, settings: GenerationSettings) -> "Mbr":
        """The knobs asked for over MBR_DEFAULTS (MBR_SEED None: DEFAULT_SEED)."""
        values = {name: getattr(settings, name) for name in MBR_FIELDS}
        merged = {k: (MBR_DEFAULTS.get(k) if v is None else v) for k, v in values.items()}
        merged["mbr_seed"] = DEFAULT_SEED if merged["mbr_seed"] is None else merged["mbr_seed"]
        return cls(int(merged["mbr_samples"]), float(merged["mbr_temperature"]), float(merged["mbr_top_p"]),
                   str(merged["mbr_utility"]), bool(merged["mbr_faithful"]), int(merged["mbr_seed"]))

    def row_seed(self, prompt_ids: list[int]) -> int:
        """The seed of one row's samples: from the seed and the row's own prompt tokens, so a row
        gets the same samples in any batch and in any process of a sharded run."""
        digest = hashlib.sha256(f"{self.seed}:{','.join(map(str, prompt_ids))}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def sampling(self, seed: int) -> Sampling:
        return Sampling(self.temperature, self.top_p, seed)

    def settings(self) -> dict:
        """The knobs as GenerationSettings fields (what a record passes on)."""
        return {"mbr_samples": self.samples, "mbr_temperature": self.temperature, "mbr_top_p": self.top_p,
                "mbr_utility": self.utility, "mbr_faithful": self.faithful, "mbr_seed": self.seed}


def candidate_seed(row_seed: int, candidate: int) -> int:
    """The seed of one sample of a row (candidate 1..N; 0 is the greedy summary)."""
    return (row_seed + 1_000_003 * candidate) % (1 << 63)


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
    decoding: str = "greedy"            # greedy | beam | mbr (resolved)
    mbr: Mbr | None = None              # DECODING=mbr: its resolved knobs

    @property
    def do_sample(self) -> bool:
        return self.sampling is not None

    def settings(self) -> GenerationSettings:
        """The decoding settings as resolved (what a run record passes on to the next stage)."""
        return GenerationSettings(self.num_beams, self.max_new_tokens, self.min_new_tokens,
                                  self.no_repeat_ngram_size, self.length_penalty, self.decoding,
                                  **(self.mbr.settings() if self.mbr is not None else {}))

    def greedy_part(self) -> "ResolvedGeneration":
        """MBR's first candidate: the same decoding, greedy (itself when it is not MBR)."""
        return replace(self, decoding="greedy", mbr=None) if self.mbr is not None else self

    def samples_part(self, seed: int) -> "ResolvedGeneration":
        """MBR's samples: the same limits, sampled with MBR's temperature and top_p from `seed`."""
        return replace(self, decoding="greedy", mbr=None, sampling=self.mbr.sampling(seed))

    def as_record(self) -> dict:
        """The effective settings as records and responses show them."""
        record = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        for key in ("max_length", "min_length", "min_new_tokens", "no_repeat_ngram_size", "length_penalty"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        record["do_sample"] = self.do_sample
        if self.sampling is not None:
            record.update(self.sampling.as_dict())
        record["decoding"] = "sample" if self.do_sample else self.decoding
        if self.mbr is not None:
            record.update(self.mbr.settings())
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
