"""build_model: a config (or a preset name) in, a detector out."""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig, update, validate
from ..errors import ConfigError
from .backbone import ResNet
from .cascade import CascadeRoIHead
from .detector import TwoStageDetector
from .efficientvit import EfficientViTBackbone
from .neck import FPN
from .presets import preset_config
from .roi_heads import StandardRoIHead
from .rpn import RPNHead
from .transform import DetectionTransform

# MMDetection pools RoIs from the four finest neck levels (P2-P5, its `featmap_strides`); P6 feeds the RPN only
ROI_LEVELS = 4


def build_model(name_or_config: str | ModelConfig | dict, num_classes: int | None = None,
                class_names: list[str] | None = None, exit_policy_factory=None, **overrides) -> TwoStageDetector:
    """Build a detector from a preset name, a ModelConfig or a dict of ModelConfig fields.

    `num_classes` and `class_names` set the classes (background excluded); keyword `overrides` are nested
    dicts of config fields, e.g. `build_model("mask_rcnn_r50_fpn_1x", num_classes=3, rpn={"nms_iou": 0.6})`.
    `exit_policy_factory`: see `build_from_config`.
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
    return build_from_config(cfg, exit_policy_factory)


def build_from_config(cfg: ModelConfig, exit_policy_factory=None) -> TwoStageDetector:
    """The detector `cfg` describes.

    A cascade's test-time exit policy is not built here (models/ does not know the early-exit package):
    `exit_policy_factory(detector)` returns the callable the cascade head calls after each stage
    (`cascadevision.early_exit.detection.exit_policy_factory`, which `early_exit.detection.build_from_config`
    passes). Without a factory, a config that asks for early exit is an error rather than silently ignored.
    """
    validate(cfg, "model.")  # every range and choice, one line naming the key
    backbone = build_backbone(cfg.backbone)
    neck = FPN(backbone.out_channels, cfg.neck, backbone.strides)
    rpn_head = RPNHead(neck.out_channels, cfg.rpn)
    strides = neck.strides[:ROI_LEVELS]
    if cfg.roi_head.type == "standard":
        roi_head = StandardRoIHead(cfg.roi_head, cfg.num_classes, neck.out_channels, strides)
    else:
        roi_head = CascadeRoIHead(cfg.roi_head, cfg.num_classes, neck.out_channels, strides, len(neck.strides))
    model = TwoStageDetector(cfg, DetectionTransform(cfg.input), backbone, neck, rpn_head, roi_head)
    if isinstance(roi_head, CascadeRoIHead) and exit_policy_factory is not None:
        roi_head.exit_policy = exit_policy_factory(model)
    elif isinstance(roi_head, CascadeRoIHead) and early_exit_requested(cfg):
        raise ConfigError("model.roi_head.early_exit is set but this builder attaches no exit policy; build the "
                          "model with cascadevision.early_exit.detection.build_from_config (or build_model)")
    return model


def early_exit_requested(cfg: ModelConfig) -> bool:
    """Whether `cfg.roi_head.early_exit` asks for anything beyond the plain cascade."""
    return cfg.roi_head.early_exit.enabled


def build_backbone(cfg):
    """ResNet (`type: resnet`) or EfficientViT (`type: efficientvit_m0` .. `efficientvit_m5`)."""
    if cfg.type == "resnet":
        return ResNet(cfg)
    if cfg.type.startswith("efficientvit_"):
        return EfficientViTBackbone(cfg)
    raise ConfigError(f"model.backbone.type must be 'resnet' or 'efficientvit_m0'..'efficientvit_m5', got '{cfg.type}'")
