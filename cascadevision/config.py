"""Dataclass configs.

Every default is the reference value (MMDetection's `mask_rcnn_r50_fpn_1x` unless a field says otherwise);
presets in `cascadevision.models.presets` change only what differs. YAML files and `--set a.b=value`
overrides are applied on top (`cascadevision.presets.load_config`), and any unknown key is an error naming the key
and the valid ones; keys of earlier layouts are still read (`RENAMED`). This module is a leaf: it imports
nothing from the package but `errors`.

The RoI head's config is small sections: `sampler` (training), `box_head`, `mask_head`, `test` (NMS and
outputs), `htc` (read only by an HTC head) and `early_exit` (one `EarlyExitConfig` for a detector's cascade and
for the early-exit classifiers); what is per stage (`iou_thresholds`, `stage_loss_weights`, `bbox_stds`) stays
at its top with `type`, `num_stages`, `finest_scale` and `with_mask`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import warnings
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
    norm: str = "bn"  # ResNet: "bn", "syncbn" (BatchNorm synchronised under DDP) or "gn" (GroupNorm(32): gn1, ...)
    with_cp: bool = False  # training: recompute each block's activations in backward (activation checkpointing)


@dataclass
class NeckConfig:
    out_channels: int = 256
    num_outs: int = 5  # P2..P6; P6 = max-pool(P5, 1, stride 2)
    norm: str = "none"  # after each conv: "none", "bn", "syncbn" or "gn" (GroupNorm(32); the convs lose their bias)


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

EXIT_THRESHOLD = 0.9  # the default confidence to leave at, for RoIs and for a classifier's exits alike
PREDICT_SCORE_THR = 0.3  # `predict` draws (and counts) the detections scoring at least this
EXPORTED_SUFFIXES = (".onnx", ".pt2")  # files `cascadevision export` writes; predict and serve run them


@dataclass
class EarlyExitConfig:
    """One early-exit policy: a detector's cascade (`model.roi_head.early_exit`, off by default) and a classifier's
    exits (`early_exit` of an exits config) read the same fields. `policy` is one of POLICY_NAMES; a detector
    takes REGION_POLICIES. Fields marked "detector" or "classifier" are read by that side only."""
    policy: str = "none"  # "none", "max_prob", "entropy", "margin"; classifier also "patience" and "gate"
    threshold: float = EXIT_THRESHOLD  # leave once the confidence passes this (entropy: falls to it), policy's units
    thresholds: tuple[float, ...] = ()  # classifier: one per exit (num_stages - 1 values); overrides `threshold`
    prune_threshold: float = 0.0  # stop refining, but keep, what is unlikely to get better; 0 disables. Detector:
    #                               a RoI whose best class probability is below this (box, score and mask from the
    #                               stages it went through); classifier "gate": P(a later exit is right) < this
    background_threshold: float = 0.0  # detector: a RoI is dropped once P(background) >= this; 0 disables
    time_budget_ms: float = 0.0  # detector, anytime inference: past this the cascade stops at the current stage
    mask_score_threshold: float = 0.0  # detector: a detection scoring below this gets its box as mask (no mask head
    #                                    run); 0 disables. `cascadevision exits calibrate-detector` picks it
    patience: int = 2  # classifier "patience": exit once this many consecutive exits agree
    gate_hidden: int = 32  # classifier "gate": hidden width of each exit's gate
    gate_use_features: bool = True  # classifier "gate": it sees the stage's pooled feature map as well as the logits

    @property
    def enabled(self) -> bool:
        """Whether a detector's region exit asks for anything beyond the plain cascade."""
        return (self.policy != "none" or self.background_threshold > 0 or self.prune_threshold > 0
                or self.time_budget_ms > 0 or self.mask_score_threshold > 0)


@dataclass
class SamplerConfig:
    """Training: how a RoI head picks the proposals it learns from (IoU assignment, then random sampling)."""
    num_samples: int = 512  # sampled RoIs per image
    pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True
    match_low_quality: bool = True  # a gt box with no proposal above the IoU threshold still gets its best one


