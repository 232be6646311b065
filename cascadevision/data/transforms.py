"""Training-time transforms on `(image, target)` pairs.

Each transform updates the image and every spatial entry of the target together: `boxes` (N, 4) x1y1x2y2,
`masks` (N, H, W) and `semantic` (H, W). Randomness comes from torch's RNG, so `torch.manual_seed` (and the
DataLoader's per-worker seeding) makes a run reproducible.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

Target = dict[str, Any]


class Compose:
    def __init__(self, transforms: Sequence[Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()).item() >= self.p:
            return image, target
        return hflip(image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror left-right: x1' = W - x2, x2' = W - x1."""
    width = image.shape[-1]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, 0] = width - target["boxes"][:, 2]
        boxes[:, 2] = width - target["boxes"][:, 0]
        target["boxes"] = boxes
    for key in ("masks", "semantic"):
        if key in target:
            target[key] = target[key].flip(-1)
    return image.flip(-1), target


class Resize:
    """Resize to `scale`.

    keep_ratio=True: `scale` is (long_max, short_max) and the factor is min(long_max / long, short_max / short),
    as in the reference. keep_ratio=False: `scale` is (width, height) and the image is stretched to it.
    Bilinear for the image, nearest for masks and semantic maps; boxes are scaled by the actual size ratios.
    """

    def __init__(self, scale: tuple[int, int] = (1333, 800), keep_ratio: bool = True):
        self.scale = tuple(scale)
        self.keep_ratio = keep_ratio

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        if self.keep_ratio:
            new_height, new_width = rescaled_size(height, width, self.scale)
        else:
            new_width, new_height = self.scale
        return resize(image, target, new_height, new_width)

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio})"


class RandomResize:
    """Multi-scale training: a keep-ratio `Resize` to a scale drawn for each image.

    mode="choice": one of `scales` (each (long, short)) uniformly. mode="range": `scales` holds two scales and
    the long and short sides are drawn independently between them (the reference's `multiscale_mode='range'`).
    """

    def __init__(self, scales: Sequence[tuple[int, int]], mode: str = "choice"):
        if mode not in ("choice", "range"):
            raise ValueError(f"RandomResize mode must be 'choice' or 'range', got {mode!r}")
        if not scales or (mode == "range" and len(scales) != 2):
            raise ValueError(f"RandomResize needs at least one scale (exactly two for mode='range'), got {scales!r}")
        self.scales = [tuple(s) for s in scales]
        self.mode = mode

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if self.mode == "choice":
            scale = self.scales[int(torch.randint(len(self.scales), ()).item())]
        else:
            (long_a, short_a), (long_b, short_b) = self.scales
            scale = (_randint_between(long_a, long_b), _randint_between(short_a, short_b))
        height, width = image.shape[-2:]
        new_height, new_width = rescaled_size(height, width, scale)
        return resize(image, target, new_height, new_width)

    def __repr__(self) -> str:
        return f"RandomResize(scales={self.scales}, mode={self.mode!r})"


def _randint_between(a: int, b: int) -> int:
    low, high = min(a, b), max(a, b)
    return int(torch.randint(low, high + 1, ()).item())


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_height, new_width) for a keep-ratio resize: long side <= scale[0], short side <= scale[1]."""
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize(image: torch.Tensor, target: Target, new_height: int, new_width: int) -> tuple[torch.Tensor, Target]:
    """Resize image (bilinear) and target (boxes scaled, masks and semantic nearest) to the given size."""
    height, width = image.shape[-2:]
    if (new_height, new_width) == (height, width):
        return image, target
    dtype = image.dtype
    resized = F.interpolate(image[None].float(), size=(new_height, new_width), mode="bilinear",
                            align_corners=False)[0]
    if not dtype.is_floating_point:
        resized = resized.round_().clamp_(0, 255)
    image = resized.to(dtype)

    target = dict(target)
    if "boxes" in target:
        scale = torch.tensor([new_width / width, new_height / height] * 2, dtype=target["boxes"].dtype)
        boxes = target["boxes"] * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_height)
        target["boxes"] = boxes
    if "masks" in target:
        masks = target["masks"]
        if masks.shape[0] == 0:
            target["masks"] = masks.new_zeros((0, new_height, new_width))
        else:
            target["masks"] = F.interpolate(masks[None], size=(new_height, new_width), mode="nearest")[0]
    if "semantic" in target:
        target["semantic"] = F.interpolate(target["semantic"][None, None], size=(new_height, new_width),
                                           mode="nearest")[0, 0]
    return image, target


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """DataLoader collate: images differ in size, so keep lists (the model pads them into one batch)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
