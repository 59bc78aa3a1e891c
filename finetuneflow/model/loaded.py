"""A loaded model: what every stage and the engine hold once `load_model` (model/loading.py) has
picked a backend (model/backends) and loaded the weights.

It sits in its own module, below both the loader and the backends: the backends build it and the
loader returns it, so neither has to import the other for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetuneflow.contract import architectures as arch
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord
from finetuneflow.model.family import Family, PromptSpec
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, seq2seq_prefix


@dataclass(kw_only=True)
class LoadedModel:
    model: Any                  # a torch module, a CTranslate2 runtime, a llama.cpp model, ...
    tokenizer: Any              # a transformers tokenizer (every backend encodes with it)
    family: Family
    backend: Any                # the model.backends.Backend that loaded it (typed there: the backends import this)
    name: str                   # what the caller asked for
    base: str                   # the base model id or folder
    adapter: str | None = None  # the adapter folder when one was applied
    device: Any = None          # torch.device for transformers; "cpu"/"cuda" elsewhere
    dtype: str = "float32"
    config: Any = None          # the transformers config
    generation_config: Any = None
    record: RunRecord | None = None   # the run record found beside the model

    def prompt(self, instruction: str | None = None) -> PromptSpec:
        return PromptSpec(instruction or DEFAULT_INSTRUCTION, seq2seq_prefix(self.config))

    def max_positions(self) -> int:
        return arch.max_positions(self.config) or int(self.tokenizer.model_max_length)

    @property
    def source(self) -> Path | None:
        """The local folder or file the model came from (None for a Hub id)."""
        path = resolve(self.adapter or self.name)
        return path if path.exists() else None
