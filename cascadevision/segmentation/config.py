"""Semantic segmentation configs, presets, and building a `Segmenter` from a config.

Defaults are the CASCADE reference values (spec section 2) where one exists. The training schedule reuses
`TrainConfig`; the engine's optimiser is SGD, so the reference's constant-lr AdamW (1e-4) becomes constant-lr
SGD here (no lr steps), with a short warm-up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..config import BackboneConfig, TrainConfig, load_yaml, parse_overrides, update, validate
from ..errors import ConfigError
from ..models.cascade_decoder import (DecoderConfig, SegInputConfig, SegLossConfig, Segmenter,
                                      build_decoder)


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


# ----------------------------------------------------------------------------------------------------------
# presets: each changes only what differs from the defaults above


def _small_cpu(cfg: SegModelConfig) -> SegModelConfig:
    """ResNet-18 and 128 x 128 inputs: trains on a CPU in minutes."""
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, depth=18),
                               input=dataclasses.replace(cfg.input, size=(128, 128)))


def _model(decoder: str = "cascade", depth: int = 50, *, backbone_type: str = "resnet",
           channels: tuple[int, ...] = (), fpn_channels: int = 256, mutation: bool = False) -> SegModelConfig:
    cfg = SegModelConfig()
    loss = SegLossConfig(mutation=True, ce_weight=0.3, dice_weight=0.7) if mutation else cfg.loss
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, type=backbone_type, depth=depth),
        decoder=DecoderConfig(type=decoder, channels=channels, fpn_channels=fpn_channels), loss=loss)


# the FPN baseline's width that gives about the parameters of the CASCADE decoder on ResNet-18 (8.9M)
FPN_R18_CHANNELS = 400

SEG_PRESETS = {
    "cascade_r18": lambda: _small_cpu(_model("cascade")),
    "cascade_add_r18": lambda: _small_cpu(_model("cascade_add")),
    "cascade_add_r18_mutation": lambda: _small_cpu(_model("cascade_add", mutation=True)),  # MERIT-style
    "fpn_r18": lambda: _small_cpu(_model("fpn", fpn_channels=FPN_R18_CHANNELS)),
    "cascade_r50": lambda: _model("cascade", 50, channels=(512, 320, 128, 64)),  # PVT-CASCADE's widths
    "cascade_add_r50_mutation": lambda: _model("cascade_add", 50, channels=(768, 384, 192, 96), mutation=True),
    "cascade_efficientvit_m4": lambda: _model("cascade", backbone_type="efficientvit_m4"),
}

# the small presets also get a schedule that trains on a CPU in a few minutes (the defaults are Synapse's 150 epochs)
_CPU_SCHEDULE = {"data": {"batch_size": 8}, "train": {"max_iters": 400, "checkpoint_interval": 100}}
SEG_SCHEDULES = {name: _CPU_SCHEDULE for name in SEG_PRESETS if name.endswith("_r18") or "_r18_" in name}


def seg_preset_config(name: str) -> SegModelConfig:
    if name not in SEG_PRESETS:
        raise ConfigError(f"unknown segmentation preset '{name}'; available: {', '.join(sorted(SEG_PRESETS))}")
    return dataclasses.replace(SEG_PRESETS[name](), preset=name)


def seg_preset_names() -> list[str]:
    return sorted(SEG_PRESETS)


def load_seg_config(preset_or_path: str | Path | None = None,
                    overrides: list[str] | dict | None = None) -> SegmentationConfig:
    """A SegmentationConfig from a preset name or a YAML file (which may name `model.preset`), then overrides."""
    cfg = SegmentationConfig()
    data: dict = {}
    if preset_or_path:
        text = str(preset_or_path)
        if text.endswith((".yaml", ".yml")) or Path(text).is_file():
            data = load_yaml(text)
        else:
            data = {"model": {"preset": text}}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    preset = extra.get("model", {}).get("preset") or data.get("model", {}).get("preset")
    if preset:
        cfg = dataclasses.replace(cfg, model=seg_preset_config(preset))
        cfg = update(cfg, SEG_SCHEDULES.get(preset, {}))
    cfg = update(update(cfg, data), extra)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# building


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """ResNet (`type: resnet`) or EfficientViT (`type: efficientvit_m0` .. `efficientvit_m5`); both return four
    maps at strides 4, 8, 16, 32 and list their widths in `out_channels`."""
    if cfg.type == "resnet":
        from ..models.backbone import ResNet
        return ResNet(cfg)
    if cfg.type.startswith("efficientvit_"):
        try:
            from ..models.efficientvit import EfficientViTBackbone
        except ImportError as exc:
            raise ConfigError(f"backbone.type '{cfg.type}' needs cascadevision.models.efficientvit, which cannot be "
                              f"imported here ({exc})") from None
        return EfficientViTBackbone(cfg)
    raise ConfigError(f"backbone.type must be 'resnet' or 'efficientvit_m0'..'efficientvit_m5', got '{cfg.type}'")


def build_segmenter(cfg: SegModelConfig) -> Segmenter:
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be at least 1, got {cfg.num_classes}")
    if any(s % cfg.input.size_divisor for s in cfg.input.size):
        raise ConfigError(f"model.input.size {list(cfg.input.size)} must be a multiple of "
                          f"model.input.size_divisor ({cfg.input.size_divisor})")
    backbone = build_backbone(cfg.backbone)
    try:
        decoder = build_decoder(cfg.decoder, backbone.out_channels)
        return Segmenter(backbone, decoder, cfg.num_classes, input=cfg.input, loss=cfg.loss,
                         class_names=cfg.class_names)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
