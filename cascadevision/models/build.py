"""build_model: a config (or a preset name) in, a detector out."""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig, update, validate
from ..errors import ConfigError
from .backbone import ResNet
from .cascade import build_cascade_head
from .detector import TwoStageDetector
from .neck import FPN
from .presets import preset_config
from .roi_heads import StandardRoIHead
from .rpn import RPNHead
from .transform import DetectionTransform


def build_model(name_or_config: str | ModelConfig | dict, num_classes: int | None = None,
                class_names: list[str] | None = None, **overrides) -> TwoStageDetector:
    """Build a detector from a preset name, a ModelConfig or a dict of ModelConfig fields.

    `num_classes` and `class_names` set the classes (background excluded); keyword `overrides` are nested
    dicts of config fields, e.g. `build_model("mask_rcnn_r50_fpn_1x", num_classes=3, rpn={"nms_iou": 0.6})`.
    """
    if isinstance(name_or_config, str):
        cfg = preset_config(name_or_config)
    elif isinstance(name_or_config, ModelConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        base = name_or_config.get("preset")
        cfg = update(preset_config(base) if base else ModelConfig(), name_or_config)
    else:
        raise ConfigError(f"build_model takes a preset name, a ModelConfig or a dict, not {type(name_or_config).__name__}")
    if overrides:
        cfg = update(cfg, overrides)
    if class_names is not None:
        cfg = dataclasses.replace(cfg, class_names=tuple(class_names))
        if num_classes is None:
            num_classes = len(class_names)
    if num_classes is not None:
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes))
    return build_from_config(cfg)


def build_from_config(cfg: ModelConfig) -> TwoStageDetector:
    validate(cfg, "model.")  # every range and choice, one line naming the key
    backbone = build_backbone(cfg.backbone)
    neck = FPN(backbone.out_channels, cfg.neck)
    rpn_head = RPNHead(neck.out_channels, cfg.rpn)
    if cfg.roi_head.type == "standard":
        roi_head = StandardRoIHead(cfg.roi_head, cfg.num_classes, neck.out_channels)
    else:
        roi_head = build_cascade_head(cfg.roi_head, cfg.num_classes, neck.out_channels, cfg.neck.num_outs)
    return TwoStageDetector(cfg, DetectionTransform(cfg.input), backbone, neck, rpn_head, roi_head)


def build_backbone(cfg):
    """ResNet (`type: resnet`) or EfficientViT (`type: efficientvit_m0` .. `efficientvit_m5`)."""
    if cfg.type == "resnet":
        return ResNet(cfg)
    if cfg.type.startswith("efficientvit_"):
        from .efficientvit import EfficientViTBackbone

        return EfficientViTBackbone(cfg)
    raise ConfigError(f"model.backbone.type must be 'resnet' or 'efficientvit_m0'..'efficientvit_m5', got '{cfg.type}'")
