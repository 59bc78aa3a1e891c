"""Devices and default dtypes for torch models (the transformers backend, training, merging)."""
from __future__ import annotations

import torch

from finetuneflow.contract.errors import UserError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_device(device) -> torch.device:
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"DEVICE={device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"DEVICE={device!r} but no CUDA GPU is available here; use --DEVICE=cpu or leave it unset")
    return parsed
