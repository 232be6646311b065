"""The handwritten digits that ship with scikit-learn (1,797 grey 8x8 images, 10 classes), with fixed splits.

Nothing is downloaded. Two variants:

- "digits": the images as they are, scaled to [0, 1];
- "digits_hard": every image gets its own severity s in [0, 1), then a Gaussian blur of sigma = 1.0 s pixels and
  additive Gaussian noise of std 0.25 s (on the 8x8 image, clipped to [0, 1]). Severity varies from image to
  image, so some are as easy as the originals and some are hard: the situation early exit is made for. Within
  each split the severities are stratified (one per 1/n-wide bin), so val and test see the same mix.

The split is stratified by class and fixed by the seed (the corruption too), train / val / test = 60 / 20 / 20 %
by default. `val` is for calibration and gate training; `test` is only for
reporting. Images are upsampled (bilinear) to `image_size` so that a convolution stage does real work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DatasetError
from ..ops import standard_strides
from .config import ExitDataConfig

DATASETS = ("digits", "digits_hard")
SOURCE_SIZE = 8


@dataclass
class DigitsSplit:
    images: Tensor  # (N, 1, S, S) float in [0, 1]
    labels: Tensor  # (N,) long
    indices: Tensor  # (N,) positions in scikit-learn's 1,797 images

    def __len__(self) -> int:
        return self.labels.shape[0]


def _load_sklearn_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits  # lazy on purpose: scikit-learn is an optional dependency
    except ImportError:
        raise DatasetError("the digits dataset comes with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8), in [0, 1]
    return images, torch.tensor(digits.target, dtype=torch.long)


def corrupt(images: Tensor, severity: Tensor, generator: torch.Generator, max_blur: float = 1.0,
            max_noise: float = 0.25) -> Tensor:
    """Blur (sigma = max_blur * severity) then add noise (std = max_noise * severity), per image. images: (N, 8, 8)."""
    n = images.shape[0]
    sigma = (max_blur * severity).clamp_min(1e-3)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel_1d = torch.exp(-taps[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum(1, keepdim=True)  # (N, 5)
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :])[:, None]  # (N, 1, 5, 5)
    blurred = F.conv2d(images[None], kernel, padding=2, groups=n)[0]  # each image with its own kernel
    noise = torch.randn(images.shape, generator=generator) * (max_noise * severity)[:, None, None]
    return (blurred + noise).clamp(0.0, 1.0)


def stratified_severity(n: int, generator: torch.Generator) -> Tensor:
    """n severities in [0, 1), one in each of n equal bins, in random order: every split gets the same mix."""
    return (torch.randperm(n, generator=generator) + torch.rand(n, generator=generator)) / n


def split_indices(labels: Tensor, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """Stratified train/val/test index sets, fixed by `seed`."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction must be below 1, got {val_fraction} + {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    for c in labels.unique():
        members = torch.nonzero(labels == c)[:, 0]
        members = members[torch.randperm(len(members), generator=generator)]
        n_test, n_val = round(len(members) * test_fraction), round(len(members) * val_fraction)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    return {name: torch.cat(idx).sort().values for name, idx in parts.items()}


def load_digits_splits(cfg: ExitDataConfig | None = None) -> dict[str, DigitsSplit]:
    """{'train', 'val', 'test'} splits of the configured digits variant."""
    cfg = cfg or ExitDataConfig()
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    if cfg.image_size < SOURCE_SIZE:
        raise ConfigError(f"data.image_size must be at least {SOURCE_SIZE}, got {cfg.image_size}")
    images, labels = _load_sklearn_digits()
    splits = {}
    for i, (name, idx) in enumerate(split_indices(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed).items()):
        split_images = images[idx]
        if cfg.dataset == "digits_hard":
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + i + 1)
            split_images = corrupt(split_images, stratified_severity(len(idx), generator), generator)
        split_images = split_images[:, None]  # (N, 1, 8, 8)
        if cfg.image_size != SOURCE_SIZE:
            split_images = F.interpolate(split_images, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                         align_corners=False)
        splits[name] = DigitsSplit(standard_strides(split_images), labels[idx], idx)
    return splits
