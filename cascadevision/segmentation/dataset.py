"""Image + label-map datasets for semantic segmentation, and their training augmentation.

A dataset is a directory of images and a directory of single-channel PNG label maps with the same file stems
(`images/0001.jpg` <-> `labels/0001.png`); label values are class indices, 255 = ignore. Class names come from
a JSON list (`semantic_classes.json` or `classes.json` in the label directory or up to two levels above it, as
the synthetic dataset writes them), or are inferred as the largest label + 1.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from PIL import Image

from ..data.image import load_image, load_label_map
from ..errors import ConfigError, DatasetError
from ..io.images import IMAGE_SUFFIXES

IGNORE_INDEX = 255
CLASS_FILES = ("semantic_classes.json", "classes.json")

Target = dict[str, Any]


class SegmentationDataset(torch.utils.data.Dataset):
    """`dataset[i]` is `(image, target)`: image float32 (3, H, W) in [0, 1]; target has `semantic` uint8 (H, W),
    `image_id` (= i), `file_name` and `orig_size` (H, W).

    class_names: the classes, in label order; None reads them from `classes_file` or a class file near the
    labels, or else scans every label map and names the classes "0".."K-1". A label value that is neither a
    class nor 255 is a DatasetError naming the file and the value (checked when the sample is loaded).
    """

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike, *,
                 class_names: Sequence[str] | None = None, classes_file: str | os.PathLike | None = None,
                 transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None):
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.transforms = transforms
        for kind, directory in (("image", self.image_dir), ("label", self.label_dir)):
            if not directory.is_dir():
                raise DatasetError(f"{directory}: {kind} directory not found")
        self.image_paths = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.image_paths:
            raise DatasetError(f"{self.image_dir}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.label_paths = [self.label_dir / f"{p.stem}.png" for p in self.image_paths]
        for image_path, label_path in zip(self.image_paths, self.label_paths):
            if not label_path.is_file():
                raise DatasetError(f"{label_path}: label map not found for image {image_path}")

        if class_names is None:
            class_names = read_class_names(classes_file) if classes_file else self._find_class_names()
        self.class_names = [str(name) for name in class_names]
        self.num_classes = len(self.class_names)
        if not 1 <= self.num_classes <= IGNORE_INDEX:
            raise DatasetError(f"{self.label_dir}: need 1 to 255 classes, got {self.num_classes}")
        self.image_ids = list(range(len(self.image_paths)))
        self.aspect_ratios = [_aspect_ratio(p) for p in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return (f"SegmentationDataset({str(self.image_dir)!r}, {str(self.label_dir)!r}, {len(self)} images, "
                f"{self.num_classes} classes)")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image = load_image(image_path).float().div_(255.0)  # (3, H, W)
        labels = self.load_labels(index)  # (H, W) uint8
        if tuple(labels.shape) != tuple(image.shape[1:]):
            raise DatasetError(f"{label_path}: label map is {labels.shape[1]}x{labels.shape[0]} (width x height) "
                               f"but image {image_path} is {image.shape[2]}x{image.shape[1]}")
        target: Target = {"semantic": labels, "image_id": index, "file_name": image_path.name,
                          "orig_size": tuple(image.shape[1:])}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def load_labels(self, index: int) -> torch.Tensor:
        """The label map of sample `index`, checked against the classes."""
        path = self.label_paths[index]
        labels = load_label_map(path)
        bad = labels[(labels >= self.num_classes) & (labels != IGNORE_INDEX)]
        if bad.numel():
            raise DatasetError(f"{path}: label value {int(bad.min())} is not a class (there are "
                               f"{self.num_classes} classes, 0..{self.num_classes - 1}; 255 = ignore)")
        return labels

    def _find_class_names(self) -> list[str]:
        for directory in (self.label_dir, self.label_dir.parent, self.label_dir.parent.parent):
            for name in CLASS_FILES:
                if (directory / name).is_file():
                    return read_class_names(directory / name)
        largest = -1
        for path in self.label_paths:
            labels = load_label_map(path)
            valid = labels[labels != IGNORE_INDEX]
            if valid.numel():
                largest = max(largest, int(valid.max()))
        if largest < 0:
            raise DatasetError(f"{self.label_dir}: every label is 255 (ignore), so the classes cannot be inferred; "
                               "give a classes file")
        return [str(i) for i in range(largest + 1)]


def read_class_names(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    try:
        names = json.loads(path.read_text())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read classes file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DatasetError(f"{path}: a classes file must hold a non-empty JSON list of class names")
    return [str(n) for n in names]


def _aspect_ratio(path: Path) -> float:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError:  # unreadable: reported with the file name when the sample is loaded
        return 1.0
    return width / max(height, 1)


# ----------------------------------------------------------------------------------------------------------
# augmentation (the reference's RandomGenerator); randomness from torch's RNG


class RandomRotFlip:
    """As the CASCADE/MERIT training scripts: with p 0.5 a random multiple of 90 deg and a random-axis flip;
    otherwise, with p 0.5, a rotation by a whole-degree angle in [-max_angle, max_angle) (image bilinear,
    labels nearest; the corners it brings in are black in the image and 255 = ignore in the labels)."""

    def __init__(self, max_angle: int = 20):
        self.max_angle = max_angle

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        labels = target["semantic"]
        if torch.rand(()) < 0.5:
            k = int(torch.randint(4, ()))
            image, labels = image.rot90(k, (1, 2)), labels.rot90(k, (0, 1))
            axis = int(torch.randint(2, ()))
            image, labels = image.flip(axis + 1), labels.flip(axis)
        elif torch.rand(()) < 0.5:
            angle = int(torch.randint(-self.max_angle, self.max_angle, ()))
            image, labels = rotate(image, labels, angle)
        return image.contiguous(), {**target, "semantic": labels.contiguous()}

    def __repr__(self) -> str:
        return f"RandomRotFlip(max_angle={self.max_angle})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        return image.flip(-1), {**target, "semantic": target["semantic"].flip(-1)}

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def rotate(image: torch.Tensor, labels: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate about the centre, keeping the size: image (3, H, W) bilinear, labels (H, W) nearest."""
    height, width = labels.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # grid_sample's coordinates are normalised to [-1, 1] per axis; rotate in pixel units, then normalise
    aspect = width / height
    matrix = torch.tensor([[cos, -sin / aspect, 0.0], [sin * aspect, cos, 0.0]], dtype=torch.float32)
    grid = F.affine_grid(matrix[None], [1, 1, height, width], align_corners=False)
    image = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    # shift labels by one so that the zero padding becomes "ignore"
    shifted = (labels.float() + 1)[None, None]
    rotated = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
    labels_out = torch.where(rotated > 0, rotated - 1, float(IGNORE_INDEX)).to(torch.uint8)
    return image, labels_out


def train_transforms(augment: str) -> Callable | None:
    if augment == "rot_flip":
        return RandomRotFlip()
    if augment == "hflip":
        return RandomHorizontalFlip()
    if augment == "none":
        return None
    raise ConfigError(f"data.augment must be 'rot_flip', 'hflip' or 'none', got '{augment}'")
