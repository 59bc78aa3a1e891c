"""Loading models: one function for every kind of model a stage reads.

`load_model(name)` takes a Hub id, a model folder, a merged/cleaned folder, an adapter folder (its
base comes from its run record or adapter_config.json), a CTranslate2 export or a GGUF file, asks
the backend registry (model/backends) which runtime it is, and returns a `LoadedModel`
(model/loaded.py): the model, the tokenizer, the family strategy (model/family.py), the backend,
the HF config and generation config, and the run record found beside the model.

Tokenizer rules: causal models pad with EOS when they have no pad token and pad on the left for
generation; seq2seq models pad on the right. Weights load from safetensors only unless the caller
opts in, and remote code runs only when the caller opts in.
"""
from __future__ import annotations

from pathlib import Path

from finetuneflow.contract import architectures as arch
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.io import read_json_object
from finetuneflow.contract.paths import is_hub_id, resolve
from finetuneflow.contract.record import RunRecord, read_record
from finetuneflow.model.backends import backend_for
from finetuneflow.model.family import Family
from finetuneflow.model.loaded import LoadedModel

__all__ = ["ADAPTER_CONFIG", "LoadedModel", "adapter_base", "fix_tokenizer", "is_adapter_dir", "load_config",
           "load_model", "load_tokenizer", "local_or_hub"]
ADAPTER_CONFIG = "adapter_config.json"


def local_or_hub(name: str) -> str:
    """A local folder (resolved from the project root) when it exists, else the Hub id as given."""
    path = resolve(name)
    return str(path) if path.exists() else name


def is_adapter_dir(path: str | Path) -> bool:
    return (resolve(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | Path, record: RunRecord | None = None) -> str:
    """The base model an adapter was trained on: its run record, else adapter_config.json."""
    folder = resolve(adapter_dir)
    record = record if record is not None else read_record(folder)
    base = record.lineage.base_model if record else None
    if not base:
        base = read_json_object(folder / ADAPTER_CONFIG, "restore it or re-create the folder").get(
            "base_model_name_or_path")
    if not base:
        raise UserError(f"{folder}: adapter_config.json names no base model; pass --BASE_MODEL=<id or folder>")
    return base


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(local_or_hub(name), trust_remote_code=trust_remote_code)
    except Exception as exc:   # OSError, ValueError, JSONDecodeError, KeyError: unknown model type, ...
        raise UserError(f"cannot load the model config of {name!r}: {first_line(exc, 300)}") from None


def fix_tokenizer(tokenizer, family: Family, config=None) -> None:
    """The pad-token and padding-side rules for each family, and a sane `model_max_length`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = family.padding_side
    if not tokenizer.model_max_length or tokenizer.model_max_length > arch.MAX_SANE_LENGTH:
        limit = arch.max_positions(config) if config is not None else None
        if limit:
            tokenizer.model_max_length = int(limit)


def load_tokenizer(name: str, family: Family, config=None, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_or_hub(name), trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:   # missing/corrupt tokenizer files
        raise UserError(f"cannot load the tokenizer of {name!r}: {first_line(exc, 300)}") from None
    fix_tokenizer(tokenizer, family, config)
    return tokenizer


def load_model(name: str, *, device=None, dtype=None, load_in_4bit: bool = False, for_training: bool = False,
               **options) -> LoadedModel:
    """Load `name` (see the module doc) with the backend that detects it. Options for the
    transformers backend: adapter, base_model (overrides an adapter's recorded base),
    trust_remote_code, allow_unsafe_weights."""
    path = resolve(name)
    if not path.exists() and not is_hub_id(str(name)):
        raise UserError(f"model not found: {path} does not exist; pass an existing folder or file, or a Hub id "
                        f"such as facebook/bart-large-cnn")
    backend = backend_for(path)
    if not backend.capabilities.training and (load_in_4bit or for_training or options.get("adapter")):
        raise UserError(f"{name} is a {backend.name} model: it runs inference only (no adapter, 4-bit or training); "
                        f"pass the Hugging Face model folder it was exported from")
    return backend.load(str(path) if path.exists() else str(name), device=device, dtype=dtype,
                        load_in_4bit=load_in_4bit, for_training=for_training, **options)
