"""Mixed precision: the names `train.amp` and `--dtype` take, and the autocast context they mean.

bf16 autocast runs on CPU and CUDA; fp16 on CUDA only (training adds loss scaling, `torch.amp.GradScaler`).
Under autocast the convolutions and linear layers run in half precision; the heads return float32 logits and
deltas, and the ops (RoIAlign, NMS, mask pasting, the box coder, IoU) compute in float32 whatever the autocast
state (`cascadevision.ops.precision`).
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError

DTYPES = {"none": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype `name` ("none"/"fp32", "bf16", "fp16") means on `device`; None: no autocast."""
    if name not in DTYPES:
        raise ConfigError(f"{key}: unknown precision '{name}'; valid: none (or fp32), bf16, fp16")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(f"{key}: fp16 runs on CUDA only; use bf16 on {device.type}")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}: this GPU has no bf16 support; use fp16")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` on `device` in `dtype`, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
