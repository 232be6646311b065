"""A small synthetic COCO-format dataset of coloured shapes on textured backgrounds.

Five thing classes that differ only by shape (colours are random), placed with random size, rotation and
overlap (a new shape may hide at most 60% of an earlier one); every 12th image has no shapes. Backgrounds are
split into 2-3 regions, each a "stuff" texture. Instance annotations describe the *visible* part of each shape:
polygons for unoccluded rectangles, triangles and stars, uncompressed RLE for occluded ones, compressed RLE for
circles and rings. Used by the demo and the tests; every image is a pure function of (seed, index),
so the output does not depend on `num_workers`.

Layout written under `out_dir`:
    images/{train,val}/NNNNNN.png
    annotations/instances_{train,val}.json
    semantic/{train,val}/NNNNNN.png      thing labels 0..K-1, stuff labels K.., 255 = ignore
    semantic_classes.json                 names of the semantic labels, things first
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..outputs import ensure_writable_dir

# (COCO category id, name); ids are deliberately not contiguous. Contiguous label = position in this list.
THING_CLASSES: list[tuple[int, str]] = [(1, "circle"), (2, "rectangle"), (3, "triangle"), (5, "ring"), (7, "star")]
STUFF_CLASSES: list[str] = ["noise", "gradient", "stripes", "checker"]
SEMANTIC_CLASSES: list[str] = [name for _, name in THING_CLASSES] + STUFF_CLASSES
IGNORE = 255

_POLYGONAL = {"rectangle", "triangle", "star"}
_EMPTY_EVERY = 12  # every 12th image has no objects (index % 12 == 11)
_MAX_SHAPES = 6
_MIN_DIAMETER, _MAX_DIAMETER = 1 / 10, 1 / 2  # of the image side, drawn log-uniformly
_MIN_VISIBLE_FRACTION = 0.4  # a new shape may not hide more than 60% of an earlier one
_MIN_CONTRAST = 90.0  # RGB distance between a shape's colour and the background under it


def generate_synthetic(out_dir: str | os.PathLike, num_images: int = 200, size: int = 256, seed: int = 0,
                       val_fraction: float = 0.2, num_workers: int = 0) -> dict[str, str]:
    """Write the dataset and return its paths: `root`, `train_images`, `train_ann`, `train_semantic`,
    `val_images`, `val_ann`, `val_semantic`, `semantic_classes`.

    Images 0..n_train-1 form the train split, the last round(num_images * val_fraction) the val split. Image ids
    are index + 1; annotation ids run from 1 over both splits.
    """
    root = ensure_writable_dir(out_dir, "dataset directory")
    num_val = int(round(num_images * val_fraction))
    splits = {"train": range(0, num_images - num_val), "val": range(num_images - num_val, num_images)}
    paths = {"root": str(root), "semantic_classes": str(root / "semantic_classes.json")}
    jobs = []
    for split, indices in splits.items():
        image_dir, semantic_dir = root / "images" / split, root / "semantic" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        semantic_dir.mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        paths[f"{split}_images"] = str(image_dir)
        paths[f"{split}_semantic"] = str(semantic_dir)
        paths[f"{split}_ann"] = str(root / "annotations" / f"instances_{split}.json")
        jobs += [(seed, index, size, str(image_dir), str(semantic_dir)) for index in indices]

    if num_workers > 0:
        with ProcessPoolExecutor(num_workers) as pool:
            results = list(pool.map(_write_image, jobs, chunksize=max(1, len(jobs) // (4 * num_workers))))
    else:
        results = [_write_image(job) for job in jobs]

    categories = [{"id": cat_id, "name": name, "supercategory": "shape"} for cat_id, name in THING_CLASSES]
    next_ann_id = 1
    for split, indices in splits.items():
        images, annotations = [], []
        for index in indices:
            file_name, annos = results[index]
            images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
            for ann in annos:
                annotations.append({"id": next_ann_id, "image_id": index + 1, **ann})
                next_ann_id += 1
        coco = {"info": {"description": "cascadevision synthetic shapes", "seed": seed, "split": split},
                "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        with open(paths[f"{split}_ann"], "w") as f:
            json.dump(coco, f)
    with open(paths["semantic_classes"], "w") as f:
        json.dump(SEMANTIC_CLASSES, f)
    return paths


def _write_image(job: tuple[int, int, int, str, str]) -> tuple[str, list[dict]]:
    seed, index, size, image_dir, semantic_dir = job
    image, semantic, annotations = render_image(seed, index, size)
    file_name = f"{index:06d}.png"
    Image.fromarray(image).save(Path(image_dir) / file_name, compress_level=1)
    Image.fromarray(semantic).save(Path(semantic_dir) / file_name, compress_level=1)
    return file_name, annotations


@dataclass
class _Shape:
    label: int
    name: str
    full: np.ndarray  # bool (H, W), the whole shape inside the image
    visible: np.ndarray  # bool (H, W), what later shapes leave uncovered
    polygon: list[float] | None  # vertices x1, y1, x2, y2, ... for polygonal shapes


def render_image(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image: RGB uint8 (H, W, 3), semantic uint8 (H, W), and COCO annotations without id/image_id."""
    rng = np.random.default_rng([seed, index])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres

    image, semantic = _background(rng, xs, ys, size)
    min_area = max(16, (size // 24) ** 2)
    shapes: list[_Shape] = []
    wanted = 0 if index % _EMPTY_EVERY == _EMPTY_EVERY - 1 else int(rng.integers(1, _MAX_SHAPES + 1))
    for _ in range(wanted * 10):  # rejection sampling: a few placements fail
        if len(shapes) == wanted:
            break
        label = int(rng.integers(len(THING_CLASSES)))
        name = THING_CLASSES[label][1]
        full, polygon = _shape_mask(name, rng, xs, ys, size)
        if full.sum() < min_area:
            continue
        if any((s.visible & ~full).sum() < _MIN_VISIBLE_FRACTION * s.full.sum() for s in shapes):
            continue
        for s in shapes:
            s.visible &= ~full
        shapes.append(_Shape(label, name, full, full.copy(), polygon))
        _paint(rng, image, full)

    annotations = []
    for s in shapes:
        area = int(s.visible.sum())
        if area < min_area:  # hidden too much to be a fair target: neither annotated nor scored
            semantic[s.visible] = IGNORE
            continue
        semantic[s.visible] = s.label
        annotations.append(_annotation(s, area))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), semantic, annotations


def _annotation(shape: _Shape, area: int) -> dict:
    rows, cols = np.flatnonzero(shape.visible.any(1)), np.flatnonzero(shape.visible.any(0))
    bbox = [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
    occluded = bool((shape.full & ~shape.visible).any())
    if shape.polygon is not None and not occluded:
        segmentation: list | dict = [shape.polygon]  # the mask was rasterised from exactly this polygon
    elif shape.polygon is not None:
        segmentation = _uncompressed_rle(shape.visible)  # occluded polygons: exercises the list-counts path
    else:
        rle = mask_utils.encode(np.asfortranarray(shape.visible.astype(np.uint8)))
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return {"category_id": THING_CLASSES[shape.label][0], "bbox": bbox, "area": area,
            "segmentation": segmentation, "iscrowd": 0}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.int8)  # COCO RLE is column-major, starting with a run of zeros
    boundaries = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(boundaries).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


# ------------------------------------------------------------------------------------------------------------
# drawing


def _shape_mask(name: str, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray,
                size: int) -> tuple[np.ndarray, list[float] | None]:
    diameter = size * math.exp(rng.uniform(math.log(_MIN_DIAMETER), math.log(_MAX_DIAMETER)))
    radius = diameter / 2
    cx, cy = rng.uniform(0.35 * diameter, size - 0.35 * diameter, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    if name in ("circle", "ring"):
        dist2 = (xs - cx) ** 2 + (ys - cy) ** 2
        mask = dist2 <= radius ** 2
        if name == "ring":
            mask &= dist2 >= (radius * rng.uniform(0.45, 0.65)) ** 2
        return mask, None
    if name == "rectangle":
        half_long = radius * 0.9
        half_short = half_long * rng.uniform(0.45, 0.9)
        corners = [(half_long, half_short), (-half_long, half_short), (-half_long, -half_short),
                   (half_long, -half_short)]
        points = [_rotate(x, y, angle) for x, y in corners]
    elif name == "triangle":
        points = []
        for k in range(3):
            a = angle + k * 2 * math.pi / 3 + rng.uniform(-0.2, 0.2)
            r = radius * rng.uniform(0.85, 1.0)
            points.append((r * math.cos(a), r * math.sin(a)))
    else:  # star: 5 outer and 5 inner vertices
        inner = radius * rng.uniform(0.38, 0.5)
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else inner
            a = angle + k * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
    polygon = [round(float(v), 2) for x, y in points for v in (cx + x, cy + y)]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))
    return mask_utils.decode(rle).astype(bool), polygon


