"""COCO-format instance segmentation dataset.

The JSON is parsed and validated once, up front. Malformed input (a missing field, a duplicate id, an annotation
pointing at an unknown image) is a one-line `DatasetError` naming the file and the id. Problems a training run
can live with (degenerate boxes, 2-point polygons, unknown categories, boxes outside the image) are skipped and
summarised in a single warning.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..errors import DatasetError
from .image import exif_transpose, load_label_map, open_image, to_rgb_tensor

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]

# Segmentation as stored in the JSON after validation: a list of polygons, an RLE dict, or None (use the box).
Segmentation = list | dict | None


@dataclass
class _Instance:
    ann_id: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, clipped to the image
    label: int
    segmentation: Segmentation


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    instances: list[_Instance] = field(default_factory=list)
    crowds: list[_Instance] = field(default_factory=list)  # iscrowd=1: ignore regions, never targets


class _SkipLog:
    """Counts recoverable problems per kind, keeping a few example ids for the summary warning."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[int]] = defaultdict(list)

    def add(self, kind: str, ann_id: int) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(ann_id)

    def summary(self) -> str:
        parts = []
        for kind, count in self.counts.items():
            ids = ", ".join(str(i) for i in self.examples[kind])
            more = ", ..." if count > len(self.examples[kind]) else ""
            parts.append(f"{count} {kind} (annotation ids {ids}{more})")
        return "; ".join(parts)


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance annotations from a COCO JSON file.

    `dataset[i]` is `(image, target)`: `image` float32 (3, H, W) in [0, 1]; `target` has `image_id`, `boxes`
    float32 (N, 4) x1y1x2y2 in pixels, `labels` int64 (N,) in 0..num_classes-1, `masks` uint8 (N, H, W),
    `orig_size` (H, W), `file_name`, and `semantic` uint8 (H, W) when `semantic_dir` or `derive_semantic` is set.

    Crowd annotations (`iscrowd=1`) are never targets; they stay in `self.coco` for the evaluator. In training,
    images without usable annotations are dropped when `filter_empty` (default: `train`), and images whose
    shorter side is below `min_size` are dropped.

    `self.coco` is a pycocotools `COCO` over every image of the JSON and the annotations that passed validation
    (crowds included), with `area` and `iscrowd` filled in where the JSON lacks them.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 transforms: Transform | None = None, semantic_dir: str | os.PathLike | None = None,
                 derive_semantic: bool = False, filter_empty: bool | None = None, min_size: int = 0):
        if semantic_dir is not None and derive_semantic:
            raise ValueError("give semantic_dir or derive_semantic=True, not both")
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.train = train
        self.transforms = transforms
        self.semantic_dir = Path(semantic_dir) if semantic_dir is not None else None
        self.derive_semantic = derive_semantic
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image directory not found (for {self.ann_file})")
        if self.semantic_dir is not None and not self.semantic_dir.is_dir():
            raise DatasetError(f"{self.semantic_dir}: semantic map directory not found")

        data = _read_json(self.ann_file)
        records, categories, clean, skipped = _parse(self.ann_file, data)
        if skipped.counts:
            warnings.warn(f"{self.ann_file}: {skipped.summary()}", stacklevel=2)

        self.cat_ids: list[int] = [c["id"] for c in categories]  # label -> COCO category id
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.cat_id_to_label: dict[int, int] = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        self.num_classes = len(self.cat_ids)
        if derive_semantic and self.num_classes >= 255:
            raise DatasetError(f"{self.ann_file}: derive_semantic needs fewer than 255 classes, "
                               f"got {self.num_classes}")

        if filter_empty is None:
            filter_empty = train
        self.num_images_in_file = len(records)
        self.dropped: dict[str, int] = {}  # why images of the file are not in the dataset -> how many
        if train and filter_empty:
            kept = [r for r in records if r.instances]
            self.dropped["no usable annotations (data.filter_empty)"] = len(records) - len(kept)
            records = kept
        if train and min_size > 0:
            kept = [r for r in records if min(r.width, r.height) >= min_size]
            self.dropped[f"shorter side below {min_size} px (data.min_size)"] = len(records) - len(kept)
            records = kept
        self._records = records
        self.image_ids: list[int] = [r.image_id for r in records]
        self.aspect_ratios: list[float] = [r.width / r.height for r in records]

        self.coco = COCO()
        self.coco.dataset = clean
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"CocoDataset({str(self.ann_file)!r}, {len(self)} images, {self.num_classes} classes, "
                f"train={self.train})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self._records[index]
        path = self.image_dir / record.file_name
        pil_image = self._open_oriented(path, record)
        try:
            image = to_rgb_tensor(pil_image)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot convert mode {pil_image.mode} to RGB ({exc})") from None
        image = image.float().div_(255.0)  # (3, H, W)
        height, width = image.shape[1:]

        masks = [self._decode(inst, height, width, path) for inst in record.instances]
        target: Target = {
            "image_id": record.image_id,
            "boxes": torch.tensor([inst.box for inst in record.instances], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([inst.label for inst in record.instances], dtype=torch.int64),
            "masks": (torch.from_numpy(np.stack(masks)) if masks
                      else torch.zeros((0, height, width), dtype=torch.uint8)),  # (N, H, W)
            "orig_size": (height, width),
            "file_name": record.file_name,
        }
        if self.semantic_dir is not None:
            target["semantic"] = self._load_semantic(record, path, height, width)
        elif self.derive_semantic:
            target["semantic"] = self._derive_semantic(record, masks, height, width, path)

        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    # -- helpers ---------------------------------------------------------------------------------------------

    def _open_oriented(self, path: Path, record: _ImageRecord):
        """The decoded image in the orientation whose size matches the JSON (EXIF-transposed when possible)."""
        raw = open_image(path)
        oriented = exif_transpose(raw, path)
        expected = (record.width, record.height)
        if oriented.size == expected:
            return oriented
        if raw.size == expected:
            warnings.warn(f"{path}: the JSON size {expected[0]}x{expected[1]} matches the image without its EXIF "
                          f"rotation; using the stored orientation", stacklevel=3)
            return raw
        raise DatasetError(f"{path}: image is {oriented.size[0]}x{oriented.size[1]} (width x height) but "
                           f"{self.ann_file} says {expected[0]}x{expected[1]} for image {record.image_id}")

    def _decode(self, inst: _Instance, height: int, width: int, path: Path) -> np.ndarray:
        try:
            return _decode_segmentation(inst.segmentation, inst.box, height, width)
        except (ValueError, TypeError, OverflowError) as exc:  # pycocotools on values the parser let through
            raise DatasetError(f"{self.ann_file}: annotation {inst.ann_id} (image {path.name}): "
                               f"cannot decode segmentation ({exc})") from None

    def semantic_label_count(self, max_maps: int = 1000) -> tuple[int, int]:
        """(largest label + 1, maps read) over the label maps of `semantic_dir`, 255 (ignore) left out: the class
        count a semantic head needs for them. Every map is read when there are at most `max_maps`, else
        `max_maps` spread evenly over the dataset (a label beyond them stops training with the map's name)."""
        if self.semantic_dir is None:
            raise ValueError("semantic_label_count needs a semantic_dir")
        records = self._records
        if len(records) > max_maps:
            records = [records[i * len(records) // max_maps] for i in range(max_maps)]
        largest = -1
        for record in records:
            path = self._semantic_path(record)
            if not path.is_file():
                raise DatasetError(f"{path}: semantic map not found (for image {record.image_id}, {record.file_name})")
            labels = load_label_map(path).unique()
            labels = labels[labels != 255]
            if len(labels):
                largest = max(largest, int(labels.max()))
        if largest < 0:
            raise DatasetError(f"{self.semantic_dir}: the {len(records)} semantic maps read hold no label but 255 "
                               "(ignore): nothing for the semantic head to learn")
        return largest + 1, len(records)

    def _semantic_path(self, record: _ImageRecord) -> Path:
        assert self.semantic_dir is not None
        return semantic_map_path(self.semantic_dir, record.file_name)

    def _load_semantic(self, record: _ImageRecord, image_path: Path, height: int, width: int) -> torch.Tensor:
        path = self._semantic_path(record)
        if not path.is_file():
            raise DatasetError(f"{path}: semantic map not found (for image {record.image_id}, {record.file_name})")
        semantic = load_label_map(path)
        if tuple(semantic.shape) != (height, width):
            raise DatasetError(f"{path}: semantic map is {semantic.shape[1]}x{semantic.shape[0]} (width x height) "
                               f"but image {image_path} is {width}x{height}")
        return semantic

    def _derive_semantic(self, record: _ImageRecord, masks: list[np.ndarray], height: int, width: int,
                         path: Path) -> torch.Tensor:
        """Things-only label map: instance labels, background = num_classes, crowd regions = 255."""
        semantic = np.full((height, width), self.num_classes, dtype=np.uint8)
        for crowd in record.crowds:
            semantic[self._decode(crowd, height, width, path).astype(bool)] = 255
        areas = [int(m.sum()) for m in masks]
        for i in sorted(range(len(masks)), key=lambda i: -areas[i]):  # largest first: smaller ones win overlaps
            semantic[masks[i].astype(bool)] = record.instances[i].label
        return torch.from_numpy(semantic)


def _decode_segmentation(segmentation: Segmentation, box: tuple[float, float, float, float],
                         height: int, width: int) -> np.ndarray:
    """Polygons / uncompressed RLE / compressed RLE / None (box) -> uint8 mask (H, W)."""
    if segmentation is None:
        mask = np.zeros((height, width), dtype=np.uint8)
        x1, y1, x2, y2 = box
        mask[int(math.floor(y1)):int(math.ceil(y2)), int(math.floor(x1)):int(math.ceil(x2))] = 1
        return mask
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------------
# JSON parsing and validation


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read annotation file ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories', "
                           f"got {type(data).__name__}")
    return data


_NUMBER_TYPES = frozenset({int, float})  # exact types: bool is not a coordinate


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse(path: Path, data: dict) -> tuple[list[_ImageRecord], list[dict], dict, _SkipLog]:
    """Validate the COCO dict. Returns image records (JSON order), categories sorted by id, the cleaned
    dataset for pycocotools, and the log of skipped annotations."""
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise DatasetError(f"{path}: missing top-level key(s) {', '.join(repr(k) for k in missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")

    categories = _parse_categories(path, data["categories"])
    cat_id_to_label = {c["id"]: label for label, c in enumerate(categories)}
    records = _parse_images(path, data["images"])
    by_id = {r.image_id: r for r in records}

    skipped = _SkipLog()
    clean_annotations = []
    seen: set[int] = set()
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotation at index {index} is not an object")
        if "id" not in ann:
            raise DatasetError(f"{path}: annotation at index {index} has no 'id'")
        ann_id = ann["id"]
        if not _is_int(ann_id):
            raise DatasetError(f"{path}: annotation at index {index} has id {ann_id!r} (must be an integer)")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise DatasetError(f"{path}: annotation {ann_id} has no '{key}'")
        if ann_id in seen:
            raise DatasetError(f"{path}: duplicate annotation id {ann_id}")
        seen.add(ann_id)
        record = by_id.get(ann["image_id"])
        if record is None:
            raise DatasetError(f"{path}: annotation {ann_id} refers to unknown image id {ann['image_id']!r}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and _NUMBER_TYPES.issuperset(map(type, bbox))
                and math.isfinite(sum(bbox))):
            raise DatasetError(f"{path}: annotation {ann_id} has a malformed bbox {bbox!r} "
                               f"(expected [x, y, width, height])")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise DatasetError(f"{path}: annotation {ann_id} has iscrowd {iscrowd!r} (expected 0 or 1)")

        label = cat_id_to_label.get(ann["category_id"])
        if label is None:
            skipped.add("annotations skipped for an unknown category id", ann_id)
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            skipped.add("annotations skipped for a zero or negative box width/height", ann_id)
            continue
        box = (max(x, 0.0), max(y, 0.0), min(x + w, float(record.width)), min(y + h, float(record.height)))
        if box[2] <= box[0] or box[3] <= box[1]:
            skipped.add("annotations skipped for a box entirely outside the image", ann_id)
            continue
        segmentation = _parse_segmentation(path, ann, record, skipped)
        if segmentation == "drop":
            skipped.add("annotations skipped for having no polygon of 3 or more points", ann_id)
            continue

        instance = _Instance(ann_id, box, label, segmentation)
        (record.crowds if iscrowd else record.instances).append(instance)
        clean = dict(ann, iscrowd=iscrowd)
        if segmentation is not None:
            clean["segmentation"] = segmentation
        if "area" not in clean:
            clean["area"] = _area(segmentation, w, h, record)
        clean_annotations.append(clean)

    clean_dataset = {
        "info": data.get("info", {}),
        "licenses": data.get("licenses", []),
        "images": data["images"],
        "annotations": clean_annotations,
        "categories": data["categories"],
    }
    return records, categories, clean_dataset, skipped


def _parse_categories(path: Path, categories: list) -> list[dict]:
    seen = set()
    for index, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DatasetError(f"{path}: category at index {index} has no 'id'")
        if not _is_int(cat["id"]):
            raise DatasetError(f"{path}: category at index {index} has id {cat['id']!r} (must be an integer)")
        if cat["id"] in seen:
            raise DatasetError(f"{path}: duplicate category id {cat['id']}")
        seen.add(cat["id"])
    if not categories:
        raise DatasetError(f"{path}: 'categories' is empty")
    return sorted(categories, key=lambda c: c["id"])


def _parse_images(path: Path, images: list) -> list[_ImageRecord]:
    records = []
    seen = set()
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            raise DatasetError(f"{path}: image at index {index} is not an object")
        if "id" not in image:
            raise DatasetError(f"{path}: image at index {index} has no 'id'")
        image_id = image["id"]
        if not _is_int(image_id):
            raise DatasetError(f"{path}: image at index {index} has id {image_id!r} (must be an integer)")
        for key in ("file_name", "width", "height"):
            if key not in image:
                raise DatasetError(f"{path}: image {image_id} has no '{key}'")
        if image_id in seen:
            raise DatasetError(f"{path}: duplicate image id {image_id}")
        seen.add(image_id)
        width, height = image["width"], image["height"]
        for name, value in (("width", width), ("height", height)):
            if not (_is_number(value) and value > 0 and float(value).is_integer()):
                raise DatasetError(f"{path}: image {image_id} has {name} {value!r} (must be a positive integer)")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DatasetError(f"{path}: image {image_id} has file_name {image['file_name']!r}")
        records.append(_ImageRecord(image_id, image["file_name"], int(width), int(height)))
    return records


def _parse_segmentation(path: Path, ann: dict, record: _ImageRecord, skipped: _SkipLog) -> Segmentation | str:
    """The annotation's segmentation with bad polygons removed, None when it has none (the box is used as
    the mask), or "drop" when every polygon was bad."""
    ann_id = ann["id"]
    segmentation = ann.get("segmentation")
    if segmentation is None or (isinstance(segmentation, list) and not segmentation):
        skipped.add("annotations without segmentation (their box is used as mask)", ann_id)
        return None
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            if not isinstance(polygon, list):  # the coordinates' types are checked when decoding
                raise DatasetError(f"{path}: annotation {ann_id} has a malformed polygon "
                                   f"(expected lists of numbers x1, y1, x2, y2, ...)")
            if len(polygon) < 6 or len(polygon) % 2:
                skipped.add("polygons dropped for fewer than 3 points or an odd number of coordinates", ann_id)
                continue
            polygons.append(polygon)
        return polygons if polygons else "drop"
    if isinstance(segmentation, dict):
        counts, size = segmentation.get("counts"), segmentation.get("size")
        if counts is None or size is None:
            raise DatasetError(f"{path}: annotation {ann_id} has an RLE without 'counts' and 'size'")
        if not (isinstance(counts, (str, bytes)) or (isinstance(counts, list) and all(_is_int(c) for c in counts))):
            raise DatasetError(f"{path}: annotation {ann_id} has malformed RLE counts")
        if list(size) != [record.height, record.width]:
            raise DatasetError(f"{path}: annotation {ann_id} has RLE size {list(size)} but image "
                               f"{record.image_id} is [height, width] = [{record.height}, {record.width}]")
        if isinstance(counts, list) and sum(counts) != record.height * record.width:
            raise DatasetError(f"{path}: annotation {ann_id} has RLE counts summing to {sum(counts)}, "
                               f"expected height x width = {record.height * record.width}")
        return segmentation
    raise DatasetError(f"{path}: annotation {ann_id} has segmentation of type {type(segmentation).__name__} "
                       f"(expected polygons or RLE)")


def _area(segmentation: Segmentation, w: float, h: float, record: _ImageRecord) -> float:
    """Mask area for annotations whose JSON has no `area` (pycocotools' evaluator needs it)."""
    if segmentation is None:
        return float(w * h)
    try:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, record.height, record.width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, record.height, record.width)
        else:
            rle = segmentation
        return float(mask_utils.area(rle))
    except (ValueError, TypeError):
        return float(w * h)


def semantic_map_path(semantic_dir: Path, file_name: str) -> Path:
    """The label map of image `file_name`: the same relative path with .png under `semantic_dir`, else the
    bare file name there (label maps kept flat for images in sub-folders)."""
    relative = Path(file_name).with_suffix(".png")
    path = semantic_dir / relative
    if not path.exists() and relative.parent != Path("."):
        flat = semantic_dir / relative.name
        if flat.exists():
            return flat
    return path
