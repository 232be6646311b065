"""Preprocessing inside the model (keep-ratio resize, normalisation, padding) and mapping results back."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import InputConfig
from ..errors import ConfigError
from ..ops import clip_boxes, paste_masks


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int, float]:
    """New (h, w) so the long side fits scale[0] and the short side scale[1], keeping the aspect ratio."""
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5), factor


class DetectionTransform(nn.Module):
    def __init__(self, cfg: InputConfig):
        super().__init__()
        self.scale = tuple(cfg.scale)
        self.size_divisor = cfg.size_divisor
        # images arrive in [0, 1]; the reference normalises on the 0-255 scale
        self.register_buffer("mean", torch.tensor(cfg.mean).view(3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(3, 1, 1) / 255.0, persistent=False)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        """Returns (batch (B,3,Hp,Wp), image_sizes [(h,w)] after resizing, scale_factors [(sx,sy)], targets).

        Target boxes are scaled to the resized image; masks stay at their resolution (the mask targets map
        boxes back with the scale factor instead of resizing every mask). An image whose target has
        `keep_size` set (training with `data.train_scales` or `data.lsj`: the data pipeline chose its scale)
        keeps its size.
        """
        _check_images(images)
        keep = [bool(t.get("keep_size", False)) for t in targets] if targets is not None else [False] * len(images)
        resized, sizes, factors = [], [], []
        for img, keep_size in zip(images, keep):
            h, w = img.shape[-2:]
            new_h, new_w = (h, w) if keep_size else rescale_size(h, w, self.scale)[:2]
            if (new_h, new_w) != (h, w):
                img = F.interpolate(img[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
            resized.append((img - self.mean.to(img.dtype)) / self.std.to(img.dtype))
            sizes.append((new_h, new_w))
            factors.append((new_w / w, new_h / h))
        d = self.size_divisor
        pad_h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        pad_w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = resized[0].new_zeros((len(images), 3, pad_h, pad_w))
        for i, img in enumerate(resized):
            batch[i, :, : img.shape[1], : img.shape[2]] = img
        if targets is not None:
            targets = [_scale_target(t, f) for t, f in zip(targets, factors)]
        return batch, sizes, factors, targets

    @staticmethod
    def postprocess(detections: list[dict], scale_factors, original_sizes, mask_thr: float,
                    mask_output: str = "full") -> list[dict]:
        """Boxes back to each original image's pixels; mask probabilities pasted and binarised at its size.

        mask_output "probs" leaves the pasting to the consumer (`ops.iter_pasted_masks`, a chunk at a time):
        `mask_probs` (N, h, w), the `image_size` (H, W) to paste them at and `mask_thr`, instead of `masks`.
        """
        if mask_output not in ("full", "probs"):
            raise ConfigError(f"model.roi_head.test.mask_output must be 'full' or 'probs', got {mask_output!r}")
        results = []
        for det, (sx, sy), size in zip(detections, scale_factors, original_sizes):
            scale = det["boxes"].new_tensor([sx, sy, sx, sy])
            boxes = clip_boxes(det["boxes"] / scale, size)
            out = {"boxes": boxes, "labels": det["labels"], "scores": det["scores"]}
            if "mask_probs" in det and mask_output == "probs":
                out.update(mask_probs=det["mask_probs"], image_size=tuple(size), mask_thr=mask_thr)
            elif "mask_probs" in det:
                out["masks"] = paste_masks(det["mask_probs"], boxes, size, threshold=mask_thr)
            results.append(out)
        return results


def _scale_target(target: dict, factor: tuple[float, float]) -> dict:
    sx, sy = factor
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = boxes * boxes.new_tensor([sx, sy, sx, sy])
    return out


def _check_images(images) -> None:
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("model input must be a non-empty list of (3, H, W) float tensors")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected a (3, H, W) RGB tensor, got {shape}")
        if not img.is_floating_point():
            raise ValueError(f"image {i}: expected float values in [0, 1], got dtype {img.dtype}")
