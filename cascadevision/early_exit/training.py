"""Training multi-exit models and learned exit gates.

Losses over the exits' logits z_1..z_K (each (N, C)) and labels y:

- fixed weights (BranchyNet, MSDNet with all weights 1):   L = sum_k w_k CE(z_k, y)
- SDN's schedule: internal exit k gets w_k(epoch) = min(0.01 + epoch * C_k / epochs, C_k), where C_k is the
  fraction of the full model's cost spent by the time exit k decides; the last exit keeps weight 1.
- all-subset aggregation (MUTATION): L = sum over the 2^K - 1 non-empty subsets S of CE(sum_{k in S} z_k, y),
  unweighted.
- confidence-gated training (CGT, Mokssit et al. 2025) replaces w_k by per-sample weights w_k * lambda_k^(i),
  L = (1/N) sum_i sum_k w_k lambda_k^(i) CE_k^(i), with lambda_1 = 1 and, for deeper exits,
    hard: lambda_k = prod_{j<k} [p_j(y_i) < tau]   (exit k learns a sample only if every earlier exit 'failed'
                                                   it: its probability of the true class was below tau)
    soft: lambda_k = prod_{j<k} (1 - p_j(y_i))     (the probability mass the earlier exits left on other classes)
  The paper's exact gating formulas could not be retrieved; these are our reading of "hard (binary)" and
  "soft (residual)" gating and are tested as written here. The weights carry no gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, TrainingError
from ..ops import standard_strides
from .config import ExitTrainConfig
from .models import MultiExitModel
from .policies import ExitGate

LOSSES = ("fixed", "sdn", "subsets")
GATINGS = ("none", "hard", "soft")


def sdn_weights(epoch: int, epochs: int, cost_fractions: Sequence[float]) -> list[float]:
    """SDN's per-exit weights at `epoch` (0-based): internal exits rise linearly to their cost fraction."""
    internal = [min(0.01 + epoch * c / epochs, c) for c in cost_fractions[:-1]]
    return internal + [1.0]


def subset_loss(all_logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """Sum over every non-empty subset S of the exits of CE(sum of S's logits, labels)."""
    k = len(all_logits)
    subsets = torch.tensor([[(mask >> j) & 1 for j in range(k)] for mask in range(1, 2 ** k)],
                           dtype=all_logits[0].dtype, device=all_logits[0].device)  # (2^K - 1, K)
    stacked = torch.stack(list(all_logits))  # (K, N, C)
    summed = torch.einsum("sk,knc->snc", subsets, stacked)  # (S, N, C)
    per_subset = F.cross_entropy(summed.flatten(0, 1), labels.repeat(subsets.shape[0]), reduction="none")
    return per_subset.view(subsets.shape[0], -1).mean(1).sum()


def confidence_gate_weights(all_logits: Sequence[Tensor], labels: Tensor, mode: str,
                            threshold: float = ExitTrainConfig.gating_threshold) -> Tensor:
    """CGT's per-sample weights lambda (K, N), detached: 1 for the first exit, then gated by the earlier exits."""
    if mode not in ("hard", "soft"):
        raise ConfigError(f"confidence gating must be 'hard' or 'soft', got {mode!r}")
    with torch.no_grad():
        true_prob = torch.stack([F.softmax(z.float(), -1).gather(1, labels[:, None])[:, 0] for z in all_logits])
        passed = (true_prob < threshold).float() if mode == "hard" else 1.0 - true_prob  # (K, N)
        ones = torch.ones_like(true_prob[:1])
        return torch.cat([ones, passed[:-1]]).cumprod(0)


def multi_exit_loss(all_logits: Sequence[Tensor], labels: Tensor, weights: Sequence[float],
                    loss: str = "fixed", gating: str = "none",
                    gating_threshold: float = ExitTrainConfig.gating_threshold) -> Tensor:
    """The training loss over all exits (see the module docstring); `weights` are the per-exit w_k."""
    if loss == "subsets":
        if gating != "none":
            raise ConfigError("confidence gating applies to per-exit losses, not to train.loss='subsets'")
        return subset_loss(all_logits, labels)
    per_exit = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in all_logits])  # (K, N)
    w = torch.as_tensor(list(weights), dtype=per_exit.dtype, device=per_exit.device)[:, None]
    if gating != "none":
        w = w * confidence_gate_weights(all_logits, labels, gating, gating_threshold)
    return (w * per_exit).sum(0).mean()