@dataclass
class BoxHeadConfig:
    """Each stage's box head: shared fully connected layers on RoIAlign features, class logits and box deltas."""
    roi_size: int = 7
    num_fcs: int = 2
    fc_channels: int = 1024
    reg_class_agnostic: bool = False
    loss_bbox: str = "l1"  # "l1" or "smooth_l1"
    smooth_l1_beta: float = 1.0
    num_convs: int = 0  # 3x3 convs before the FCs (4 with num_fcs 1: MMDetection's Shared4Conv1FCBBoxHead)
    conv_channels: int = 256
    norm: str = "none"  # after each of those convs: "none", "bn", "syncbn" or "gn"


@dataclass
class MaskHeadConfig:
    """Each stage's FCN mask head."""
    roi_size: int = 14
    num_convs: int = 4
    conv_channels: int = 256
    size: int = 28  # mask target / logit resolution
    norm: str = "none"  # after each 3x3 conv: "none", "bn", "syncbn" or "gn" (GroupNorm(32))


@dataclass
class RoITestConfig:
    """Test time: per-class NMS, the detections kept, and the masks' form."""
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    mask_output: str = "full"  # "full": (N, H, W) bool `masks`; "probs": (N, 28, 28) `mask_probs`, pasted later
    mask_ensemble: str = "mean"  # cascades: "mean" of the stages' sigmoid masks, or the "last" stage's


@dataclass
class HTCConfig:
    """Hybrid Task Cascade's three ideas on top of Cascade Mask R-CNN; read only when `roi_head.type` is "htc"
    (setting them for another head is an error)."""
    interleaved: bool | None = None  # None: on for HTC
    mask_info_flow: bool | None = None  # None: on for HTC
    with_semantic: bool = False
    semantic_num_classes: int = 183
    semantic_loss_weight: float = 0.2
    semantic_loss_avg_non_ignore: bool = False  # CE summed / all pixels (MMDetection v3); True: / labelled ones
    semantic_fusion_level: int = 1


@dataclass
class RoIHeadConfig:
    type: str = "standard"  # "standard" (Faster/Mask R-CNN), "cascade", "htc"
    num_stages: int = 1
    iou_thresholds: tuple[float, ...] = (0.5,)  # per stage: pos = neg = min_pos IoU
    stage_loss_weights: tuple[float, ...] = (1.0,)
    bbox_stds: tuple[tuple[float, float, float, float], ...] = ((0.1, 0.1, 0.2, 0.2),)
    finest_scale: int = 56  # FPN level mapping of RoIs (box and mask)
    with_mask: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    test: RoITestConfig = field(default_factory=RoITestConfig)
    htc: HTCConfig = field(default_factory=HTCConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)


@dataclass
class TTAConfig:
    """Test-time augmentation for eval and predict (`--tta`; see models.tta.TTADetector): boxes of every
    augmentation merged by per-class NMS at roi_head.test.nms_iou, masks averaged in image space."""
    enabled: bool = False
    scales: tuple[tuple[int, int], ...] = ()  # (long, short) keep-ratio test scales; (): input.scale only
    flip: bool = True  # also run each scale on the mirrored image


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
    tta: TTAConfig = field(default_factory=TTAConfig)
    weights: str = ""  # initial weights: "" (none), a checkpoint path/URL, or "imagenet:PATH" for backbone only


@dataclass
class LSJConfig:
    """Large-scale jitter (training only): resize to fit a square of side output_size * r, r drawn from
    scale_range, then a random output_size square crop (see data.transforms.LargeScaleJitter)."""
    output_size: int = 0  # > 0 turns it on (e.g. 1024); 0: off
    scale_range: tuple[float, float] = (0.1, 2.0)


