"""The model folder a ship step reads (cleanup, export), checked before any slow work.

`inspect_model_folder` turns every wrong input into one line naming the fix: a missing folder
(with the stage that writes it), a LoRA adapter (merge it first), a CTranslate2 export, a file, a
folder without config.json or weights, a config.json that is not a JSON object, already-quantized
(4-bit) weights, pickled weights (`pytorch_model.bin` runs code when loaded: re-save with
safetensors), and a truncated or corrupt `.safetensors` file (its header is read, the tensors
are not).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import require
from finetuneflow.contract.record import RunRecord, read_record
from finetuneflow.model.family import Family, family_of
from finetuneflow.model.loading import is_adapter_dir

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class ModelFolder:
    path: Path
    config: dict                # config.json as written
    family: Family
    model_type: str
    record: RunRecord           # its run record (stage "unknown" when it has none)
    _reference: object = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    def reference_model(self):
        """The model loaded in float32 by transformers, once: the verification and the deploy gate
        compare every export against it."""
        if self._reference is None:
            import torch
            from finetuneflow.model.loading import load_model
            self._reference = load_model(str(self.path), dtype=torch.float32)
        return self._reference


def has_model_weights(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in SAFE_WEIGHTS + PICKLED_WEIGHTS)


def read_config_json(path: Path, what: str = "model config", fix: str = "restore it or re-create the model folder",
                     key: str | None = "model_type") -> dict:
    """A JSON config file as a dict (with `key` set), or one line saying what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({type(exc).__name__}): it is not a readable {what}; {fix}") \
            from None
    if not isinstance(data, dict) or (key == "model_type" and not data.get(key)):
        raise UserError(f"{path} is not a {what} (a JSON object{' with ' + key if key else ''}); {fix}")
    return data


def read_config(path: Path) -> dict:
    """config.json as a dict, or one line saying what is wrong with it."""
    return read_config_json(path)


def check_safetensors(path: Path, fix: str = "re-create the model folder") -> None:
    """The file's safetensors header reads and covers the file (a truncated file fails here)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "np") as handle:
            handle.keys()
    except Exception as exc:   # SafetensorError: truncated, not safetensors at all, ...
        raise UserError(f"{path} is not a readable safetensors file ({first_line(exc, 160)}); it is truncated or "
                        f"corrupt: {fix}") from None


def check_weights(folder: Path, allow_pickled: bool = False) -> None:
    """safetensors weights whose headers read; pickled-only weights are refused unless allowed."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any((folder / name).is_file() for name in PICKLED_WEIGHTS):
            if allow_pickled:
                return
            raise UserError(f"{folder} holds pickled weights (pytorch_model.bin), which can run code when loaded; "
                            f"re-save the model with safetensors (from_pretrained + save_pretrained) and pass "
                            f"that folder")
        raise UserError(f"{folder} holds no model weights (*.safetensors)")
    for shard in shards:
        check_safetensors(shard)


def inspect_model_folder(model: str | Path, *, produced_by: str, path: Path | None = None) -> ModelFolder:
    """The full-precision Hugging Face model folder at `model` (already resolved as `path` when
    given), or one line naming the stage to run first."""
    from finetuneflow.model.backends.ct2 import is_ct2_dir
    path = path or require(model, produced_by=produced_by, what="model folder")
    if is_adapter_dir(path):
        raise UserError(f"{path} is a LoRA adapter folder, not a merged model: run `python merge_bart_lora.py "
                        f"--adapter={model}` first, then pass its output")
    if path.is_dir() and is_ct2_dir(path):
        raise UserError(f"{path} is already a CTranslate2 export; pass the merged Hugging Face folder written by "
                        f"`python post_merge_cleanup.py` instead")
    if not path.is_dir() or not (path / "config.json").is_file() or not has_model_weights(path):
        raise UserError(f"{path} is not a model folder (needs config.json and *.safetensors weights): run "
                        f"`python merge_bart_lora.py` and `python post_merge_cleanup.py` first and pass their output")
    config = read_config(path / "config.json")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UserError(f"{path} holds already-quantized weights ({method}); pass the full-precision model it was "
                        f"made from (merge_bart_lora.py always writes one)")
    check_weights(path)
    return ModelFolder(path, config, family_of(config), str(config.get("model_type")),
                       read_record(path) or RunRecord("unknown"))
