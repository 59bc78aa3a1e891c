"""Which arithmetic a training run uses: `--precision=auto|fp32|bf16|fp16`, resolved once per run
and recorded (run_config.json "precision", train_metrics.json "precision").

Mixed precision here is always *autocast*: the base weights, the LoRA weights, their gradients
and the AdamW state stay fp32; matrix multiplications run in bf16 (or fp16) inside the forward
and backward passes. transformers' Trainer does this through accelerate when `bf16=True` (on a
CPU with `use_cpu=True`: `torch.autocast("cpu", torch.bfloat16)` around the model's forward), so
nothing is cast in place and the saved adapter is fp32.

`auto`:
* CUDA: bf16 where the GPU supports it, else fp16 (with a gradient scaler).
* CPU: bf16 only where the CPU has native bf16 instructions (avx512_bf16 or AMX) AND the
  measurements say the adapter is as good as an fp32 one: `CPU_BF16_MEASURED` lists the model
  families measured (BENCHMARKS.md, "Training": SmolLM2 on 350 DialogSum rows, one recipe trained
  in both precisions side by side: validation loss 1.4942 vs 1.4932, ROUGE-L of the two adapters
  (evaluated in fp32) bf16 - fp32 = -0.23, CI [-1.47, +1.27]). In-training evaluations of a bf16 run
  generate under bf16 autocast too, so compare them only with runs of the same precision.
  Seq2seq models (BART, T5) were not measured here
  (no weights offline), so `auto` keeps them fp32 on a CPU; `--precision=bf16` still works.
  Models under `CPU_BF16_MIN_PARAMETERS` stay fp32 too: for tiny matrices the casts cost more than
  bf16 saves (the tiny test models train ~1.4x slower in bf16, bench_training). A 4-bit (QLoRA)
  base on a CPU stays fp32 (bitsandbytes' CPU kernels are fp32 there).
An explicit `bf16` on a CPU without native bf16, or `fp16` on a CPU, is an error (only `auto`
falls back).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetuneflow.contract.errors import UserError

CHOICES = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_MEASURED = frozenset({"causal"})   # families whose bf16-on-CPU adapters measured as good as fp32
CPU_BF16_MIN_PARAMETERS = 50_000_000         # smaller models: bf16 casts cost more than they save on a CPU


@dataclass(frozen=True)
class Precision:
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


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU?, what was found): avx512_bf16 or AMX tiles, as torch sees them
    (falling back to /proc/cpuinfo's flags)."""
    import torch
    checks = {"avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              "amx": getattr(torch.cpu, "_is_amx_tile_supported", None)}
    found = [name for name, check in checks.items() if check is not None and check()]
    if not found:
        flags = _cpu_flags()
        found = [name for name in ("avx512_bf16", "amx_bf16") if name in flags]
    if found:
        return True, f"this CPU has native bf16 ({', '.join(found)})"
    return False, "this CPU has no native bf16 instructions (avx512_bf16 or AMX)"


def resolve_precision(requested: str, device, family: str, in_4bit: bool, parameters: int | None = None) -> Precision:
    """The precision this run trains in (see the module docstring)."""
    import torch
    requested = str(requested or "auto").lower()
    if requested not in CHOICES:
        raise UserError(f"PRECISION={requested!r}: use one of {', '.join(CHOICES)}")
    if requested == "fp32":
        return Precision(requested, "fp32", "asked for (--precision=fp32)")
    if getattr(device, "type", str(device)) == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16_ok:
            raise UserError(f"--precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use "
                            f"--precision=fp16 or auto (fp16 there)")
        if requested == "auto":
            mode = "bf16" if bf16_ok else "fp16"
            return Precision(requested, mode, f"GPU default ({'bf16 supported' if bf16_ok else 'no bf16: fp16'})")
        return Precision(requested, requested, f"asked for (--precision={requested})")
    if requested == "fp16":
        raise UserError("--precision=fp16 needs a CUDA GPU (CPU autocast is bf16 only); use --precision=bf16 on a "
                        "CPU with native bf16, or fp32 / auto")
    native, found = cpu_bf16_support()
    if requested == "bf16":
        if not native:
            raise UserError(f"--precision=bf16: {found}, so bf16 would be emulated and slower than fp32; use "
                            f"--precision=fp32 or auto")
        return Precision(requested, "bf16", f"asked for (--precision=bf16); {found}")
    if not native:
        return Precision(requested, "fp32", f"{found}: fp32")
    if in_4bit:
        return Precision(requested, "fp32", f"{found}, but a 4-bit base on a CPU trains in fp32")
    if parameters is not None and parameters < CPU_BF16_MIN_PARAMETERS:
        return Precision(requested, "fp32", f"{found}, but a model of {parameters / 1e6:.1f}M parameters trains faster "
                                            f"in fp32 on a CPU (bf16 pays from ~{CPU_BF16_MIN_PARAMETERS // 10**6}M)")
    if family not in CPU_BF16_MEASURED:
        return Precision(requested, "fp32", f"{found}, but bf16 training of {family} models was not measured "
                                            f"against fp32 here (pass --precision=bf16 to use it)")
    return Precision(requested, "bf16", f"{found}; {family} adapters measured as good as fp32")