@dataclass
class PhotometricConfig:
    """MMDetection's PhotoMetricDistortion (training only): each step with probability 1/2."""
    enabled: bool = False
    brightness_delta: float = 32.0  # on the 0-255 scale
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: float = 18.0  # degrees


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
    # multi-scale training: each entry (long, short) or a short side; () trains at model.input.scale
    train_scales: tuple[tuple[int, ...], ...] = ()
    scale_mode: str = "choice"  # "choice": one of train_scales; "range": sides drawn between the two entries
    lsj: LSJConfig = field(default_factory=LSJConfig)
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
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
    amp: str = "none"  # autocast: "none", "bf16" (CPU and CUDA) or "fp16" (CUDA only, with loss scaling)
    accumulate: int = 1  # optimizer step every N iterations (batches), losses scaled by 1/N; see engine.trainer
    checkpoint_interval: int = 500  # iterations
    keep_checkpoints: int = 2
    log_interval: int = 10
    eval_at_end: bool = True
    eval_interval: int = 0  # > 0: COCO eval of the val split every N iterations; the best is checkpoints/best.pth
    loggers: tuple[str, ...] = ("tensorboard",)  # also "wandb", "mlflow" (when installed); () for none
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# `serve --max-batch 0`: 8 on a GPU, 1 on the CPU, where a stacked forward of the demo HTC costs more than its
# images one by one (benchmarks/bench_serve.py, 8 clients on 2 busy cores: 1.55 requests/s unbatched, 1.13 with
# batches of 4 and 1.7x the memory)
SERVE_AUTO_BATCH = {"cuda": 8, "cpu": 1}


@dataclass
class ServeConfig:
    """`cascadevision serve`: where the server listens, how it batches requests and the largest upload it takes
    (not part of a model's `Config`: the CLI flags of `serve` set these)."""
    host: str = "127.0.0.1"  # localhost only, unless told otherwise
    port: int = 8000  # 0: any free port (the server prints the one it took)
    max_batch: int = 0  # requests of one image size stacked into one forward, at most; 0: SERVE_AUTO_BATCH
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others to join it
    max_upload_bytes: int = 20 * 2**20  # the largest request body, refused before it is read in full
    max_pixels: int = 50_000_000  # the largest image (width x height), refused from its header before decoding
    score_thr: float = PREDICT_SCORE_THR  # /predict's default `score_thr`


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
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or len(args) != 1:
            return value
        return _coerce(value, args[0], key)  # `X | None`: null or an X
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


# Old spellings, per section: old key -> its new place (dotted, inside the same section). An old key in a
# user's YAML, `--set` or `build_model(**overrides)` is moved with a DeprecationWarning; in a config stored in a
# checkpoint (`update(..., stored=True)`) silently. A section defined above this leaf registers its own renames.
RENAMED: dict[type, dict[str, str]] = {
    RoIHeadConfig: {
        **{k: f"sampler.{k}" for k in ("num_samples", "pos_fraction", "add_gt_as_proposals", "match_low_quality")},
        **{k: f"box_head.{k}" for k in ("roi_size", "num_fcs", "fc_channels", "reg_class_agnostic", "loss_bbox",
                                        "smooth_l1_beta")},
        "mask_roi_size": "mask_head.roi_size", "mask_num_convs": "mask_head.num_convs",
        "mask_conv_channels": "mask_head.conv_channels", "mask_size": "mask_head.size",
        **{k: f"test.{k}" for k in ("score_thr", "nms_iou", "max_per_img", "mask_thr", "mask_output",
                                    "mask_ensemble")},
        **{k: f"htc.{k}" for k in ("interleaved", "mask_info_flow", "with_semantic", "semantic_num_classes",
                                   "semantic_loss_weight", "semantic_loss_avg_non_ignore", "semantic_fusion_level")},
    },
    EarlyExitConfig: {"kind": "policy"},
}


def _renamed(cls: type, values: dict, prefix: str, warn: bool, stored: bool) -> tuple[dict, set[str]]:
    """`values` with the old spellings of section `cls` moved to their new places, and the keys moved."""
    table = RENAMED.get(cls, {})
    if not any(key in table for key in values):
        return values, set()
    out = {k: v for k, v in values.items() if k not in table}
    for old, value in values.items():
        if old not in table:
            continue
        if warn:
            warnings.warn(f"{prefix}{old} is now {prefix}{table[old]}", DeprecationWarning, stacklevel=3)
        *sections, leaf = table[old].split(".")
        node = out
        for section in sections:
            inner = node.get(section, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"config key '{prefix}{section}' is a section; give it a mapping, got {inner!r}")
            node[section] = node = dict(inner)  # a copy: the caller's dicts are left as they were
        if leaf in node and not stored:
            raise ConfigError(f"{prefix}{old} and {prefix}{table[old]} are the same key (old and new spelling); "
                              f"give it once")
        if old in ("interleaved", "mask_info_flow") and value is True:
            value = None  # the old default True meant "on for HTC heads" (other heads ignored it): that is None
        node.setdefault(leaf, value)  # a stored config never has both; if it had, the new spelling wins
    return out, {table[old].split(".")[0] for old in values if old in table}


