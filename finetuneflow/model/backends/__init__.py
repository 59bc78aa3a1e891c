"""Backends: the runtimes a model can run on, behind one small protocol.

The generation engine (engine/generation.py) owns the only generation loop: encoding, length
sorting, batching, out-of-memory halving, progress and timing. It hands each batch of input ids
to the model's backend with the decoding already resolved (contract/decoding.py
`ResolvedGeneration`: every limit worked out, so a backend has no defaults of its own):

* `detect(path)`: does this file or folder hold a model this backend runs?
* `load(source, device=..., dtype=..., **options)`: a `LoadedModel` (model/loaded.py);
* `generate_batch(loaded, batch, decoding, on_step=None)`: the new tokens of each row
  (`Generated`); a backend with `capabilities.token_streaming` calls `on_step(row, token)` for
  every token as it is chosen (the others are never given one); when it returns True, the row's
  consumer is gone: the backend stops generating that row (its result is then cut short) and the
  batch goes on. Beam search may stream nothing (its rows are final only at the end);
* `generate_candidates(loaded, batch, decoding, seeds)`: DECODING=mbr's candidates of each row:
  the greedy summary (exactly what `generate_batch` gives), then `decoding.mbr.samples` samples
  seeded from the row's seed, with the prompt encoded once per row and its KV cache (or encoder
  output) shared by the row's candidates (backends with `capabilities.sampling`);
* `speedups_for(loaded, batch, decoding)`: the exact speed-ups the batch will get (names), if any;
* `token_log_probs(loaded, prompt_ids, target_ids)`: teacher-forced log p of each target token;
* `logits(...)`: full teacher-forced logits where the runtime exposes them (else None);
* `close(loaded)`: free the runtime's memory now (not only when it is collected).

Callers ask a backend's `capabilities` (beams, sampling, token streaming, training, ...) rather
than its name; `refuse_unsupported(settings)` says, before any work, what a request asks that the
backend cannot do. `backend_for(path)` asks each registered backend in order; transformers comes last
and takes anything else (a Hub id, a model folder, an adapter folder). A new runtime plugs in by
adding its module to `REGISTRY` without touching the loop.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from finetuneflow.contract.decoding import GenerationSettings, ResolvedGeneration
from finetuneflow.contract.errors import UserError
from finetuneflow.model.loaded import LoadedModel

StepCallback = Callable[[int, int], "bool | None"]    # (row of the batch, token id just chosen) -> stop the row?


@dataclass
class Generated:
    ids: list[int]          # new tokens, without the stop token
    counted: int            # tokens generated as transformers counts them (including the stop token)
    finish_reason: str      # "stop" or "length"


@dataclass
class CandidateBatch:
    """DECODING=mbr's candidates of one batch (Backend.generate_candidates)."""
    rows: list[list[Generated]]     # per row: the greedy summary, then the samples
    greedy_seconds: float           # the greedy part (prompts encoded here)
    sample_seconds: float           # the samples (from the prompts' shared cache)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do: callers ask these, never a backend's name."""
    beams: bool = False             # beam search (num_beams > 1)
    sampling: bool = False          # seeded sampling (temperature, top_p, seed)
    token_streaming: bool = False   # generate_batch calls on_step for each row's every token
    scoring: bool = True            # token_log_probs (teacher-forced log-probabilities)
    exact_speedups: bool = False    # speedups_for may name per-batch speed-ups that keep the tokens exact
    training: bool = False          # adapters, 4-bit weights and training (else inference only)
    precision: bool = False         # loads weights in the dtype a stage asks for (else the file's own)


class Backend:
    name = "?"
    capabilities = Capabilities()

    def detect(self, path: Path) -> bool:
        raise NotImplementedError

    def load(self, source: str, *, device=None, dtype=None, **options) -> LoadedModel:
        """`source`: a resolved local path, or a Hub id (transformers only). `options` are the
        transformers backend's (adapter, load_in_4bit, ...); other backends get them empty/False."""
        raise NotImplementedError

    def generate_batch(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                       on_step: StepCallback | None = None) -> list[Generated]:
        raise NotImplementedError

    def generate_candidates(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                            seeds: list[int]) -> CandidateBatch:
        """DECODING=mbr: each row's greedy summary and `decoding.mbr.samples` samples (see the module doc)."""
        raise UserError(f"the {self.name} backend cannot sample, so it cannot decode with DECODING=mbr; use "
                        f"--decoding=greedy")

    def refuse_unsupported(self, settings: GenerationSettings) -> None:
        """One line, before any work, for decoding this backend cannot run (asked for or inherited)."""
        caps = self.capabilities
        if not caps.beams and (settings.decoding == "beam" or (settings.num_beams or 1) > 1):
            what = "DECODING=beam" if settings.decoding == "beam" else f"NUM_BEAMS={settings.num_beams}"
            raise UserError(f"{what}: the {self.name} backend has no beam search; use --decoding=greedy (or mbr) "
                            f"with NUM_BEAMS=1")
        if not caps.sampling and settings.decoding == "mbr":
            raise UserError(f"DECODING=mbr samples candidates, which the {self.name} backend cannot do; use "
                            f"--decoding=greedy or beam")

    def speedups_for(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration) -> tuple:
        """The exact speed-ups `batch` will get (counted per batch in the engine's result)."""
        return ()

    def token_log_probs(self, loaded: LoadedModel, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        raise NotImplementedError

    def logits(self, loaded: LoadedModel, prompt_ids: list[int], target_ids: list[int]):
        """Teacher-forced logits (numpy, one row per position of prompt + target), or None."""
        return None

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc` is this runtime running out of device memory (the engine halves the batch)."""
        return False

    def free_memory(self) -> None:
        """Release cached device memory after an out-of-memory error."""

    def close(self, loaded: LoadedModel) -> None:
        """Free what the runtime holds for `loaded` (its memory is otherwise freed when collected)."""


def finish(rows: list[list[int]], stops: set[int], max_new_tokens: int | None) -> list[Generated]:
    """Cut each row at its first stop token; count as transformers does (the stop token counts)."""
    out = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        if end is None:
            out.append(Generated(list(row), len(row), "length" if max_new_tokens and len(row) >= max_new_tokens
                                 else "stop"))
        else:
            out.append(Generated(list(row[:end]), end + 1, "stop"))
    return out


# Detection order: specific formats first, transformers (anything else) last.
REGISTRY = ("finetuneflow.model.backends.ct2", "finetuneflow.model.backends.llamacpp",
            "finetuneflow.model.backends.hf")


def backends() -> list[Backend]:
    found = []
    for module_name in REGISTRY:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:   # a backend not written/installed here
                continue
            raise
        found.append(module.BACKEND)
    return found


def backend_for(path: Path | str) -> Backend:
    for backend in backends():
        if backend.detect(Path(path)):
            return backend
    raise AssertionError("the transformers backend detects everything")


def default_backend() -> Backend:
    """The backend of a Hub id or anything no specific format claims (transformers)."""
    return backends()[-1]
