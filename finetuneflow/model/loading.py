"""Loading models: one function for base, base + LoRA adapter, or merged; seq2seq or causal.

The family is decided from the config (`is_encoder_decoder`), never from the name. Padding
rules live here: causal models pad with EOS when they have no pad token and pad on the left
for generation; seq2seq models pad on the right. Weights load from safetensors only unless
the caller opts in, and remote code runs only when the caller opts in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve

ADAPTER_CONFIG = "adapter_config.json"
SEQ2SEQ, CAUSAL = "seq2seq", "causal"
MAX_SANE_LENGTH = 1_000_000  # tokenizers without a limit report ~1e30


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    family: str            # "seq2seq" or "causal"
    base: str              # base model id or folder
    adapter: str | None    # adapter folder when one was applied
    device: torch.device
    run_config: dict | None  # the run_config.json found beside the model, if any


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def local_or_hub(name: str) -> str:
    """A local folder (resolved from the project root) when it exists, else the Hub id as given."""
    path = resolve(name)
    return str(path) if path.exists() else name


def is_adapter_dir(path: str | Path) -> bool:
    return (resolve(path) / ADAPTER_CONFIG).is_file()


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on: its run_config.json, else adapter_config.json."""
    folder = resolve(adapter_dir)
    run_config = read_json(folder / "run_config.json") or {}
    adapter_config = read_json(folder / ADAPTER_CONFIG) or {}
    base = run_config.get("base_model") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder}: adapter_config.json names no base model; pass --BASE_MODEL=<id or folder>")
    return base


def model_family(config: transformers.PretrainedConfig) -> str:
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL


def load_config(name: str, trust_remote_code: bool = False) -> transformers.PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(local_or_hub(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model config for {name!r}: {first}") from None


def load_tokenizer(name: str, family: str, config=None, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(local_or_hub(name), trust_remote_code=trust_remote_code)
    fix_tokenizer(tokenizer, family, config)
    return tokenizer


def fix_tokenizer(tokenizer, family: str, config=None) -> None:
    """The pad-token and padding-side rules for each family, and a sane `model_max_length`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left" if family == CAUSAL else "right"
    if not tokenizer.model_max_length or tokenizer.model_max_length > MAX_SANE_LENGTH:
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit:
            tokenizer.model_max_length = int(limit)


def quantization_config(device: torch.device):
    compute = default_dtype(device) if device.type == "cuda" else torch.float32
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def disable_cpu_bf16_kernels(model: torch.nn.Module) -> int:
    """bitsandbytes' CPU bf16 path stops 4-bit training silently after a no-grad forward."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def max_input_tokens(loaded: LoadedModel) -> int:
    config = loaded.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit or loaded.tokenizer.model_max_length)


def load_model(name: str, adapter: str | None = None, load_in_4bit: bool = False,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, allow_unsafe_weights: bool = False,
               for_training: bool = False) -> LoadedModel:
    """Load `name` (Hub id, model folder, merged folder, or an adapter folder) for either family.

    An adapter folder is recognised by its adapter_config.json; its base comes from the folder's
    run_config.json (written by train_bart_lora.py) or from adapter_config.json."""
    device = torch.device(device) if device else default_device()
    from finetuneflow.model.backends.ct2 import is_ct2_dir, load_ct2   # a CTranslate2 export (export_gguf.py --FORMAT=ct2)
    if adapter is None and is_ct2_dir(name):
        if load_in_4bit or for_training:
            raise UserError(f"{name} is a CTranslate2 export: it runs inference only (no 4-bit, no training)")
        return load_ct2(name, device=device)
    if adapter is None and is_adapter_dir(name):
        adapter, name = str(resolve(name)), adapter_base(name)
    base = local_or_hub(name)
    if adapter and not Path(base).exists() and base.startswith(("/", ".")):
        raise UserError(f"base model {base} of adapter {adapter} not found; restore it or re-run "
                        f"`python train_bart_lora.py`")
    config = load_config(base, trust_remote_code)
    family = model_family(config)
    auto = AutoModelForSeq2SeqLM if family == SEQ2SEQ else AutoModelForCausalLM
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_unsafe_weights else True}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    else:
        kwargs["dtype"] = dtype or (torch.float32 if for_training and device.type == "cpu" else default_dtype(device))
    try:
        model = auto.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {name!r}: {message}") from None
    if load_in_4bit and device.type == "cpu":
        disable_cpu_bf16_kernels(model)
    elif not load_in_4bit:
        model.to(device)
    tokenizer_source = adapter if adapter and any(
        (Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else base
    tokenizer = load_tokenizer(tokenizer_source, family, config, trust_remote_code)
    run_config = read_json(Path(adapter or base) / "run_config.json") if Path(adapter or base).exists() else None
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
    if not for_training:
        model.eval()
    return LoadedModel(model, tokenizer, family, name, adapter, device, run_config)


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
