"""Pictures for people: predictions drawn on an image, and the training loss curve."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util

from .config import PREDICT_SCORE_THR
from .ops import iter_pasted_masks


def class_color(label: int) -> tuple[int, int, int]:
    """A bright colour fixed per class: hues spread by the golden ratio, so neighbouring labels differ."""
    hue = (0.1 + label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_predictions(image, prediction: dict, class_names: Sequence[str] | None = None,
                     score_thr: float = PREDICT_SCORE_THR, *, mask_alpha: float = 0.45) -> Image.Image:
    """The detections of `prediction` scoring >= `score_thr`, drawn on a copy of `image`.

    `image`: a uint8 tensor (3, H, W), a float tensor (3, H, W) in [0, 1], or a PIL image. `prediction`: a model
    output dict (`boxes`, `labels`, `scores`, optional `masks` (N, H, W), or `mask_probs` (N, h, w) with
    `mask_thr` from a model with `mask_output="probs"`, pasted here a chunk at a time and held as RLE, so a big
    photo needs no (N, H, W) tensor). Masks are filled translucently and outlined; boxes get a "name 0.93" tag on a patch of
    the class colour, with black or white text, whichever reads better on that colour. Higher scores are drawn
    on top.
    """
    canvas = _to_rgb_array(image)  # (H, W, 3) uint8
    height, width = canvas.shape[:2]
    scores = prediction["scores"].detach().float().cpu()
    keep = torch.nonzero(scores >= score_thr).flatten()
    keep = keep[scores[keep].argsort()]
    boxes = prediction["boxes"].detach().float().cpu()[keep].tolist()
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    scores = scores[keep].tolist()
    colors = [class_color(label) for label in labels]
    line_width = max(1, round(min(height, width) / 400))

    if ("masks" in prediction or "mask_probs" in prediction) and keep.numel():
        blended = canvas.astype(np.float32)
        for mask, color in zip(_masks_in_order(prediction, keep, (height, width)), colors):
            blended[mask] = blended[mask] * (1.0 - mask_alpha) + np.asarray(color, np.float32) * mask_alpha
            blended[mask & ~_erode(mask, line_width)] = color
        canvas = blended.round().astype(np.uint8)

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, round(min(height, width) / 45)))
    pad = max(1, line_width)
    for (x1, y1, x2, y2), label, score, color in zip(boxes, labels, scores, colors):
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line_width)
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tag_x = min(max(x1, 0), max(width - tag_w, 0))
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else max(y1, 0)  # above the box, or inside it at the top edge
        draw.rectangle([tag_x, tag_y, tag_x + tag_w, tag_y + tag_h], fill=color)
        draw.text((tag_x + pad - left, tag_y + pad - top), text, fill=_text_color(color), font=font)
    return picture


def plot_loss_curve(metrics_jsonl: str | Path, png_path: str | Path) -> Path:
    """Total and per-term losses against iteration, with the lr on a second axis, from a metrics.jsonl."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    entries = [e for e in entries if e.get("type", "train") == "train"]
    figure = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    iterations = [e["iteration"] for e in entries]
    loss_names = [k for k in (entries[-1] if entries else {}) if "loss" in k and k != "loss"]
    if entries:
        ax.plot(iterations, [e["loss"] for e in entries], color="black", linewidth=2, label="loss (total)")
        for name in loss_names:
            ax.plot(iterations, [e.get(name, float("nan")) for e in entries], linewidth=1, label=name)
        lr_axis = ax.twinx()
        lr_axis.plot(iterations, [e["lr"] for e in entries], color="grey", linestyle="--", linewidth=1, label="lr")
        lr_axis.set_ylabel("learning rate")
        lr_axis.legend(loc="upper center", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no training entries yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if entries:
        ax.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path)
    return png_path


def _to_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = (image.clamp(0, 1) * 255).round()
        return image.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    raise TypeError(f"image must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


def _masks_in_order(prediction: dict, keep: torch.Tensor, image_size: tuple[int, int]) -> Iterator[np.ndarray]:
    """The (H, W) bool masks of detections `keep`, one at a time in that order, from `masks` or `mask_probs`."""
    if "masks" in prediction:
        masks = prediction["masks"].detach().cpu()
        for index in keep.tolist():
            yield (masks[index] if masks.dtype == torch.bool else masks[index] >= 0.5).numpy()
        return
    # Paste all N as the model's full output does (iter_pasted_masks gives the very same pixels only for the
    # same N boxes), keep the kept ones as compressed RLE, then decode them one at a time in drawing order.
    size = tuple(prediction.get("image_size", image_size))
    if size != tuple(image_size):
        raise ValueError(f"the prediction's masks are for a {size[0]}x{size[1]} image, but the image is "
                         f"{image_size[0]}x{image_size[1]}")
    place = {index: k for k, index in enumerate(keep.tolist())}
    rles: list = [None] * len(place)
    for indices, chunk in iter_pasted_masks(prediction["mask_probs"].detach(), prediction["boxes"].detach(), size,
                                            prediction.get("mask_thr", 0.5)):
        for index, mask in zip(indices.tolist(), chunk.cpu()):
            if index in place:
                rles[place[index]] = mask_util.encode(np.asfortranarray(mask.numpy()[:, :, None].view(np.uint8)))[0]
    for rle in rles:
        yield mask_util.decode(rle).view(bool)  # (H, W)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary erosion, `steps` times (mask minus its erosion = its outline)."""
    eroded = mask.copy()
    for _ in range(steps):
        inner = eroded.copy()
        inner[1:] &= eroded[:-1]
        inner[:-1] &= eroded[1:]
        inner[:, 1:] &= eroded[:, :-1]
        inner[:, :-1] &= eroded[:, 1:]
        eroded = inner
    return eroded


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()
