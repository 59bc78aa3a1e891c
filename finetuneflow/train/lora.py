"""The base model made ready for LoRA: load it (QLoRA: 4-bit, when bitsandbytes works here), pick
the LoRA targets and wrap it.

Default targets come from the one table in contract/architectures.py (through the family
strategy), the same table the planner uses, so a plan and a run agree on what is trained. Names
the model does not have are an error that lists its linear modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from finetuneflow.contract import architectures as arch
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import is_hub_id, resolve
from finetuneflow.model.backends import backend_for
from finetuneflow.model.backends.hf import disable_cpu_bf16_kernels
from finetuneflow.model.family import Family, family_of
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.loading import is_adapter_dir, load_config, load_model
from finetuneflow.train.settings import TrainSettings, check_lengths


@dataclass
class Base:
    """The loaded base model and what was decided about it."""
    loaded: LoadedModel
    family: Family
    in_4bit: bool              # really 4-bit (False after ALLOW_CPU_FALLBACK)
    targets: str | list[str]   # the LoRA target modules


def four_bit_problem(device: torch.device) -> str | None:
    """Why bitsandbytes 4-bit cannot run on `device` here, or None when it can."""
    try:
        import bitsandbytes.functional as bnb_functional
        weight = torch.randn(64, 64, device=device,
                             dtype=torch.float16 if device.type == "cuda" else torch.float32)
        bnb_functional.quantize_4bit(weight, quant_type="nf4")
        return None
    except Exception as exc:  # missing library, no kernel for this device, ...
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {text}"


def check_trainable_source(name: str) -> None:
    """MODEL must be a full Hugging Face model: an existing folder or a Hub id, not an adapter folder,
    not a GGUF/CTranslate2 export."""
    if is_adapter_dir(name):
        raise UserError(f"MODEL {name} is an adapter folder; pass its base model (see its run_config.json "
                        f"'base_model') or merge it first with merge_bart_lora.py")
    path = resolve(name)
    if not path.exists() and not is_hub_id(str(name)):
        raise UserError(f"model not found: {path} does not exist; pass an existing model folder or a Hub id such as "
                        f"facebook/bart-large-cnn")
    if path.exists():
        backend = backend_for(path)
        if not backend.capabilities.training:
            raise UserError(f"MODEL {name} is a {backend.name} model (inference only); pass the Hugging Face model "
                            f"folder it was made from")


def use_4bit(requested: bool, allow_fallback: bool, device: torch.device) -> bool:
    """Whether to load the base in 4-bit: as requested, unless bitsandbytes cannot run here
    (an error, or full precision with ALLOW_CPU_FALLBACK)."""
    if not requested:
        return False
    problem = four_bit_problem(device)
    if problem and not allow_fallback:
        raise UserError(f"LOAD_IN_4BIT=True but bitsandbytes 4-bit does not work on this {device.type} "
                        f"({problem}); install bitsandbytes>=0.45, or pass --ALLOW_CPU_FALLBACK=True to "
                        f"train without 4-bit")
    if problem:
        print(f"4-bit unavailable on {device.type} ({problem}): training the full-precision model "
              f"(ALLOW_CPU_FALLBACK=True)")
    return not problem


def load_base(settings: TrainSettings, device: torch.device) -> Base:
    """Check the model's config against the settings, then load it and resolve the LoRA targets
    (every check that can fail runs before any weights are read where it can)."""
    check_trainable_source(settings.model)
    config = load_config(settings.model)
    family = family_of(config)
    check_lengths(config, family, settings.model, settings.max_input_length, settings.max_target_length)
    in_4bit = use_4bit(bool(settings.load_in_4bit), settings.allow_cpu_fallback, device)
    loaded = load_model(settings.model, load_in_4bit=in_4bit, device=device, for_training=True)
    targets = resolve_target_modules(loaded.model, settings.target_modules, family)
    return Base(loaded, family, in_4bit, targets)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name parts of every linear layer (what LoRA can target)."""
    from transformers.pytorch_utils import Conv1D
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and isinstance(module, (torch.nn.Linear, Conv1D))})


def normalize_targets(value) -> str | list[str] | None:
    """TARGET_MODULES as given on the command line: None/"auto", "all-linear", "a,b" or a list."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none")):
        return None
    if isinstance(value, str):
        if value.strip() == "all-linear":
            return "all-linear"
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v) for v in value]


def resolve_target_modules(model: torch.nn.Module, requested, family: str) -> str | list[str]:
    """The LoRA targets: the user's, or "all-linear", or the architecture's defaults."""
    requested = normalize_targets(requested)
    names = linear_module_names(model)
    model_type = arch.model_type(model.config)
    if requested == "all-linear":
        return requested
    if requested is None:
        default = family_of(family).default_lora_targets(model_type, names)
        if default:
            return default
        raise UserError(f"no default LoRA targets for model type {model_type!r}; set --TARGET_MODULES=all-linear "
                        f"or some of its linear modules: {', '.join(names)}")
    if not requested:
        raise UserError("TARGET_MODULES is empty; leave it unset for the defaults, or name linear modules")
    full_names = [name for name, _ in model.named_modules()]
    missing = [t for t in requested if t not in names and not any(n.endswith("." + t) for n in full_names)]
    if missing:
        raise UserError(f"TARGET_MODULES {', '.join(missing)} not found in {model_type!r}; its linear modules are: "
                        f"{', '.join(names)} (or use --TARGET_MODULES=all-linear)")
    return requested


def add_lora(loaded: LoadedModel, targets, r: int, alpha: int, dropout: float, in_4bit: bool,
             gradient_checkpointing: bool):
    """Wrap the base model with fresh LoRA adapters (QLoRA: after prepare_model_for_kbit_training)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    model = loaded.model
    if in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=TaskType(loaded.family.lora_task_type))
    model = get_peft_model(model, config)
    if in_4bit and loaded.device.type == "cpu":
        disable_cpu_bf16_kernels(model)  # else training stops silently after an eval's no-grad forward
    return model


def load_start_adapter(loaded: LoadedModel, adapter, in_4bit: bool, gradient_checkpointing: bool):
    """A finished adapter (OBJECTIVE=dpo|orpo's START_ADAPTER) on the base, trainable, under the
    name "default" (QLoRA: after prepare_model_for_kbit_training); its LoRA settings are its own."""
    from peft import PeftModel, prepare_model_for_kbit_training
    model = loaded.model
    if in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    if in_4bit and loaded.device.type == "cpu":
        disable_cpu_bf16_kernels(model)
    return model


def lora_facts(model) -> dict:
    """The trained adapter's LoRA settings, as the run record lists them."""
    config = model.peft_config["default"]
    targets = config.target_modules
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}
