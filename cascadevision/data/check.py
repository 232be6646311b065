"""Check a COCO-format dataset before training: every problem at once, as one line each.

A training run reads an image only when it reaches it, so a missing or corrupt file used to stop a long run
at whatever iteration drew it. `check_dataset` goes through the annotation JSON and every image (and semantic
label map) up front. `deep=False` opens each file's header only (existence, format, size: fast enough for
thousands of images at the start of training); `deep=True` decodes every pixel, which also finds truncated
and corrupt image data.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import DatasetError
from .coco import _parse, _parse_images, _read_json, semantic_map_path
from .image import _one_line, load_label_map, open_image, to_rgb_tensor

# EXIF orientations that turn the image by 90 degrees (width and height swap when the tag is applied)
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


def check_dataset(ann_file: str | os.PathLike, image_dir: str | os.PathLike, *,
                  semantic_dir: str | os.PathLike | None = None, deep: bool = True,
                  progress: bool = False) -> list[str]:
    """Every problem found in a dataset, one line each naming the file (and image id); [] when it is fine.

    Reported: an annotation file that is missing, not JSON or malformed (the first structural problem, as
    `CocoDataset` would raise it), and for each image of the JSON: the file missing, a directory in its place,
    a file that is not an image or cannot be decoded (`deep`: truncated or corrupt pixel data too), a size
    other than the JSON's width x height (either orientation of an EXIF-rotated image is accepted, as
    `CocoDataset` does), and with `semantic_dir` its label map missing, not single-channel or of another size.
    Annotations that training skips with a warning (degenerate boxes, unknown categories) are not problems.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    semantic_dir = Path(semantic_dir) if semantic_dir is not None else None
    problems: list[str] = []
    try:
        data = _read_json(ann_file)
    except DatasetError as exc:
        return [str(exc)]
    try:
        records = _parse(ann_file, data)[0]
    except DatasetError as exc:
        problems.append(str(exc))
        try:  # the annotations are malformed but the image list may be fine: check the files anyway
            records = _parse_images(ann_file, data["images"]) if isinstance(data.get("images"), list) else []
        except DatasetError:
            records = []
    if not image_dir.is_dir():
        return problems + [f"{image_dir}: image directory not found (for {ann_file})"]
    if semantic_dir is not None and not semantic_dir.is_dir():
        problems.append(f"{semantic_dir}: semantic map directory not found")
        semantic_dir = None
    for record in tqdm(records, desc="check-data", disable=not progress):
        where = f"image {record.image_id} of {ann_file.name}"
        path = image_dir / record.file_name
        problem = _check_image(path, (record.width, record.height), deep)
        if problem:
            problems.append(f"{path}: {problem} ({where})")
        if semantic_dir is not None:
            label_path = semantic_map_path(semantic_dir, record.file_name)
            problem = _check_label_map(label_path, (record.width, record.height), deep)
            if problem:
                problems.append(f"{label_path}: {problem} (semantic map for {where})")
    return problems


def format_problems(problems: list[str], limit: int = 20) -> str:
    """The first `limit` problems, one per line under a count; "no problems found" for an empty list."""
    if not problems:
        return "no problems found"
    lines = [f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:"]
    lines += [f"  {problem}" for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def _check_image(path: Path, expected: tuple[int, int], deep: bool) -> str | None:
    """What is wrong with the image file at `path` whose JSON size is `expected` (width, height), or None."""
    missing = _missing(path, "image file")
    if missing:
        return missing
    if deep:
        try:
            image = open_image(path)  # decodes every pixel
            to_rgb_tensor(image)
        except DatasetError as exc:
            return _without_path(str(exc), path)
        except (OSError, ValueError) as exc:  # a mode that does not convert to RGB
            return f"cannot convert mode {image.mode} to RGB ({_one_line(exc)})"
        return _size_problem(image, expected)
    try:
        with Image.open(path) as image:  # reads the header only
            return _size_problem(image, expected)
    except UnidentifiedImageError:
        return "not an image file, or a format PIL cannot read"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"cannot read the image header ({_one_line(exc)})"


def _check_label_map(path: Path, expected: tuple[int, int], deep: bool) -> str | None:
    missing = _missing(path, "semantic map")
    if missing:
        return missing
    if deep:
        try:
            height, width = load_label_map(path).shape
        except DatasetError as exc:
            return _without_path(str(exc), path)
    else:
        try:
            with Image.open(path) as image:
                if image.mode not in ("L", "P") and not image.mode.startswith("I"):
                    return f"label map must be single-channel (mode L or P), got mode {image.mode}"
                width, height = image.size
        except UnidentifiedImageError:
            return "not an image file, or a format PIL cannot read"
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            return f"cannot read the image header ({_one_line(exc)})"
    if (width, height) != expected:
        return f"semantic map is {width}x{height} (width x height) but the JSON says {expected[0]}x{expected[1]}"
    return None


def _missing(path: Path, what: str) -> str | None:
    if not path.exists():
        return f"{what} not found"
    if not path.is_file():
        return "is a directory, not a file" if path.is_dir() else "is not a regular file"
    return None


def _size_problem(image: Image.Image, expected: tuple[int, int]) -> str | None:
    """None when the stored size, or the size after the EXIF rotation, is the JSON's (as CocoDataset accepts)."""
    width, height = image.size
    sizes = {(width, height)}
    # only EXIF data already read with the header: PIL's PNG getexif() would otherwise decode the whole image
    if "exif" in image.info and image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
        sizes.add((height, width))
    if expected in sizes:
        return None
    return f"image is {width}x{height} (width x height) but the JSON says {expected[0]}x{expected[1]}"


def _without_path(message: str, path: Path) -> str:
    """image.py's errors start with "{path}: "; the caller puts the path in front itself."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message
