"""Which precision a model runs in: one module for generation (the weights' dtype) and training
(autocast), over one probe of the CPU's bf16 support.

The probe (`cpu_bf16`): bf16 pays on a CPU only with native bf16 instructions (avx512_bf16,
amx_bf16, ARM bf16); without them bf16 matmuls are emulated and slower than fp32. torch's view of
the CPU is asked first, then /proc/cpuinfo's flags. `FTF_CPU_BF16=1` (or `0`) forces the answer,
for tests and for CI machines that must check both paths; every reason recorded then says it was
forced.

Generation (`--precision=auto|fp32|bf16` on the stages that generate; `resolve_precision`,
`precision_for`): on a GPU, auto keeps bf16 (fp16 where bf16 is missing). On a CPU, auto takes
bf16 only with native bf16 AND for the families whose measured quality did not change
(`AUTO_CPU_BF16`, see BENCHMARKS.md, "Generation"), else fp32. A CTranslate2 or GGUF export runs
the precision it was exported in.

Training (`--precision=auto|fp32|bf16|fp16`, `resolve_training_precision`): mixed precision is
always *autocast*: the base weights, the LoRA weights, their gradients and the AdamW state stay
fp32; matrix multiplications run in bf16 (or fp16) inside the forward and backward passes
(transformers' Trainer through accelerate with `bf16=True`; on a CPU with `use_cpu=True`,
`torch.autocast("cpu", torch.bfloat16)`), so the saved adapter is fp32. `auto`:
* CUDA: bf16 where the GPU supports it, else fp16 (with a gradient scaler).
* CPU: bf16 only with native bf16 AND where the measurements say the adapter is as good as an
  fp32 one: `CPU_BF16_MEASURED` lists the families measured (BENCHMARKS.md, "Training": SmolLM2
  on 350 DialogSum rows, one recipe trained in both precisions side by side: validation loss
  1.4942 vs 1.4932, ROUGE-L of the two adapters (evaluated in fp32) bf16 - fp32 = -0.23, CI
  [-1.47, +1.27]). In-training evaluations generate in fp32 even in a bf16 run (autocast off, as
  the evaluation stage generates; EVAL_PRECISION=autocast keeps the autocast). Seq2seq models
  (BART, T5) were not measured here (no weights offline), so `auto` keeps them fp32 on a CPU;
  `--precision=bf16` still works.
  Models under `CPU_BF16_MIN_PARAMETERS` stay fp32 too: for tiny matrices the casts cost more than
  bf16 saves (the tiny test models train ~1.4x slower in bf16, bench_training). A 4-bit (QLoRA)
  base on a CPU stays fp32 (bitsandbytes' CPU kernels are fp32 there).
Everywhere, an explicit `bf16` where the hardware has none (or `fp16` on a CPU, for training) is
one clear error: only `auto` falls back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.model.backends import backend_for, default_backend
from finetuneflow.model.device import default_dtype, parse_device
from finetuneflow.model.family import family_of
from finetuneflow.model.loading import adapter_base, is_adapter_dir, load_config

FORCE_ENV = "FTF_CPU_BF16"


# --- the probe ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU runs bf16 natively, and how that was decided."""
    native: bool
    feature: str | None = None     # the instruction set found (avx512_bf16, amx_bf16, ...)
    forced: bool = False           # FTF_CPU_BF16 gave the answer

    @property
    def source(self) -> str:
        """What decided it, for reasons: the feature, or the forcing variable."""
        return f"forced by {FORCE_ENV}={int(self.native)}" if self.forced else (self.feature or "not detected")


def _detected_feature() -> str | None:
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        capabilities = {}
    found = sorted(name for name, present in capabilities.items() if present and "bf16" in name)
    if found:
        return "amx_bf16" if "amx_bf16" in found else found[0]
    try:   # older torch: the kernel's own flags
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def cpu_bf16() -> CpuBf16:
    """This CPU's bf16 support: FTF_CPU_BF16=1/0 when set, else detected (see the module doc)."""
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise UserError(f"{FORCE_ENV}={forced!r}: use 1 (treat this CPU as having native bf16) or 0 (as not), "
                            f"or unset it to detect")
        return CpuBf16(forced == "1", None, forced=True)
    feature = _detected_feature()
    return CpuBf16(feature is not None, feature)


