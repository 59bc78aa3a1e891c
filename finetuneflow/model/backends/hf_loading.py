"""The transformers backend's loading: base models, adapters (PEFT), merged folders, 4-bit
(bitsandbytes), in the dtype model/precision.py chose, on the device model/device.py chose. The
backend itself (generation, speed-ups, MBR's candidates) is hf.py, which re-exports these.
"""
from __future__ import annotations

from pathlib import Path

import torch

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import read_record
from finetuneflow.model.device import default_dtype, parse_device
from finetuneflow.model.family import family_of
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.loading import adapter_base, is_adapter_dir, load_config, load_tokenizer, local_or_hub


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def quantization_config(device: torch.device):
    import transformers
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


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _is_quantized_checkpoint(config) -> bool:
    return bool(getattr(config, "quantization_config", None))


def load_transformers(name: str, *, backend, adapter: str | None = None, load_in_4bit: bool = False, device=None,
                      dtype=None, trust_remote_code: bool = False, allow_unsafe_weights: bool = False,
                      for_training: bool = False, base_model: str | None = None) -> LoadedModel:
    """Load `name` (Hub id, model folder, merged folder, or an adapter folder) for either family.
    An adapter folder is recognised by its adapter_config.json; its base comes from its run record
    (train_bart_lora.py), else adapter_config.json, unless `base_model` is given."""
    device = parse_device(device)
    requested = name
    if adapter is None and is_adapter_dir(name):
        adapter = str(resolve(name))
        name = base_model or adapter_base(adapter)
    base = local_or_hub(name)
    if adapter and not Path(base).exists() and (base.startswith(("/", ".", "~")) or Path(base).suffix):
        raise UserError(f"base model {base} of adapter {adapter} not found; restore it, or pass "
                        f"--BASE_MODEL=<its id or folder>")
    config = load_config(base, trust_remote_code)
    family = family_of(config)
    if adapter:
        _check_adapter_fits(adapter, base, config)
    if _is_quantized_checkpoint(config) and not load_in_4bit and (Path(base) / "config.json").is_file():
        method = config.quantization_config.get("quant_method", "?")
        raise UserError(f"{base} holds already-quantized weights ({method}); "
                        f"load it with --LOAD_IN_4BIT=True, or use the full-precision model it was made from")
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    auto = AutoModelForSeq2SeqLM if family.auto_class == "AutoModelForSeq2SeqLM" else AutoModelForCausalLM
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_unsafe_weights else True}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    else:
        kwargs["dtype"] = dtype or (torch.float32 if for_training and device.type == "cpu" else default_dtype(device))
    try:
        model = auto.from_pretrained(base, **kwargs)
    except Exception as exc:   # OSError, ValueError, SafetensorError (truncated file), unpickling refused, ...
        raise UserError(f"cannot load model {name!r}: {first_line(exc, 300)}; check the folder "
                        f"(config.json + model.safetensors) or re-create it") from None
    if load_in_4bit and device.type == "cpu":
        disable_cpu_bf16_kernels(model)
    elif not load_in_4bit:
        model.to(device)
    tokenizer_source = adapter if adapter and any(
        (Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else base
    tokenizer = load_tokenizer(tokenizer_source, family, config, trust_remote_code)
    record_folder = Path(adapter or base)
    record = read_record(record_folder) if record_folder.is_dir() else None
    if adapter:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
        except Exception as exc:   # shapes or module names that do not match the base
            raise UserError(f"adapter {adapter} does not fit base {base}: {first_line(exc, 240)}; pass the base it "
                            f"was trained on with --BASE_MODEL") from None
    if not for_training:
        model.eval()
    dtype_name = "4-bit nf4" if load_in_4bit else str(next(model.parameters()).dtype).replace("torch.", "")
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, backend=backend, name=str(requested),
                       base=name, adapter=adapter, device=device, dtype=dtype_name, config=model.config,
                       generation_config=unwrap(model).generation_config, record=record)


def _check_adapter_fits(adapter: str, base: str, config) -> None:
    """An adapter trained on another architecture merges into a no-op: refuse it up front."""
    import json
    try:
        adapter_config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{adapter}/adapter_config.json is unreadable ({type(exc).__name__}); re-train or restore "
                        f"the adapter") from None
    task = adapter_config.get("task_type")
    family = family_of(config)
    if task and task != family.lora_task_type:
        raise UserError(f"adapter {adapter} is a {task} adapter but base {base} is a {family} model; pass the base it "
                        f"was trained on with --BASE_MODEL")
