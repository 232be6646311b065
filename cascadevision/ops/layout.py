"""Memory layout: tensors with strides that every backend reads the same way.

A tensor with a size-1 dimension can carry any stride there: a 1-channel batch permuted from NHWC, (N, 1, H, W)
with strides (H*W, 1, W, 1), counts as both contiguous and channels-last, so `.contiguous()` leaves it as it is,
and torch hands it to oneDNN's channels-last kernels. With one thread, a backward pass through a ResNet on such
batches corrupted the heap (torch 2.13 CPU: "corrupted size vs. prev_size", an abort); the same values with the
standard strides, (H*W, H*W, W, 1), run clean.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["contiguous_strides", "standard_strides"]


def contiguous_strides(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The strides of a new row-major tensor of `shape`: each dim's stride is the product of the later sizes."""
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def standard_strides(x: Tensor) -> Tensor:
    """`x` with exactly the strides of a new row-major tensor: `x` itself when it has them, else a copy.

    Unlike `.contiguous()`, this also copies a tensor whose only odd strides belong to size-1 dims.
    """
    if x.stride() == contiguous_strides(x.shape):
        return x
    return x.clone(memory_format=torch.contiguous_format)