def exit_weights(cfg: ExitTrainConfig, epoch: int, num_exits: int, cost_fractions: Sequence[float]) -> list[float]:
    if cfg.loss == "sdn":
        return sdn_weights(epoch, cfg.epochs, cost_fractions)
    if cfg.exit_weights:
        if len(cfg.exit_weights) != num_exits:
            raise ConfigError(f"train.exit_weights has {len(cfg.exit_weights)} values for {num_exits} exits")
        return list(cfg.exit_weights)
    return [1.0] * num_exits


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random integer offset in [-max_shift, max_shift] (zero fill)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator))
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]  # (N, H, 1)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]  # (N, 1, W)
    shifted = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (N, H, W, C)
    # not .contiguous(): for C = 1 the permuted view already counts as contiguous, with odd strides (see ops.layout)
    return standard_strides(shifted.permute(0, 3, 1, 2))


def train_multi_exit(model: MultiExitModel, images: Tensor, labels: Tensor, cfg: ExitTrainConfig,
                     cost_fractions: Sequence[float], pixels_per_source_pixel: int = 1,
                     log: Callable[[str], None] | None = print) -> list[dict]:
    """Adam with a cosine schedule over `cfg.epochs`; returns one dict per epoch (loss, per-exit train acc)."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"train.loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.gating not in GATINGS:
        raise ConfigError(f"train.gating must be one of {', '.join(GATINGS)}, got {cfg.gating!r}")
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        weights = exit_weights(cfg, epoch, model.num_stages, cost_fractions)
        order = torch.randperm(len(labels), generator=generator)
        total, right = 0.0, torch.zeros(model.num_stages)
        for batch in order.split(cfg.batch_size):
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            x = random_shift(images[batch], cfg.shift * pixels_per_source_pixel, generator)
            y = labels[batch]
            all_logits = model(x)
            loss = multi_exit_loss(all_logits, y, weights, cfg.loss, cfg.gating, cfg.gating_threshold)
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch + 1}: the loss became {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
            right += torch.stack([(z.argmax(-1) == y).sum() for z in all_logits]).float()
        record = {"epoch": epoch + 1, "loss": total / len(labels),
                  "train_accuracy": (right / len(labels)).tolist(), "weights": weights}
        history.append(record)
        if log:
            accs = " ".join(f"{a:.3f}" for a in record["train_accuracy"])
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  train acc per exit {accs}")
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------------------
# learned gates


def gate_targets(all_logits: Sequence[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """(right_now, later_right), both (K, N) float: exit k's answer is right; some exit after k is right."""
    correct = torch.stack([z.argmax(-1) == labels for z in all_logits])  # (K, N)
    later = torch.zeros_like(correct)
    for k in range(len(all_logits) - 2, -1, -1):
        later[k] = later[k + 1] | correct[k + 1]
    return correct.float(), later.float()


def train_gates(all_logits: Sequence[Tensor], all_features: Sequence[Tensor] | None, labels: Tensor,
                hidden: int = 32, epochs: int = 200, lr: float = 1e-2, seed: int = 0) -> list[ExitGate]:
    """One gate per exit except the last, fitted (full batch, Adam, BCE) to precomputed exit outputs.

    Fit them on held-out data: on the training split the exits are right almost always, so a gate learns
    nothing. The model itself is not changed.
    """
    torch.manual_seed(seed)
    right_now, later_right = gate_targets(all_logits, labels)
    gates = []
    for k in range(len(all_logits) - 1):
        features = all_features[k].float() if all_features is not None else None
        gate = ExitGate(features.shape[1] if features is not None else 0, hidden)
        optimizer = torch.optim.Adam(gate.parameters(), lr=lr, weight_decay=1e-4)
        target = torch.stack([right_now[k], later_right[k]], dim=1)  # (N, 2)
        logits = all_logits[k].detach()
        for _ in range(epochs):
            loss = F.binary_cross_entropy_with_logits(gate(logits, features), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        gates.append(gate.eval())
    return gates

