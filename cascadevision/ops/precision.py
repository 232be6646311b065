"""Ops compute in the dtypes they choose (float32, or float64 for float64 input), under autocast too.

Autocast (`train.amp`, `--dtype bf16|fp16`) would otherwise run the matrix products inside the ops (RoIAlign's and
mask pasting's interpolation matmuls, NMS's suppression count) in half precision; the element-wise box
arithmetic (IoU, the box coder) is not autocast and already casts its inputs to float32.
"""
from __future__ import annotations

import torch


def autocast_off(device: torch.device) -> torch.autocast:
    """A context with autocast disabled on `device`'s type; wrap code that must run in the dtypes it picks."""
    return torch.autocast(device_type=device.type, enabled=False)