def _rotate(x: float, y: float, angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c - y * s, x * s + y * c


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Fill `mask` with a random colour that stands out from the background under it, plus light noise."""
    under = image[mask].mean(axis=0)
    for _ in range(20):
        color = rng.uniform(0, 255, size=3)
        if np.linalg.norm(color - under) >= _MIN_CONTRAST:
            break
    else:
        color = 255.0 - under  # the most distant colour, when random draws keep failing
    shading = rng.normal(0, 6, size=(int(mask.sum()), 3))
    image[mask] = color + shading


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray,
                size: int) -> tuple[np.ndarray, np.ndarray]:
    """Float RGB (H, W, 3) made of 2-3 textured regions, and the stuff labels (K + texture index)."""
    regions = np.zeros((size, size), dtype=np.int64)
    regions[_half_plane(rng, xs, ys, size)] = 1
    num_regions = int(rng.integers(2, 4))
    if num_regions == 3:
        regions[(regions == 1) & _half_plane(rng, xs, ys, size)] = 2
    kinds = rng.choice(len(STUFF_CLASSES), size=num_regions, replace=False)

    image = np.zeros((size, size, 3), dtype=np.float32)
    semantic = np.zeros((size, size), dtype=np.uint8)
    for region, kind in enumerate(kinds):
        inside = regions == region
        image = np.where(inside[..., None], _texture(STUFF_CLASSES[kind], rng, xs, ys, size), image)
        semantic[inside] = len(THING_CLASSES) + kind
    image += 4 * rng.standard_normal(image.shape, dtype=np.float32)
    return image, semantic


def _half_plane(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    px, py = rng.uniform(0.25, 0.75, size=2) * size
    angle = rng.uniform(0, math.pi)
    return (xs - px) * math.sin(angle) - (ys - py) * math.cos(angle) > 0


def _texture(kind: str, rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    base = rng.uniform(50, 200, size=3).astype(np.float32)
    other = np.clip(base + rng.choice([-1, 1], size=3) * rng.uniform(30, 60, size=3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)  # coordinate along a random direction
    if kind == "noise":
        return base + 22 * rng.standard_normal((size, size, 3), dtype=np.float32)
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
        return base + (other - base) * t[..., None]
    if kind == "stripes":
        period = rng.uniform(8, 20)
        t = ((u / period) % 1.0) < 0.5
        return np.where(t[..., None], base, other)
    v = -xs * math.sin(angle) + ys * math.cos(angle)  # checker
    cell = rng.uniform(10, 24)
    t = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    return np.where(t[..., None], base, other)
