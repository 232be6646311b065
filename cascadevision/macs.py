"""Multiply-accumulate counting, on top of PyTorch's own FLOP counter.

`torch.utils.flop_counter.FlopCounterMode` counts the matrix work of a forward pass (convolutions, linear
layers, matmul/bmm/einsum, scaled-dot-product attention) and nothing elementwise; every such FLOP count is
2 x the multiply-accumulates, so MACs = FLOPs / 2. This is the convention of the papers we compare with
(EfficientViT's "FLOPs", MSDNet's and SDN's costs): BatchNorm, activations and pooling are not counted.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_macs(fn: Callable | torch.nn.Module, *args: Any, **kwargs: Any) -> int:
    """MACs of one call `fn(*args, **kwargs)` (run under no_grad)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2


def macs_by_module(module: torch.nn.Module, *args: Any, depth: int = 1, **kwargs: Any) -> dict[str, int]:
    """MACs per submodule (names up to `depth` levels, e.g. 'backbone', 'roi_head'), plus 'total'."""
    with torch.no_grad(), FlopCounterMode(display=False, depth=depth) as counter:
        module(*args, **kwargs)
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and name.count(".") < depth:
            out[name.split(".", 1)[-1] if "." in name else name] = sum(ops.values()) // 2
    out["total"] = counter.get_total_flops() // 2
    return out