# --- generation: the weights' dtype ------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_SPEC = "[auto | fp32 | bf16]"
# Families for which `auto` takes bf16 on a CPU with bf16 instructions: only where the measured
# quality did not change (BENCHMARKS.md, "Generation": SmolLM2, 100 held-out DialogSum rows).
AUTO_CPU_BF16: frozenset[str] = frozenset()
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The weights' precision a stage asked for and the one it runs with, and why."""
    requested: str          # auto | fp32 | bf16
    used: str               # fp32 | bf16 | fp16 | 4-bit nf4 | the runtime's own (a .gguf's q8_0, ...)
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.used)

    def as_dict(self) -> dict:
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def _check_requested(requested: str) -> str:
    name = str(requested or "auto").strip().lower()
    if name not in PRECISIONS:
        raise UserError(f"--precision={requested!r} is not one of {', '.join(PRECISIONS)}")
    return name


def _cpu_weights(requested: str, family: str | None) -> Precision:
    probe = cpu_bf16()
    absent = (f"this CPU is treated as having no bf16 instructions ({probe.source})" if probe.forced
              else "this CPU has no bf16 instructions")
    if requested == "bf16":
        if not probe.native:
            raise UserError(f"--precision=bf16: {absent}{'' if probe.forced else ' (avx512_bf16 / amx_bf16)'}, so "
                            f"bf16 would be emulated and slower; use --precision=fp32 (or auto)")
        return Precision(requested, "bf16", f"--precision=bf16 ({probe.source})")
    if requested == "fp32":
        return Precision(requested, "fp32", "--precision=fp32")
    if not probe.native:
        return Precision(requested, "fp32", f"auto: {absent}")
    if family in AUTO_CPU_BF16:
        return Precision(requested, "bf16", f"auto: {probe.source}, and bf16 kept {family} summaries' quality")
    return Precision(requested, "fp32", f"auto: fp32 for {family or 'this'} models on a CPU (bf16 changed the "
                                        f"greedy summaries; pass --precision=bf16 for speed)")


def resolve_precision(requested: str, device=None, family: str | None = None,
                      load_in_4bit: bool = False) -> Precision:
    """The dtype to load a transformers model in (see the module doc). `--precision=bf16` where
    the hardware has no bf16 is one clear error; only `auto` falls back."""
    requested, device = _check_requested(requested), parse_device(device)
    if load_in_4bit:
        if requested != "auto":
            raise UserError(f"--precision={requested} applies to full-precision weights but LOAD_IN_4BIT=True loads "
                            f"4-bit weights; pass --load_in_4bit=false, or drop --precision")
        return Precision(requested, "4-bit nf4", "LOAD_IN_4BIT=True (4-bit weights, bitsandbytes)")
    if device.type != "cuda":
        return _cpu_weights(requested, family)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "bf16" and not native:
        raise UserError(f"--precision=bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; "
                        f"use --precision=auto (fp16 here) or fp32")
    if requested == "auto":
        used = "bf16" if default_dtype(device) == torch.bfloat16 else "fp16"
        return Precision(requested, used, f"auto on a GPU: {used}")
    return Precision(requested, requested, f"--precision={requested}")


def precision_for(model: str, requested: str, device=None, load_in_4bit: bool = False) -> Precision:
    """The precision to load `model` (a Hub id, folder or file) with: resolve_precision for a
    backend that loads weights in a chosen dtype; a CTranslate2 or GGUF export runs in the
    precision it was exported in."""
    requested = _check_requested(requested)
    path = resolve(model)
    backend = backend_for(path) if path.exists() else default_backend()
    if not backend.capabilities.precision:
        if requested != "auto":
            raise UserError(f"{model} is a {backend.name} model: its precision was fixed when it was exported; "
                            f"drop --precision={requested} (or export it again)")
        return Precision(requested, "runtime", f"{backend.name} runs the precision it was exported in")
    family = None
    try:
        base = adapter_base(model) if is_adapter_dir(model) else model
        family = str(family_of(load_config(base)))
    except UserError:
        pass   # the loader reports an unreadable model with its own message
    return resolve_precision(requested, device, family, load_in_4bit)


