"""Pictures for people: predictions drawn on an image, and the training loss curve."""
from __future__ import annotations

import colorsys
import json
import re
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
    on top, and their tags are placed first: a tag that would cover another is moved (inside the box, below
    it) or, with no free spot, left out.
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
    texts = []
    for label, score in zip(labels, scores):
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        texts.append(f"{name} {score:.2f}")
    sizes = []  # (text offset, tag width, tag height)
    for text in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append(((left, top), right - left + 2 * pad, bottom - top + 2 * pad))
    tags = _place_tags(boxes, [(w, h) for _, w, h in sizes], (width, height))
    for (x1, y1, x2, y2), color in zip(boxes, colors):
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line_width)
    for index, place in enumerate(tags):  # after every box, so no outline crosses a tag
        if place is None:
            continue
        (left, top), tag_w, tag_h = sizes[index]
        tag_x, tag_y = place
        draw.rectangle([tag_x, tag_y, tag_x + tag_w, tag_y + tag_h], fill=colors[index])
        draw.text((tag_x + pad - left, tag_y + pad - top), texts[index], fill=_text_color(colors[index]), font=font)
    return picture


def _place_tags(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]],
                image_size: tuple[int, int]) -> list[tuple[float, float] | None]:
    """Where each box's tag goes: its top-left corner, or None to leave the tag out.

    Boxes come in ascending score order; the highest scores are placed first and get the first free spot of:
    above the box, inside its top edge, below the box, inside its bottom edge (each kept inside the image).
    A tag that would overlap one already placed in all four spots is left out, so tags never cover each other.
    """
    width, height = image_size
    placed: list[tuple[float, float, float, float]] = []
    tags: list[tuple[float, float] | None] = [None] * len(boxes)
    for index in reversed(range(len(boxes))):
        x1, y1, x2, y2 = boxes[index]
        tag_w, tag_h = sizes[index]
        x = min(max(x1, 0), max(width - tag_w, 0))
        for y in (y1 - tag_h, y1, y2, y2 - tag_h):
            y = min(max(y, 0), max(height - tag_h, 0))
            spot = (x, y, x + tag_w, y + tag_h)
            if not any(spot[0] < o[2] and o[0] < spot[2] and spot[1] < o[3] and o[1] < spot[3] for o in placed):
                placed.append(spot)
                tags[index] = (x, y)
                break
    return tags


_STAGE_TERM = re.compile(r"s(\d+)\.loss_(\w+)")
_STAGE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
_TERM_STYLES = {"cls": "-", "bbox": "--", "mask": "-"}


def loss_panels(loss_names: Sequence[str]) -> dict[str, list[tuple[str, str, str]]]:
    """The loss terms of a metrics.jsonl grouped into panels: {panel title: [(key, legend label, colour + style)]}.

    RPN (classification, box); box per stage (classification solid, regression dashed, one colour per stage);
    mask per stage; semantic; anything else under "other". Panels without terms are left out.
    """
    panels: dict[str, list[tuple[str, str, str]]] = {"RPN": [], "box head per stage": [], "mask head per stage": [],
                                                    "semantic": [], "other": []}
    for name in sorted(loss_names, key=_panel_order):
        stage = _STAGE_TERM.fullmatch(name)
        if name.startswith("loss_rpn_"):
            term = name[len("loss_rpn_"):]
            panels["RPN"].append((name, term, ("tab:blue" if term == "cls" else "tab:orange") + "|-"))
        elif stage or name in ("loss_cls", "loss_bbox", "loss_mask"):
            index, term = (int(stage.group(1)), stage.group(2)) if stage else (0, name[len("loss_"):])
            label = f"s{index}.{term}" if stage else term  # as in metrics.jsonl and the log line (s0: first)
            style = _STAGE_COLORS[index % len(_STAGE_COLORS)] + "|" + _TERM_STYLES.get(term, ":")
            panels["mask head per stage" if term == "mask" else "box head per stage"].append((name, label, style))
        elif "semantic" in name:
            panels["semantic"].append((name, name[len("loss_"):] if name.startswith("loss_") else name,
                                       "tab:purple|-"))
        else:
            panels["other"].append((name, name, f"C{len(panels['other']) % 10}|-"))
    return {title: terms for title, terms in panels.items() if terms}


def _panel_order(name: str) -> tuple:
    """Stage terms by stage, then classification before box before mask; other names keep their order."""
    stage = _STAGE_TERM.fullmatch(name)
    if not stage:
        return (0,)
    return (1, int(stage.group(1)), ("cls", "bbox", "mask").index(stage.group(2)) if stage.group(2) in _TERM_STYLES
            else 3)


def plot_loss_curve(metrics_jsonl: str | Path, png_path: str | Path) -> Path:
    """The losses of a metrics.jsonl against iteration, one panel per group (see `loss_panels`) beside the
    total loss with the lr on a second axis. A panel whose values span more than a decade has a log y axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    entries = [e for e in entries if e.get("type", "train") == "train"]
    iterations = [e["iteration"] for e in entries]
    loss_names = [k for k in (entries[-1] if entries else {}) if "loss" in k and k != "loss"]
    panels = loss_panels(loss_names)
    columns = min(3, 1 + len(panels))
    rows = -(-(1 + len(panels)) // columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows), dpi=100)
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, columns, k + 1) for k in range(1 + len(panels))]

    total = axes[0]
    total.set_title("total loss (lr dotted)")
    if entries:
        _plot_series(total, iterations, [[e["loss"] for e in entries]], ["total"], ["black|-"])
        lr_axis = total.twinx()
        lr_axis.plot(iterations, [e["lr"] for e in entries], color="grey", linestyle=":", linewidth=1)
        lr_axis.set_ylabel("learning rate")
    else:
        total.text(0.5, 0.5, "no training entries yet", ha="center", va="center", transform=total.transAxes)
    for ax, (title, terms) in zip(axes[1:], panels.items()):
        ax.set_title(title)
        _plot_series(ax, iterations, [[e.get(key, float("nan")) for e in entries] for key, _, _ in terms],
                     [label for _, label, _ in terms], [style for _, _, style in terms])
        ax.legend(fontsize="x-small", ncol=3 if len(terms) > 3 else 1, framealpha=0.6)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3, which="both")
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path)
    return png_path


def _plot_series(ax, iterations: list, series: list[list[float]], labels: list[str], styles: list[str]) -> None:
    """Lines on `ax` (style "colour|linestyle"); a log y axis when the positive values span over a decade."""
    for values, label, style in zip(series, labels, styles):
        color, linestyle = style.split("|")
        ax.plot(iterations, values, color=color, linestyle=linestyle, linewidth=1.3, label=label)
    values = [v for vs in series for v in vs if v == v]  # no NaN
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")


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
