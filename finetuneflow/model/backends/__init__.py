"""Backends: the runtimes a model can run on, behind one small protocol.

The generation engine (engine/generation.py) owns the only generation loop: encoding, length
sorting, batching, out-of-memory halving, progress and timing. It hands each batch of input ids
to the model's backend:

* `detect(path)`: does this file or folder hold a model this backend runs?
* `load(source, device=..., dtype=..., **options)`: a `LoadedModel` (model/loading.py);
* `generate_batch(loaded, batch, effective)`: the new tokens of each row (`Generated`);
* `token_log_probs(loaded, prompt_ids, target_ids)`: teacher-forced log p of each target token;
* `logits(...)`: full teacher-forced logits where the runtime exposes them (else None).

`backend_for(path)` asks each registered backend in order; transformers comes last and takes
anything else (a Hub id, a model folder, an adapter folder). A new runtime (llama.cpp) plugs in
by adding its module to `REGISTRY` without touching the loop.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetuneflow.model.loading import LoadedModel


@dataclass
class Generated:
    ids: list[int]          # new tokens, without the stop token
    counted: int            # tokens generated as transformers counts them (including the stop token)
    finish_reason: str      # "stop" or "length"


class Backend:
    name = "?"

    def detect(self, path: Path) -> bool:
        raise NotImplementedError

    def load(self, source: str, *, device=None, dtype=None, **options) -> "LoadedModel":
        """`source`: a resolved local path, or a Hub id (transformers only). `options` are the
        transformers backend's (adapter, load_in_4bit, ...); other backends get them empty/False."""
        raise NotImplementedError

    def generate_batch(self, loaded: "LoadedModel", batch: list[list[int]], effective: dict) -> list[Generated]:
        raise NotImplementedError

    def token_log_probs(self, loaded: "LoadedModel", prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        raise NotImplementedError

    def logits(self, loaded: "LoadedModel", prompt_ids: list[int], target_ids: list[int]):
        """Teacher-forced logits (numpy, one row per position of prompt + target), or None."""
        return None

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc` is this runtime running out of device memory (the engine halves the batch)."""
        return False

    def free_memory(self) -> None:
        """Release cached device memory after an out-of-memory error."""


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