def update(cfg: Any, values: dict, prefix: str = "", *, stored: bool = False) -> Any:
    """Return a copy of dataclass `cfg` with `values` (a nested dict) applied, checking every key.

    Old spellings (`RENAMED`) are accepted with a DeprecationWarning, or silently when `stored` (a config read
    back from a checkpoint, which the user did not write).
    """
    return _update(cfg, values, prefix, stored, warn=not stored)


def _update(cfg: Any, values: dict, prefix: str, stored: bool, warn: bool) -> Any:
    types_ = _field_types(type(cfg))
    changes = {}
    values, moved = _renamed(type(cfg), values, prefix, warn, stored)
    for key, value in values.items():
        if key not in types_:
            valid = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {valid}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' is a section; give it a mapping, got {value!r}")
            # a whole section under its old name was warned about once: not its old keys inside again
            changes[key] = _update(current, value, f"{prefix}{key}.", stored, warn and key not in moved)
        else:
            if isinstance(cfg, TrainConfig) and key == "amp" and isinstance(value, bool):
                # before bf16/fp16 were chosen by name: true meant "bf16 where supported, on CUDA only"
                if warn:
                    warnings.warn(f"{prefix}amp: {str(value).lower()} is now {prefix}amp: "
                                  f"{'bf16' if value else 'none'}", DeprecationWarning, stacklevel=3)
                value = "bf16" if value else "none"
            changes[key] = _coerce(value, types_[key], prefix + key)
    out = dataclasses.replace(cfg, **changes)
    if stored and isinstance(out, RoIHeadConfig) and out.type != "htc":
        # checkpoints from before the htc section stored its switches (then ignored) for every head
        out = dataclasses.replace(out, htc=dataclasses.replace(out.htc, interleaved=None, mask_info_flow=None,
                                                               with_semantic=False))
    return out


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
    """The ModelConfig a checkpoint stored (`to_dict` of it, in this or an older layout)."""
    return update(ModelConfig(), values, stored=True)


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
NORMS = ("bn", "syncbn", "gn")  # cascadevision.models.layers.build_norm
_NORM = _one_of("none", *NORMS)
LOGGERS = ("tensorboard", "wandb", "mlflow")  # cascadevision.engine.loggers
RESNET_DEPTHS = (18, 34, 50, 101, 152)  # cascadevision.models.backbone.ARCH
EFFICIENTVIT_TYPES = tuple(f"efficientvit_m{i}" for i in range(6))  # cascadevision.models.efficientvit

