"""Named model presets. Each starts from the reference defaults in `config.py` and changes only what differs."""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from ..errors import ConfigError


def _replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def _faster_rcnn(depth: int = 50) -> ModelConfig:
    cfg = ModelConfig()
    return _replace(cfg, backbone=_replace(cfg.backbone, depth=depth),
                    roi_head=_replace(cfg.roi_head, with_mask=False))


def _mask_rcnn(depth: int = 50) -> ModelConfig:
    cfg = ModelConfig()
    return _replace(cfg, backbone=_replace(cfg.backbone, depth=depth))


def _cpu_small(cfg: ModelConfig, depth: int = 18) -> ModelConfig:
    """A small model that trains on a CPU in minutes: ResNet-18/34, narrower heads, smaller inputs."""
    return _replace(
        cfg,
        input=_replace(cfg.input, scale=(512, 320)),
        backbone=_replace(cfg.backbone, depth=depth, frozen_stages=-1, norm_eval=False),
        neck=_replace(cfg.neck, out_channels=128),
        rpn=_replace(cfg.rpn, feat_channels=128, train_pre_nms=1000, train_post_nms=500,
                     test_pre_nms=500, test_post_nms=300),
        roi_head=_replace(cfg.roi_head, sampler=_replace(cfg.roi_head.sampler, num_samples=256),
                          box_head=_replace(cfg.roi_head.box_head, fc_channels=256),
                          mask_head=_replace(cfg.roi_head.mask_head, conv_channels=128)),
    )


def _gn_all(cfg: ModelConfig) -> ModelConfig:
    """GroupNorm(32) everywhere, as MMDetection's `mask_rcnn_r50_fpn_gn-all_2x_coco`: GN ResNet, GN after every FPN
    conv, a Shared4Conv1FC box head with GN, GN in the mask head."""
    head = cfg.roi_head
    return _replace(cfg, backbone=_replace(cfg.backbone, norm="gn"), neck=_replace(cfg.neck, norm="gn"),
                    roi_head=_replace(head, box_head=_replace(head.box_head, num_convs=4, num_fcs=1, norm="gn"),
                                      mask_head=_replace(head.mask_head, norm="gn")))


CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def _cascade(depth: int = 50, *, mask: bool, htc: bool = False, semantic: bool = False) -> ModelConfig:
    """Cascade R-CNN / Cascade Mask R-CNN / HTC as in MMDetection's configs (3 stages at IoU 0.5/0.6/0.7)."""
    cfg = ModelConfig()
    head = cfg.roi_head
    return _replace(
        cfg,
        backbone=_replace(cfg.backbone, depth=depth),
        rpn=_replace(cfg.rpn, allowed_border=0.0, loss_bbox="smooth_l1", train_post_nms=2000),
        roi_head=_replace(
            head, type="htc" if htc else "cascade", num_stages=3, iou_thresholds=(0.5, 0.6, 0.7),
            stage_loss_weights=(1.0, 0.5, 0.25), bbox_stds=CASCADE_STDS, with_mask=mask,
            # Cascade (Mask) R-CNN turns low-quality matching off for its stages
            sampler=_replace(head.sampler, match_low_quality=htc),
            box_head=_replace(head.box_head, reg_class_agnostic=True, loss_bbox="smooth_l1", smooth_l1_beta=1.0),
            test=_replace(head.test, score_thr=0.001 if htc else 0.05),
            htc=_replace(head.htc, with_semantic=semantic)),  # interleaving and mask information flow: on for htc
    )


def _efficientvit(cfg: ModelConfig, variant: str = "m4") -> ModelConfig:
    """An EfficientViT backbone feeding the FPN with five levels (strides 4..64: two stem outputs, three stages)."""
    return _replace(cfg, backbone=_replace(cfg.backbone, type=f"efficientvit_{variant}", out_indices=(0, 1, 2, 3, 4),
                                           frozen_stages=-1, norm_eval=True))


PRESETS = {
    "faster_rcnn_r50_fpn_1x": lambda: _faster_rcnn(50),
    "faster_rcnn_r101_fpn_1x": lambda: _faster_rcnn(101),
    "mask_rcnn_r50_fpn_1x": lambda: _mask_rcnn(50),
    "mask_rcnn_r101_fpn_1x": lambda: _mask_rcnn(101),
    "mask_rcnn_r50_fpn_gn_2x": lambda: _gn_all(_mask_rcnn(50)),
    "faster_rcnn_r18_fpn": lambda: _cpu_small(_faster_rcnn(18)),
    "mask_rcnn_r18_fpn": lambda: _cpu_small(_mask_rcnn(18)),
    "mask_rcnn_r34_fpn": lambda: _cpu_small(_mask_rcnn(34), depth=34),
    "cascade_rcnn_r50_fpn_1x": lambda: _cascade(50, mask=False),
    "cascade_rcnn_r101_fpn_1x": lambda: _cascade(101, mask=False),
    "cascade_mask_rcnn_r50_fpn_1x": lambda: _cascade(50, mask=True),
    "cascade_mask_rcnn_r101_fpn_1x": lambda: _cascade(101, mask=True),
    "htc_without_semantic_r50_fpn_1x": lambda: _cascade(50, mask=True, htc=True),
    "htc_r50_fpn_1x": lambda: _cascade(50, mask=True, htc=True, semantic=True),
    "htc_r50_fpn_20e": lambda: _cascade(50, mask=True, htc=True, semantic=True),
    "htc_r101_fpn_20e": lambda: _cascade(101, mask=True, htc=True, semantic=True),
    "cascade_rcnn_r18_fpn": lambda: _cpu_small(_cascade(18, mask=False)),
    "cascade_mask_rcnn_r18_fpn": lambda: _cpu_small(_cascade(18, mask=True)),
    "htc_without_semantic_r18_fpn": lambda: _cpu_small(_cascade(18, mask=True, htc=True)),
    "htc_r18_fpn": lambda: _cpu_small(_cascade(18, mask=True, htc=True, semantic=True)),
    **{f"htc_efficientvit_{v}_fpn": (lambda v=v: _efficientvit(_cascade(50, mask=True, htc=True, semantic=True), v))
       for v in ("m0", "m1", "m2", "m3", "m4", "m5")},
    "mask_rcnn_efficientvit_m4_fpn": lambda: _efficientvit(_mask_rcnn(50), "m4"),
    "cascade_mask_rcnn_efficientvit_m4_fpn": lambda: _efficientvit(_cascade(50, mask=True), "m4"),
}

# presets named after MMDetection's COCO configs: their published weights are COCO's 80 classes
# (`cascadevision.data.coco_classes`), which `predict PRESET --weights FILE` assumes when the file names none
COCO_PRESETS = frozenset(name for name in PRESETS if "_r50_" in name or "_r101_" in name)

# training schedules that differ from the 1x default (12 epochs, steps at 8 and 11)
TRAIN_PRESETS = {
    "mask_rcnn_r50_fpn_gn_2x": {"epochs": 24, "lr_steps": [16, 22]},
    "htc_r50_fpn_20e": {"epochs": 20, "lr_steps": [16, 19]},
    "htc_r101_fpn_20e": {"epochs": 20, "lr_steps": [16, 19]},
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; available: {', '.join(sorted(PRESETS))}")
    return _replace(PRESETS[name](), preset=name)


def preset_names() -> list[str]:
    return sorted(PRESETS)

