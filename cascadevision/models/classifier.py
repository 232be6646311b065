"""Pieces shared by the ImageNet classifiers (EfficientViT, HAT-Net): stochastic depth, parameter counts, and
loading a reference checkpoint by name with errors that say what does not fit."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch for a random subset of the batch, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1, 1)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters (buffers such as BatchNorm running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def load_state_by_name(model: nn.Module, state: dict[str, Tensor], source: str | Path, *,
                       ignore_missing: tuple[str, ...] = (), classifier_keys: tuple[str, ...] = (),
                       strict_classes: bool = False) -> dict:
    """Copy `state` into `model` by parameter name; every disagreement is a CheckpointError naming the keys.

    `ignore_missing`: substrings of model keys that may be absent from `state` (derived buffers).
    `classifier_keys`: prefixes of layers whose shape depends on the number of classes; when their shapes differ
    they keep their initialisation and are listed under 'reinitialised' (unless `strict_classes`).
    Returns {'missing', 'unexpected', 'reinitialised'}.
    """
    own = model.state_dict()
    state = dict(state)
    reinitialised, mismatched = [], []
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            if not strict_classes and key.startswith(classifier_keys):
                reinitialised.append(key)
            else:
                mismatched.append(f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}")
            del state[key]
    if mismatched:
        raise CheckpointError(f"{source}: shape mismatch for {len(mismatched)} tensors: {'; '.join(mismatched[:5])}")
    missing = [k for k in own if k not in state and k not in reinitialised and not any(s in k for s in ignore_missing)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not fit this model: {len(missing)} missing ({', '.join(missing[:4])}), "
                              f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])})")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return {"missing": missing, "unexpected": unexpected, "reinitialised": reinitialised}