# per section: field -> (holds(value), what it must be); a tuple field's rule applies to each of its values, and
# a dotted name ("early_exit.policy") is the rule of a subsection's field in this place, instead of its own
_RULES: dict[type, dict[str, tuple]] = {
    InputConfig: {"scale": _COUNT, "std": _above(0), "size_divisor": _COUNT},
    BackboneConfig: {"type": _one_of("resnet", *EFFICIENTVIT_TYPES), "base_channels": _COUNT,
                     "frozen_stages": _within(-1, 4), "out_indices": _within(0, 4), "norm": _one_of(*NORMS)},
    NeckConfig: {"out_channels": _COUNT, "num_outs": _COUNT, "norm": _NORM},
    RPNConfig: {"feat_channels": _COUNT, "anchor_scales": _above(0), "anchor_ratios": _above(0),
                "anchor_strides": _COUNT, "pos_iou": _IOU, "neg_iou": _PROBABILITY, "min_pos_iou": _PROBABILITY,
                "num_samples": _COUNT, "pos_fraction": _PROBABILITY, "loss_bbox": _LOSS_BBOX,
                "smooth_l1_beta": _above(0), "nms_iou": _IOU, "train_pre_nms": _COUNT, "train_post_nms": _COUNT,
                "test_pre_nms": _COUNT, "test_post_nms": _COUNT, "min_box_size": _SIZE},
    EarlyExitConfig: {"policy": _one_of(*POLICY_NAMES), "threshold": _PROBABILITY, "prune_threshold": _PROBABILITY,
                      "background_threshold": _PROBABILITY, "time_budget_ms": _SIZE,
                      "mask_score_threshold": _PROBABILITY, "patience": _COUNT,
                      "gate_hidden": _COUNT},
    SamplerConfig: {"num_samples": _COUNT, "pos_fraction": _PROBABILITY},
    BoxHeadConfig: {"roi_size": _COUNT, "num_fcs": _SIZE, "fc_channels": _COUNT, "loss_bbox": _LOSS_BBOX,
                    "smooth_l1_beta": _above(0), "num_convs": _SIZE, "conv_channels": _COUNT, "norm": _NORM},
    MaskHeadConfig: {"roi_size": _COUNT, "num_convs": _SIZE, "conv_channels": _COUNT, "size": _COUNT,
                     "norm": _NORM},
    RoITestConfig: {"score_thr": _PROBABILITY, "nms_iou": _IOU, "max_per_img": _COUNT, "mask_thr": _PROBABILITY,
                    "mask_output": _one_of("full", "probs"), "mask_ensemble": _one_of("mean", "last")},
    HTCConfig: {"semantic_num_classes": _COUNT, "semantic_loss_weight": _at_least(0), "semantic_fusion_level": _SIZE},
    RoIHeadConfig: {"type": _one_of("standard", "cascade", "htc"), "num_stages": _COUNT, "iou_thresholds": _IOU,
                    "stage_loss_weights": _at_least(0), "bbox_stds": _above(0), "finest_scale": _COUNT,
                    "early_exit.policy": _one_of(*REGION_POLICIES)},  # a cascade takes the region policies only
    ModelConfig: {"num_classes": _COUNT},
    ServeConfig: {"port": _within(0, 65535), "max_batch": _SIZE, "max_wait_ms": _SIZE, "max_upload_bytes": _COUNT,
                  "max_pixels": _COUNT, "score_thr": _PROBABILITY},
    TTAConfig: {"scales": _COUNT},
    DataConfig: {"batch_size": _COUNT, "num_workers": _SIZE, "flip_prob": _PROBABILITY, "min_size": _SIZE,
                 "train_scales": _COUNT, "scale_mode": _one_of("choice", "range")},
    LSJConfig: {"output_size": _SIZE, "scale_range": _above(0)},
    PhotometricConfig: {"brightness_delta": _SIZE, "contrast_range": _SIZE, "saturation_range": _SIZE,
                        "hue_delta": _within(0, 180)},
    TrainConfig: {"epochs": _SIZE, "max_iters": _SIZE, "optimizer": _one_of("sgd", "adamw"), "lr": _above(0),
                  "momentum": _PROBABILITY, "betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "weight_decay": _SIZE, "warmup_iters": _SIZE, "warmup_ratio": _PROBABILITY,
                  "lr_schedule": _one_of("step", "cosine"), "lr_steps": _SIZE, "lr_gamma": _above(0),
                  "min_lr_ratio": _PROBABILITY, "grad_clip": _SIZE, "checkpoint_interval": _SIZE,
                  "keep_checkpoints": _SIZE, "log_interval": _SIZE, "amp": _one_of("none", "bf16", "fp16"),
                  "accumulate": _COUNT, "eval_interval": _SIZE, "loggers": _one_of(*LOGGERS),
                  "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                             "auto, cpu, cuda or cuda:N")},
}


def _check_backbone(cfg: BackboneConfig, prefix: str) -> None:
    if cfg.type != "resnet" and cfg.norm == "gn":
        raise ConfigError(f"{prefix}norm 'gn' is for ResNet backbones; {cfg.type} takes bn or syncbn")
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
    if cfg.type != "htc":  # switching an HTC idea on for another head would be silently ignored
        for name in ("interleaved", "mask_info_flow", "with_semantic"):
            if getattr(cfg.htc, name):
                raise ConfigError(f"{prefix}htc.{name} is for HTC heads only ({prefix}type: htc), and this head is "
                                  f"'{cfg.type}'")


def _check_model(cfg: ModelConfig, prefix: str) -> None:
    if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(f"{prefix}class_names has {len(cfg.class_names)} names but {prefix}num_classes is "
                          f"{cfg.num_classes}")
    if len(cfg.rpn.anchor_strides) != cfg.neck.num_outs:
        raise ConfigError(f"{prefix}rpn.anchor_strides has {len(cfg.rpn.anchor_strides)} levels but "
                          f"{prefix}neck.num_outs is {cfg.neck.num_outs}")
    htc = cfg.roi_head.htc
    if htc.with_semantic and htc.semantic_fusion_level >= cfg.neck.num_outs:
        raise ConfigError(f"{prefix}roi_head.htc.semantic_fusion_level must be a neck level below "
                          f"{prefix}neck.num_outs ({cfg.neck.num_outs}), got {htc.semantic_fusion_level}")


def _check_train(cfg: TrainConfig, prefix: str) -> None:
    if cfg.max_iters <= 0 and cfg.epochs <= 0:
        raise ConfigError(f"training needs {prefix}max_iters > 0 or {prefix}epochs > 0, "
                          f"got {cfg.max_iters} and {cfg.epochs}")
    # a checkpoint or an eval in the middle of an accumulation would miss the gradients gathered so far
    for name in ("checkpoint_interval", "eval_interval"):
        if getattr(cfg, name) % cfg.accumulate:
            raise ConfigError(f"{prefix}{name} ({getattr(cfg, name)}) must be a multiple of {prefix}accumulate "
                              f"({cfg.accumulate})")


def _check_data(cfg: DataConfig, prefix: str) -> None:
    scales = cfg.train_scales
    if any(len(scale) not in (1, 2) for scale in scales):
        raise ConfigError(f"{prefix}train_scales: each entry is [long, short] or a short side, got "
                          f"{[list(s) for s in scales]}")
    if cfg.scale_mode == "range" and (len(scales) != 2 or len(scales[0]) != len(scales[1])):
        raise ConfigError(f"{prefix}scale_mode range needs two {prefix}train_scales of one kind (two [long, short] "
                          f"or two short sides) to draw between, got {[list(s) for s in scales]}")
    if cfg.lsj.output_size > 0 and scales:
        raise ConfigError(f"{prefix}lsj and {prefix}train_scales both resize the training images; give one of them")
    low, high = cfg.lsj.scale_range
    if low > high:
        raise ConfigError(f"{prefix}lsj.scale_range must be [low, high] with low <= high, got {[low, high]}")
    for name in ("contrast_range", "saturation_range"):
        low, high = getattr(cfg.photometric, name)
        if low > high:
            raise ConfigError(f"{prefix}photometric.{name} must be [low, high] with low <= high, got {[low, high]}")


_CHECKS = {BackboneConfig: _check_backbone, RPNConfig: _check_rpn, RoIHeadConfig: _check_roi_head,
           ModelConfig: _check_model, TrainConfig: _check_train,
           DataConfig: _check_data}


def _values(value: Any) -> list:
    """The scalars of a field: the value itself, or every value of a (nested) tuple."""
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _values(item)]
    return [value]


