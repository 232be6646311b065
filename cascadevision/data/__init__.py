"""Datasets, transforms and samplers: COCO-format instance segmentation data in, `(image, target)` pairs out."""
from .coco import CocoDataset
from .image import load_image
from .sampler import AspectRatioBatchSampler
from .synth import generate_synthetic
from .transforms import Compose, RandomHorizontalFlip, RandomResize, Resize, collate

__all__ = [
    "AspectRatioBatchSampler",
    "CocoDataset",
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "collate",
    "generate_synthetic",
    "load_image",
]
