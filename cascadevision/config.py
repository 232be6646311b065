"""Dataclass configs.

Every default is the reference value (MMDetection's `mask_rcnn_r50_fpn_1x` unless a field says otherwise);
presets in `cascadevision.models.presets` change only what differs. YAML files and `--set a.b=value`
overrides are applied on top (`cascadevision.presets.load_config`), and any unknown key is an error naming the key
and the valid ones. This module is a leaf: it imports nothing from the package but `errors`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class InputConfig:
    """Preprocessing done inside the model."""
    scale: tuple[int, int] = (1333, 800)  # keep-ratio resize: long side <= scale[0], short side <= scale[1]
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, on the 0-255 scale
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisor: int = 32


@dataclass
class BackboneConfig:
    type: str = "resnet"
    depth: int = 50  # 18, 34, 50, 101, 152
    base_channels: int = 64  # width of the stem and layer1; 64 is the standard (and ImageNet-loadable) ResNet
    frozen_stages: int = 1  # -1: nothing frozen; k: stem and layer1..k frozen
    norm_eval: bool = True  # keep every BatchNorm in eval mode while training
    out_indices: tuple[int, ...] = (0, 1, 2, 3)


@dataclass
class NeckConfig:
    out_channels: int = 256
    num_outs: int = 5  # P2..P6; P6 = max-pool(P5, 1, stride 2)


@dataclass
class RPNConfig:
    feat_channels: int = 256
    anchor_scales: tuple[float, ...] = (8.0,)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    pos_iou: float = 0.7
    neg_iou: float = 0.3
    min_pos_iou: float = 0.3
    num_samples: int = 256
    pos_fraction: float = 0.5
    allowed_border: float = -1.0  # -1: every anchor is used; 0: only anchors inside the image
    loss_bbox: str = "l1"  # "l1" or "smooth_l1"
    smooth_l1_beta: float = 1.0 / 9.0
    nms_iou: float = 0.7
    train_pre_nms: int = 2000  # per level
    train_post_nms: int = 1000  # per image
    test_pre_nms: int = 1000
    test_post_nms: int = 1000
    min_box_size: float = 0.0


# The one early-exit policy vocabulary (cascadevision.early_exit.policies implements each): threshold policies
# read a confidence measure of the class probabilities; a detector's cascade (model.roi_head.early_exit) offers
# "none" and the threshold policies, a classifier's exits all of them.
THRESHOLD_POLICIES = ("max_prob", "entropy", "margin")
POLICY_NAMES = (*THRESHOLD_POLICIES, "patience", "gate", "none")
REGION_POLICIES = ("none", *THRESHOLD_POLICIES)


@dataclass
class EarlyExitConfig:
    """Region-level early exit in a cascade at test time (off by default) and an image-level time budget."""
    policy: str = "none"  # "none", "max_prob", "entropy" or "margin"
    threshold: float = 0.9  # a RoI stops being refined once its confidence passes this (entropy: falls below)
    background_threshold: float = 0.0  # a RoI is dropped once P(background) >= this; 0 disables
    prune_threshold: float = 0.0  # pruner: a RoI whose best class probability is below this stops being
    #                               refined but is kept (box, score and mask from the stages it went through)
    time_budget_ms: float = 0.0  # anytime inference: past this the cascade stops at the current stage; 0 = no limit

    @property
    def enabled(self) -> bool:
        """Whether any of it is switched on."""
        return (self.policy != "none" or self.background_threshold > 0 or self.prune_threshold > 0
                or self.time_budget_ms > 0)


@dataclass
class RoIHeadConfig:
    type: str = "standard"  # "standard" (Faster/Mask R-CNN), "cascade", "htc"
    num_stages: int = 1
    iou_thresholds: tuple[float, ...] = (0.5,)  # per stage: pos = neg = min_pos IoU
    stage_loss_weights: tuple[float, ...] = (1.0,)
    bbox_stds: tuple[tuple[float, float, float, float], ...] = ((0.1, 0.1, 0.2, 0.2),)
    reg_class_agnostic: bool = False
    match_low_quality: bool = True
    num_samples: int = 512  # sampled RoIs per image
    pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True
    finest_scale: int = 56  # FPN level mapping
    roi_size: int = 7
    num_fcs: int = 2
    fc_channels: int = 1024
    loss_bbox: str = "l1"  # "l1" or "smooth_l1"
    smooth_l1_beta: float = 1.0
    with_mask: bool = True
    mask_roi_size: int = 14
    mask_num_convs: int = 4
    mask_conv_channels: int = 256
    mask_size: int = 28  # mask target / logit resolution
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    mask_output: str = "full"  # "full": (N, H, W) bool `masks`; "probs": (N, 28, 28) `mask_probs`, pasted later
    # HTC only
    interleaved: bool = True
    mask_info_flow: bool = True
    with_semantic: bool = False
    semantic_num_classes: int = 183
    semantic_loss_weight: float = 0.2
    semantic_loss_avg_non_ignore: bool = False  # CE summed / all pixels (MMDetection v3); True: / labelled ones
    semantic_fusion_level: int = 1
    mask_ensemble: str = "mean"  # "mean" of all stages' sigmoid masks, or "last"
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)


@dataclass
class ModelConfig:
    preset: str = ""
    num_classes: int = 80
    class_names: tuple[str, ...] = ()
    input: InputConfig = field(default_factory=InputConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)
    weights: str = ""  # initial weights: "" (none), a checkpoint path/URL, or "imagenet:PATH" for backbone only


@dataclass
class DataConfig:
    train_ann: str = ""
    train_images: str = ""
    train_semantic: str = ""  # directory of label-map PNGs (255 = ignore), optional
    val_ann: str = ""
    val_images: str = ""
    batch_size: int = 2  # images per process
    num_workers: int = 2
    flip_prob: float = 0.5
    filter_empty: bool = True  # drop training images without usable annotations
    min_size: int = 0  # drop training images whose shorter side is below this
    check_images: bool = True  # at train start: every image exists, opens and has the size the JSON says


@dataclass
class TrainConfig:
    epochs: int = 12
    max_iters: int = 0  # > 0: train for this many iterations instead of `epochs`
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw" (no weight decay on norms and biases)
    lr: float = 0.02
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_schedule: str = "step"  # "step": lr *= lr_gamma at each of lr_steps; "cosine": to min_lr_ratio * lr
    lr_steps: tuple[int, ...] = (8, 11)  # epochs at which lr *= lr_gamma (iterations when max_iters > 0)
    lr_gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine only: the final lr as a fraction of `lr`
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    amp: bool = False  # mixed precision (CUDA only)
    checkpoint_interval: int = 500  # iterations
    keep_checkpoints: int = 2
    log_interval: int = 10
    eval_at_end: bool = True
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass, with strict key checking


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe dict (tuples become lists)."""
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value
    return convert(cfg)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return update(annotation(), value, prefix=key + ".")
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if annotation in (int, float):
        value = _parse_number(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        return str(value)
    return value


# YAML 1.1 reads a number in scientific notation without a dot (`1e-3`, `5e2`) as a string
_SCIENTIFIC = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")


def _parse_number(value: Any) -> Any:
    """`"1e-3"` -> 0.001; any other value is returned as it is (and judged by the caller)."""
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


def update(cfg: Any, values: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass `cfg` with `values` (a nested dict) applied, checking every key."""
    types_ = _field_types(type(cfg))
    changes = {}
    for key, value in values.items():
        if key not in types_:
            valid = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {valid}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' is a section; give it a mapping, got {value!r}")
            changes[key] = update(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, types_[key], prefix + key)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(items: list[str]) -> dict:
    """['model.rpn.nms_iou=0.6', ...] -> nested dict. Values are parsed as YAML (numbers, lists, booleans)."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    return data


def __getattr__(name: str):
    # `load_config` moved to `cascadevision.presets` (it needs the presets, which sit above this leaf module).
    # Lazy on purpose, to keep `cascadevision.config.load_config` working: the one import of this module from
    # above, exempt by name in tests/test_layering.py.
    if name == "load_config":
        from .presets import load_config
        return load_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_config_from_dict(values: dict) -> ModelConfig:
    return update(ModelConfig(), values)


# ----------------------------------------------------------------------------------------------------------
# value checks: every range and every choice, in one place


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _above(low):
    return (lambda v: v > low), f"> {low}"


def _within(low, high):
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


_PROBABILITY = _within(0, 1)
_IOU = (lambda v: 0 < v <= 1), "in (0, 1]"
_COUNT = _at_least(1)
_SIZE = _at_least(0)
_LOSS_BBOX = _one_of("l1", "smooth_l1")
RESNET_DEPTHS = (18, 34, 50, 101, 152)  # cascadevision.models.backbone.ARCH
EFFICIENTVIT_TYPES = tuple(f"efficientvit_m{i}" for i in range(6))  # cascadevision.models.efficientvit

# per section: field -> (holds(value), what it must be); a tuple field's rule applies to each of its values
_RULES: dict[type, dict[str, tuple]] = {
    InputConfig: {"scale": _COUNT, "std": _above(0), "size_divisor": _COUNT},
    BackboneConfig: {"type": _one_of("resnet", *EFFICIENTVIT_TYPES), "base_channels": _COUNT,
                     "frozen_stages": _within(-1, 4), "out_indices": _within(0, 4)},
    NeckConfig: {"out_channels": _COUNT, "num_outs": _COUNT},
    RPNConfig: {"feat_channels": _COUNT, "anchor_scales": _above(0), "anchor_ratios": _above(0),
                "anchor_strides": _COUNT, "pos_iou": _IOU, "neg_iou": _PROBABILITY, "min_pos_iou": _PROBABILITY,
                "num_samples": _COUNT, "pos_fraction": _PROBABILITY, "loss_bbox": _LOSS_BBOX,
                "smooth_l1_beta": _above(0), "nms_iou": _IOU, "train_pre_nms": _COUNT, "train_post_nms": _COUNT,
                "test_pre_nms": _COUNT, "test_post_nms": _COUNT, "min_box_size": _SIZE},
    EarlyExitConfig: {"policy": _one_of(*REGION_POLICIES), "threshold": _PROBABILITY,
                      "background_threshold": _PROBABILITY, "prune_threshold": _PROBABILITY,
                      "time_budget_ms": _SIZE},
    RoIHeadConfig: {"type": _one_of("standard", "cascade", "htc"), "num_stages": _COUNT, "iou_thresholds": _IOU,
                    "stage_loss_weights": _at_least(0), "bbox_stds": _above(0), "num_samples": _COUNT,
                    "pos_fraction": _PROBABILITY, "finest_scale": _COUNT, "roi_size": _COUNT, "num_fcs": _SIZE,
                    "fc_channels": _COUNT, "loss_bbox": _LOSS_BBOX, "smooth_l1_beta": _above(0),
                    "mask_roi_size": _COUNT, "mask_num_convs": _SIZE, "mask_conv_channels": _COUNT,
                    "mask_size": _COUNT, "score_thr": _PROBABILITY, "nms_iou": _IOU, "max_per_img": _COUNT,
                    "mask_thr": _PROBABILITY, "semantic_num_classes": _COUNT, "semantic_loss_weight": _at_least(0),
                    "semantic_fusion_level": _SIZE, "mask_ensemble": _one_of("mean", "last"),
                    "mask_output": _one_of("full", "probs")},
    ModelConfig: {"num_classes": _COUNT},
    DataConfig: {"batch_size": _COUNT, "num_workers": _SIZE, "flip_prob": _PROBABILITY, "min_size": _SIZE},
    TrainConfig: {"epochs": _SIZE, "max_iters": _SIZE, "optimizer": _one_of("sgd", "adamw"), "lr": _above(0),
                  "momentum": _PROBABILITY, "betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "weight_decay": _SIZE, "warmup_iters": _SIZE, "warmup_ratio": _PROBABILITY,
                  "lr_schedule": _one_of("step", "cosine"), "lr_steps": _SIZE, "lr_gamma": _above(0),
                  "min_lr_ratio": _PROBABILITY, "grad_clip": _SIZE, "checkpoint_interval": _SIZE,
                  "keep_checkpoints": _SIZE, "log_interval": _SIZE,
                  "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                             "auto, cpu, cuda or cuda:N")},
}


def _check_backbone(cfg: BackboneConfig, prefix: str) -> None:
    if cfg.type == "resnet":
        if cfg.depth not in RESNET_DEPTHS:
            raise ConfigError(f"{prefix}depth must be one of {', '.join(map(str, RESNET_DEPTHS))} for a ResNet, "
                              f"got {cfg.depth}")
        if not set(cfg.out_indices) <= {0, 1, 2, 3}:
            raise ConfigError(f"{prefix}out_indices must be stages 0..3 for a ResNet, got {list(cfg.out_indices)}")


def _check_rpn(cfg: RPNConfig, prefix: str) -> None:
    if cfg.neg_iou > cfg.pos_iou:
        raise ConfigError(f"{prefix}neg_iou ({cfg.neg_iou}) must not exceed {prefix}pos_iou ({cfg.pos_iou})")


def _check_roi_head(cfg: RoIHeadConfig, prefix: str) -> None:
    for name in ("iou_thresholds", "stage_loss_weights", "bbox_stds"):
        if len(getattr(cfg, name)) != cfg.num_stages:
            raise ConfigError(f"{prefix}{name} needs {cfg.num_stages} entries (one per stage, "
                              f"{prefix}num_stages), got {len(getattr(cfg, name))}")


def _check_model(cfg: ModelConfig, prefix: str) -> None:
    if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(f"{prefix}class_names has {len(cfg.class_names)} names but {prefix}num_classes is "
                          f"{cfg.num_classes}")
    if len(cfg.rpn.anchor_strides) != cfg.neck.num_outs:
        raise ConfigError(f"{prefix}rpn.anchor_strides has {len(cfg.rpn.anchor_strides)} levels but "
                          f"{prefix}neck.num_outs is {cfg.neck.num_outs}")
    if cfg.roi_head.with_semantic and cfg.roi_head.semantic_fusion_level >= cfg.neck.num_outs:
        raise ConfigError(f"{prefix}roi_head.semantic_fusion_level must be a neck level below "
                          f"{prefix}neck.num_outs ({cfg.neck.num_outs}), got {cfg.roi_head.semantic_fusion_level}")


def _check_train(cfg: TrainConfig, prefix: str) -> None:
    if cfg.max_iters <= 0 and cfg.epochs <= 0:
        raise ConfigError(f"training needs {prefix}max_iters > 0 or {prefix}epochs > 0, "
                          f"got {cfg.max_iters} and {cfg.epochs}")


_CHECKS = {BackboneConfig: _check_backbone, RPNConfig: _check_rpn, RoIHeadConfig: _check_roi_head,
           ModelConfig: _check_model, TrainConfig: _check_train}


def _values(value: Any) -> list:
    """The scalars of a field: the value itself, or every value of a (nested) tuple."""
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _values(item)]
    return [value]


def validate(cfg: Any, prefix: str = "") -> None:
    """Raise a one-line ConfigError naming the key of the first value out of range, unknown choice or
    inconsistency between keys; return None if the config is fine.

    Takes a whole `Config` or any section of it, or another config made of these sections (the segmentation
    config): `prefix` is the section's place, e.g. `validate(model_cfg, "model.")`. Every float must be finite.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        shown = list(value) if isinstance(value, tuple) else value
        scalars = _values(value)
        if any(isinstance(v, float) and not math.isfinite(v) for v in scalars):
            raise ConfigError(f"{key} must be a finite number, got {shown!r}")
        rule = _RULES.get(type(cfg), {}).get(f.name)
        if rule and not all(rule[0](v) for v in scalars):
            each = " (each value)" if isinstance(value, tuple) else ""
            raise ConfigError(f"{key}{each} must be {rule[1]}, got {shown!r}")
    check = _CHECKS.get(type(cfg))
    if check:
        check(cfg, prefix)
