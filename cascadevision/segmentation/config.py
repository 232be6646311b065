"""Semantic segmentation configs (presets are in `presets.py`, building a `Segmenter` in `model.py`).

Defaults are the CASCADE reference values (spec section 2) where one exists. The training schedule reuses
`TrainConfig`; the engine's optimiser is SGD, so the reference's constant-lr AdamW (1e-4) becomes constant-lr
SGD here (no lr steps), with a short warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import BackboneConfig, TrainConfig
from ..models.cascade_decoder import DecoderConfig, SegInputConfig, SegLossConfig


@dataclass
class SegModelConfig:
    preset: str = ""
    num_classes: int = 9  # Synapse: 8 organs + background; training takes it from the dataset
    class_names: tuple[str, ...] = ()
    input: SegInputConfig = field(default_factory=SegInputConfig)
    # segmentation trains every layer, BatchNorm included (the reference fine-tunes the whole encoder)
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(frozen_stages=-1, norm_eval=False))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    weights: str = ""  # initial weights: a checkpoint, or a torchvision ImageNet ResNet (backbone only)


@dataclass
class SegDataConfig:
    train_images: str = ""
    train_labels: str = ""  # label-map PNGs named like the images (uint8, 255 = ignore)
    val_images: str = ""
    val_labels: str = ""
    classes: str = ""  # JSON list of class names; "" = semantic_classes.json near the labels, else inferred
    augment: str = "rot_flip"  # "rot_flip" (the reference: rot90 + flip, or a rotation up to 20 deg), "hflip", "none"
    batch_size: int = 24  # images per process (CASCADE Synapse)
    num_workers: int = 2


def _default_train() -> TrainConfig:
    return TrainConfig(epochs=150, lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_iters=100, lr_steps=(),
                       checkpoint_interval=500, seed=2222)


@dataclass
class SegmentationConfig:
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    train: TrainConfig = field(default_factory=_default_train)


_MOVED = {"SEG_PRESETS": "presets", "SEG_SCHEDULES": "presets", "FPN_R18_CHANNELS": "presets",
          "seg_preset_config": "presets", "seg_preset_names": "presets", "load_seg_config": "presets",
          "build_backbone": "model", "build_segmenter": "model"}


def __getattr__(name: str):
    # Presets and the loader moved to `segmentation.presets`, building to `segmentation.model`. Lazy on purpose,
    # to keep the old names importable from here; exempt (by name) in tests/test_layering.py.
    if name in _MOVED:
        from . import model, presets
        return getattr(presets if _MOVED[name] == "presets" else model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