def validate(cfg: Any, prefix: str = "", rules: dict | None = None) -> None:
    """Raise a one-line ConfigError naming the key of the first value out of range, unknown choice or
    inconsistency between keys; return None if the config is fine.

    Takes a whole `Config` or any section of it, or another config made of these sections (the segmentation
    config): `prefix` is the section's place, e.g. `validate(model_cfg, "model.")`. Every float must be finite.
    `rules` (field -> rule) replace the section's own rules of those fields (the parent's dotted rules).
    """
    rules = {**_RULES.get(type(cfg), {}), **(rules or {})}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            inner = {name.split(".", 1)[1]: rule for name, rule in rules.items() if name.startswith(f.name + ".")}
            validate(value, key + ".", inner)
            continue
        shown = list(value) if isinstance(value, tuple) else value
        scalars = _values(value)
        if any(isinstance(v, float) and not math.isfinite(v) for v in scalars):
            raise ConfigError(f"{key} must be a finite number, got {shown!r}")
        rule = rules.get(f.name)
        if rule and not all(rule[0](v) for v in scalars):
            each = " (each value)" if isinstance(value, tuple) else ""
            raise ConfigError(f"{key}{each} must be {rule[1]}, got {shown!r}")
    check = _CHECKS.get(type(cfg))
    if check:
        check(cfg, prefix)
