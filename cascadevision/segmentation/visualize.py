"""Colour overlays of label maps: the image blended with each class's colour, and a legend strip."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..visualize import class_color

IGNORE_INDEX = 255


def color_labels(labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 (H, W, 3) with each class's colour; ignored / out-of-range pixels are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(min(num_classes, IGNORE_INDEX)):
        palette[label] = class_color(label)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return palette[labels.astype(np.int64).clip(0, 255)]


def draw_segmentation(image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], *,
                      alpha: float = 0.5, legend: bool = True) -> Image.Image:
    """`image` uint8 (3, H, W) (or float in [0, 1]) blended with the colours of `labels` (H, W); ignored pixels
    keep the image. With `legend`, a strip below lists the classes present, each on its colour."""
    if image.dtype.is_floating_point:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    canvas = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)  # (H, W, 3)
    labels_np = labels.cpu().numpy()
    colored = color_labels(labels_np, len(class_names)).astype(np.float32)
    painted = (labels_np != IGNORE_INDEX)[..., None]
    blended = np.where(painted, canvas * (1 - alpha) + colored * alpha, canvas)
    picture = Image.fromarray(blended.round().astype(np.uint8))
    if not legend:
        return picture
    present = [int(c) for c in np.unique(labels_np) if c != IGNORE_INDEX and c < len(class_names)]
    return _with_legend(picture, [(class_names[c], class_color(c)) for c in present])


def _with_legend(picture: Image.Image, entries: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    if not entries:
        return picture
    width, height = picture.size
    font = _font(max(10, min(width, 512) // 24))
    draw = ImageDraw.Draw(picture)
    pad = 3
    boxes = [draw.textbbox((0, 0), name, font=font) for name, _ in entries]
    line_h = max(b[3] - b[1] for b in boxes) + 2 * pad
    rows, x = 1, 0
    positions = []
    for (left, _, right, _) in boxes:  # flow the tags left to right, wrapping at the image width
        tag_w = right - left + 2 * pad
        if x and x + tag_w > width:
            rows, x = rows + 1, 0
        positions.append((x, (rows - 1) * line_h))
        x += tag_w + pad
    strip = Image.new("RGB", (width, height + rows * line_h), (255, 255, 255))
    strip.paste(picture, (0, 0))
    draw = ImageDraw.Draw(strip)
    for (name, color), (left, top, right, _), (x, y) in zip(entries, boxes, positions):
        y += height
        draw.rectangle([x, y, x + right - left + 2 * pad, y + line_h - 1], fill=color)
        r, g, b = color
        text_color = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
        draw.text((x + pad - left, y + pad - top), name, fill=text_color, font=font)
    return strip


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()
