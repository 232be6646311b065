"""Training-time transforms on `(image, target)` pairs.

Each transform updates the image and every spatial entry of the target together: `boxes` (N, 4) x1y1x2y2,
`masks` (N, H, W) and `semantic` (H, W). Randomness comes from torch's RNG, so `torch.manual_seed` (and the
DataLoader's per-worker seeding) makes a run reproducible.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..config import DataConfig

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
    Bilinear for the image, nearest (pixel centres) for masks and semantic maps; boxes are scaled by the actual
    size ratios.
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
    """Multi-scale training: a keep-ratio `Resize` to a scale drawn for each image (MMDetection's
    `RandomChoiceResize` / `RandomResize`).

    Each scale is (long, short) (long side <= long, short side <= short) or (short,): the short side becomes
    `short`, whatever the long side. mode="choice": one of `scales` uniformly. mode="range": `scales` holds two
    scales of one kind; the long and short sides are drawn independently between them (the reference's
    `multiscale_mode='range'`): short sides only, the short side is drawn between them.
    """

    def __init__(self, scales: Sequence[Sequence[int]], mode: str = "choice"):
        if mode not in ("choice", "range"):
            raise ValueError(f"RandomResize mode must be 'choice' or 'range', got {mode!r}")
        if not scales or (mode == "range" and len(scales) != 2):
            raise ValueError(f"RandomResize needs at least one scale (exactly two for mode='range'), got {scales!r}")
        self.scales = [tuple(s) for s in scales]
        if any(len(s) not in (1, 2) for s in self.scales) or (mode == "range" and len(set(map(len, self.scales))) > 1):
            raise ValueError(f"RandomResize scales are (long, short) pairs or short sides (one kind for "
                             f"mode='range'), got {scales!r}")
        self.mode = mode

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if self.mode == "choice":
            scale = self.scales[int(torch.randint(len(self.scales), ()).item())]
        else:
            scale = tuple(_randint_between(a, b) for a, b in zip(*self.scales))
        height, width = image.shape[-2:]
        new_height, new_width = rescaled_size(height, width, scale)
        return resize(image, target, new_height, new_width)

    def __repr__(self) -> str:
        return f"RandomResize(scales={self.scales}, mode={self.mode!r})"


def _randint_between(a: int, b: int) -> int:
    low, high = min(a, b), max(a, b)
    return int(torch.randint(low, high + 1, ()).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


def rescaled_size(height: int, width: int, scale: tuple[int, ...]) -> tuple[int, int]:
    """(new_height, new_width) for a keep-ratio resize: long side <= scale[0], short side <= scale[1]; a
    one-number scale (short,) sets the short side to it."""
    if len(scale) == 1:
        factor = scale[0] / min(height, width)
    else:
        long_max, short_max = max(scale), min(scale)
        factor = min(long_max / max(height, width), short_max / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class LargeScaleJitter:
    """Large-scale jitter (Ghiasi et al. 2021; MMDetection's LSJ recipe): a keep-ratio resize so the image fits
    a square of side `output_size * r`, r drawn uniformly from `scale_range`, then a random `output_size`
    square crop where the image is larger. Where it is smaller nothing is added here: the model's batch padding
    pads it (bottom and right, as the reference's `Pad`), and the image size the model records stays the
    content's, as MMDetection's `img_shape` does.

    Boxes are shifted and clipped to the crop; an instance whose clipped box or cropped mask has no area left
    is dropped (with its label and mask); masks and the semantic map are cropped with the image. The image's
    `target["keep_size"]` is set: the model's transform then keeps this size instead of resizing to
    `model.input.scale`.
    """

    def __init__(self, output_size: int, scale_range: tuple[float, float] = (0.1, 2.0)):
        if output_size < 1 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"LargeScaleJitter needs output_size >= 1 and 0 < scale_range[0] <= scale_range[1], "
                             f"got {output_size}, {scale_range}")
        self.output_size = int(output_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        side = self.output_size * _uniform(*self.scale_range)
        height, width = image.shape[-2:]
        factor = side / max(height, width)
        image, target = resize(image, target, max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
        height, width = image.shape[-2:]
        crop_h, crop_w = min(self.output_size, height), min(self.output_size, width)
        top = int(torch.randint(height - crop_h + 1, ()).item())
        left = int(torch.randint(width - crop_w + 1, ()).item())
        image, target = crop(image, target, top, left, crop_h, crop_w)
        return image, {**target, "keep_size": True}

    def __repr__(self) -> str:
        return f"LargeScaleJitter(output_size={self.output_size}, scale_range={self.scale_range})"


def crop(image: torch.Tensor, target: Target, top: int, left: int, height: int, width: int
         ) -> tuple[torch.Tensor, Target]:
    """Rows top..top+height-1 and columns left..left+width-1 of the image, masks and semantic map; boxes shifted
    and clipped to them. Instances left with no box area, or with an empty mask, are dropped."""
    image = image[:, top:top + height, left:left + width]
    target = dict(target)
    if "semantic" in target:
        target["semantic"] = target["semantic"][top:top + height, left:left + width]
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + height, left:left + width]
    if "boxes" in target:
        boxes = target["boxes"] - target["boxes"].new_tensor([left, top, left, top])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if "masks" in target and len(target["masks"]) == len(boxes):
            keep &= (target["masks"].flatten(1) != 0).any(1)
        target["boxes"] = boxes[keep]
        for key in ("labels", "masks"):
            if key in target and len(target[key]) == len(keep):
                target[key] = target[key][keep]
    return image, target


class PhotoMetricDistortion:
    """Colour jitter as MMDetection's `PhotoMetricDistortion`, on (3, H, W) RGB images in [0, 1]; boxes, masks
    and labels are untouched. Each step happens with probability 1/2, in this order: brightness (add a value
    in +-brightness_delta, on the 0-255 scale), contrast (multiply by a value in contrast_range) either here or
    after the colour steps (a coin decides), saturation (multiply HSV saturation by a value in
    saturation_range), hue (shift by up to +-hue_delta degrees), then swap the channels in a random order.
    Unlike the reference, values are clipped to [0, 1] after each step (the images here are [0, 1] floats)."""

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: float = 18):
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = float(hue_delta)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        def coin() -> bool:
            return bool(torch.randint(2, ()).item())

        image = image.float()
        if coin():
            image = (image + _uniform(-self.brightness_delta, self.brightness_delta) / 255.0).clamp(0, 1)
        contrast_last = coin()
        if not contrast_last and coin():
            image = (image * _uniform(*self.contrast_range)).clamp(0, 1)
        if coin():
            hue, saturation, value = rgb_to_hsv(image)
            image = hsv_to_rgb(hue, (saturation * _uniform(*self.saturation_range)).clamp(0, 1), value)
        if coin():
            hue, saturation, value = rgb_to_hsv(image)
            image = hsv_to_rgb((hue + _uniform(-self.hue_delta, self.hue_delta) / 360.0) % 1.0, saturation, value)
        if contrast_last and coin():
            image = (image * _uniform(*self.contrast_range)).clamp(0, 1)
        if coin():
            image = image[torch.randperm(3)]
        return image, target

    def __repr__(self) -> str:
        return (f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, "
                f"contrast_range={self.contrast_range}, saturation_range={self.saturation_range}, "
                f"hue_delta={self.hue_delta})")


def rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, H, W) RGB in [0, 1] -> hue in [0, 1) (fraction of a turn), saturation, value, each (H, W)."""
    red, green, blue = image
    value, argmax = image.max(0)
    chroma = value - image.min(0).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = chroma.clamp_min(1e-12)
    hue = torch.stack([((green - blue) / safe) % 6, (blue - red) / safe + 2, (red - green) / safe + 4])
    hue = hue.gather(0, argmax[None])[0] / 6.0
    return torch.where(chroma > 0, hue, torch.zeros_like(hue)) % 1.0, saturation, value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_hsv`: f(n) = v - v s max(0, min(k, 4 - k, 1)), k = (n + 6 h) mod 6, n = 5, 3, 1."""
    channels = [value - value * saturation * (4 - k).minimum(k).clamp(0, 1)
                for k in ((n + 6 * hue) % 6 for n in (5.0, 3.0, 1.0))]
    return torch.stack(channels)


def resize(image: torch.Tensor, target: Target, new_height: int, new_width: int) -> tuple[torch.Tensor, Target]:
    """Resize image (bilinear) and target (boxes scaled, masks and semantic nearest) to the given size.

    Masks and semantic maps take the source pixel under each new pixel's centre ("nearest-exact"), the same
    pixel-centre convention as the bilinear image resize, so they stay on the image's pixels; torch's "nearest"
    (and OpenCV's INTER_NEAREST, which MMDetection uses) pick floor(i * scale) and drift by up to a pixel."""
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
            target["masks"] = F.interpolate(masks[None], size=(new_height, new_width), mode="nearest-exact")[0]
    if "semantic" in target:
        target["semantic"] = F.interpolate(target["semantic"][None, None], size=(new_height, new_width),
                                           mode="nearest-exact")[0, 0]
    return image, target


def train_transforms(data: DataConfig) -> Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]:
    """The detection training pipeline a data config asks for: [large-scale jitter | multi-scale resize]
    [photometric distortion] horizontal flip. With the augmentation options off it is the flip alone (the
    model's transform then resizes every image to `model.input.scale`). The resizing transforms mark their
    images `keep_size`, so the model trains at the scale they chose."""
    steps: list = []
    if data.lsj.output_size > 0:
        steps.append(LargeScaleJitter(data.lsj.output_size, data.lsj.scale_range))
    elif data.train_scales:
        steps.append(_KeepSize(RandomResize(data.train_scales, data.scale_mode)))
    if data.photometric.enabled:
        p = data.photometric
        steps.append(PhotoMetricDistortion(p.brightness_delta, p.contrast_range, p.saturation_range, p.hue_delta))
    flip = RandomHorizontalFlip(data.flip_prob)
    return Compose([*steps, flip]) if steps else flip


class _KeepSize:
    """Runs a resizing transform and marks the result `keep_size` for the model's transform."""

    def __init__(self, transform: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]):
        self.transform = transform

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        image, target = self.transform(image, target)
        return image, {**target, "keep_size": True}

    def __repr__(self) -> str:
        return f"{self.transform!r} (keep_size)"


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """DataLoader collate: images differ in size, so keep lists (the model pads them into one batch)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