# --- training: autocast ------------------------------------------------------------------------
TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_MEASURED = frozenset({"causal"})   # families whose bf16-on-CPU adapters measured as good as fp32
CPU_BF16_MIN_PARAMETERS = 50_000_000         # smaller models: bf16 casts cost more than they save on a CPU


@dataclass(frozen=True)
class TrainingPrecision:
    requested: str          # auto | fp32 | bf16 | fp16
    mode: str               # fp32 | bf16 | fp16: what the Trainer runs
    reason: str             # why (printed and recorded)

    @property
    def bf16(self) -> bool:
        return self.mode == "bf16"

    @property
    def fp16(self) -> bool:
        return self.mode == "fp16"

    def describe(self) -> str:
        return "fp32" if self.mode == "fp32" else f"{self.mode} autocast (fp32 weights and optimizer)"

    def as_record(self) -> dict:
        return {"requested": self.requested, "mode": self.mode, "reason": self.reason}


def _training_found(probe: CpuBf16) -> str:
    if probe.forced:
        return f"this CPU is treated as having {'' if probe.native else 'no '}native bf16 ({probe.source})"
    if probe.native:
        return f"this CPU has native bf16 ({probe.feature})"
    return "this CPU has no native bf16 instructions (avx512_bf16 or AMX)"


def _cpu_training(requested: str, family: str, in_4bit: bool, parameters: int | None) -> TrainingPrecision:
    if requested == "fp16":
        raise UserError("--precision=fp16 needs a CUDA GPU (CPU autocast is bf16 only); use --precision=bf16 on a "
                        "CPU with native bf16, or fp32 / auto")
    probe = cpu_bf16()
    found = _training_found(probe)
    if requested == "bf16":
        if not probe.native:
            raise UserError(f"--precision=bf16: {found}, so bf16 would be emulated and slower than fp32; use "
                            f"--precision=fp32 or auto")
        return TrainingPrecision(requested, "bf16", f"asked for (--precision=bf16); {found}")
    if not probe.native:
        return TrainingPrecision(requested, "fp32", f"{found}: fp32")
    if in_4bit:
        return TrainingPrecision(requested, "fp32", f"{found}, but a 4-bit base on a CPU trains in fp32")
    if parameters is not None and parameters < CPU_BF16_MIN_PARAMETERS:
        return TrainingPrecision(requested, "fp32", f"{found}, but a model of {parameters / 1e6:.1f}M parameters "
                                                    f"trains faster in fp32 on a CPU (bf16 pays from "
                                                    f"~{CPU_BF16_MIN_PARAMETERS // 10**6}M)")
    if family not in CPU_BF16_MEASURED:
        return TrainingPrecision(requested, "fp32", f"{found}, but bf16 training of {family} models was not measured "
                                                    f"against fp32 here (pass --precision=bf16 to use it)")
    return TrainingPrecision(requested, "bf16", f"{found}; {family} adapters measured as good as fp32")


def resolve_training_precision(requested: str, device, family: str, in_4bit: bool,
                               parameters: int | None = None) -> TrainingPrecision:
    """The precision a training run uses (see the module doc)."""
    requested = str(requested or "auto").lower()
    if requested not in TRAINING_PRECISIONS:
        raise UserError(f"PRECISION={requested!r}: use one of {', '.join(TRAINING_PRECISIONS)}")
    if requested == "fp32":
        return TrainingPrecision(requested, "fp32", "asked for (--precision=fp32)")
    if getattr(device, "type", str(device)) != "cuda":
        return _cpu_training(requested, family, in_4bit, parameters)
    bf16_ok = torch.cuda.is_bf16_supported()
    if requested == "bf16" and not bf16_ok:
        raise UserError(f"--precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use "
                        f"--precision=fp16 or auto (fp16 there)")
    if requested == "auto":
        mode = "bf16" if bf16_ok else "fp16"
        return TrainingPrecision(requested, mode, f"GPU default ({'bf16 supported' if bf16_ok else 'no bf16: fp16'})")
    return TrainingPrecision(requested, requested, f"asked for (--precision={requested})")
