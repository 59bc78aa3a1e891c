"""The machines a plan is made for: GPU specifications, recognising a GPU by name, and the target
(the user's GPU_NAME / GPU_MEMORY_GB, else this machine's GPU and its free memory, else its CPU).

Relative speed = sqrt(dense fp16 TFLOPS ratio x memory bandwidth ratio) to a T4: training is
compute-bound, generation bandwidth-bound, and the geometric mean weighs both. GB = 10^9 bytes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from finetuneflow.contract.errors import UserError

GB = 1e9


def one_line(text) -> str:
    """`text` as one printable line: runs of whitespace (newlines, carriage returns, Unicode line
    separators) become one space and other control characters are dropped."""
    return "".join(c for c in " ".join(str(text).split()) if c.isprintable())


@dataclass(frozen=True)
class GpuSpec:
    memory_gb: float       # nominal memory
    tflops: float          # dense fp16/bf16 tensor-core TFLOPS (no sparsity)
    bandwidth_gbs: float   # memory bandwidth
    bf16: bool

    @property
    def relative_speed(self) -> float:
        """Speed relative to a T4: sqrt(TFLOPS ratio x bandwidth ratio)."""
        t4 = GPUS["T4"]
        return math.sqrt(self.tflops / t4.tflops * self.bandwidth_gbs / t4.bandwidth_gbs)


GPUS = {  # vendor datasheets
    "T4": GpuSpec(16, 65, 320, False),
    "L4": GpuSpec(24, 121, 300, True),
    "A10": GpuSpec(24, 125, 600, True),
    "A100": GpuSpec(40, 312, 1555, True),
    "A100-80GB": GpuSpec(80, 312, 2039, True),
    "H100": GpuSpec(80, 989, 3350, True),
    "H200": GpuSpec(141, 989, 4800, True),
}


def match_gpu(name: str | None) -> str | None:
    """The GPUS key for a device or user-given name ("Tesla T4", "NVIDIA A100-SXM4-80GB", "a10g")."""
    if not name:
        return None
    text = name.upper().replace("_", "-")
    for key, pattern in (("A100-80GB", r"A100.*80\s*G"), ("A100", r"A100"), ("H200", r"H200"),
                         ("H100", r"H100"), ("A10", r"\bA10G?\b"), ("L4", r"\bL4\b"), ("T4", r"\bT4\b")):
        if re.search(pattern, text):
            return key
    return None


def gpu_key(name: str) -> str:
    key = match_gpu(name)
    if key is None:
        raise UserError(f"unknown GPU_NAME {name!r}; known GPUs: {', '.join(GPUS)} (or leave GPU_NAME "
                        f"empty to detect this machine's GPU)")
    return key


@dataclass
class Target:
    """The machine a plan is made for."""
    name: str                 # what the user gave or the device reported
    key: str | None           # GPUS key, "CPU", or None for an unrecognised GPU
    memory_gb: float          # memory the plan may fill (before MEMORY_MARGIN)
    source: str               # "GPU_NAME", "detected", "GPU_MEMORY_GB"
    device: str               # "cuda" or "cpu"

    @property
    def relative_speed(self) -> float | None:
        return GPUS[self.key].relative_speed if self.key in GPUS else None


def resolve_target(gpu_name: str = "", gpu_memory_gb: float | None = None) -> Target:
    """GPU_NAME / GPU_MEMORY_GB when given, else this machine's GPU (free memory), else its CPU (available RAM)."""
    gpu_name = one_line(gpu_name or "")
    if gpu_name:
        key = gpu_key(gpu_name)
        memory = gpu_memory_gb or GPUS[key].memory_gb
        return Target(gpu_name, key, float(memory), "GPU_NAME" + (" + GPU_MEMORY_GB" if gpu_memory_gb else ""), "cuda")
    import torch
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, _total = torch.cuda.mem_get_info(0)
        return Target(name, match_gpu(name), float(gpu_memory_gb or free / GB),
                      "GPU_MEMORY_GB" if gpu_memory_gb else "detected: free GPU memory", "cuda")
    if gpu_memory_gb:
        return Target("unnamed GPU", None, float(gpu_memory_gb), "GPU_MEMORY_GB", "cuda")
    import psutil
    return Target("CPU", "CPU", psutil.virtual_memory().available / GB, "detected: available RAM", "cpu")


def device_speed(device_name: str | None) -> tuple[str | None, float | None]:
    """(key, relative speed) of the device a benchmark ran on; CPU has no GPU-relative speed."""
    if not device_name:
        return None, None
    if str(device_name).lower().startswith("cpu"):
        return "CPU", None
    key = match_gpu(device_name)
    return key, (GPUS[key].relative_speed if key else None)
