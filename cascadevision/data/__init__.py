"""Datasets, transforms and samplers: COCO-format instance segmentation data in, `(image, target)` pairs out."""
from .check import check_dataset, format_problems
from .classes import ClassMapping, match_classes
from .coco import CocoDataset
from .image import load_image
from .sampler import AspectRatioBatchSampler
from .synth import generate_synthetic
from .transforms import (Compose, LargeScaleJitter, PhotoMetricDistortion, RandomHorizontalFlip, RandomResize, Resize,
                         collate, train_transforms)

__all__ = [
    "AspectRatioBatchSampler",
    "ClassMapping",
    "CocoDataset",
    "Compose",
    "LargeScaleJitter",
    "PhotoMetricDistortion",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "collate",
    "train_transforms",
    "check_dataset",
    "format_problems",
    "generate_synthetic",
    "load_image",
    "match_classes",
]
