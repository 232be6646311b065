"""The single-stage RoI head of Faster/Mask R-CNN and the pieces every RoI head shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RoIHeadConfig, SamplerConfig
from ..ops import decode_boxes, encode_boxes, multi_scale_roi_align, roi_align
from .assign import MaxIoUAssigner, sample
from .bbox_head import BBoxHead, multiclass_nms
from .mask_head import MaskHead, mask_loss, mask_targets


@dataclass
class SampledRoIs:
    """The RoIs sampled for one training step, per image; positives come first in each image's list."""
    boxes: list[Tensor]  # (n_i, 4)
    labels: list[Tensor]  # (n_i,), num_classes = background
    pos_gt_inds: list[Tensor]  # (p_i,) index of each positive's gt
    pos_is_gt: list[Tensor]  # (p_i,) the positive is a gt box added as a proposal

    @property
    def num_pos(self) -> list[int]:
        return [len(g) for g in self.pos_gt_inds]

    def pos_boxes(self) -> list[Tensor]:
        return [b[:p] for b, p in zip(self.boxes, self.num_pos)]


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image boxes -> (K, 5) RoIs [batch_idx, x1, y1, x2, y2]."""
    idx = [torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(idx), torch.cat(boxes)], dim=1)


def sample_rois(proposals: list[Tensor], targets: list[dict], assigner: MaxIoUAssigner, cfg: SamplerConfig,
                num_classes: int) -> SampledRoIs:
    out = SampledRoIs([], [], [], [])
    for props, target in zip(proposals, targets):
        gt_boxes, gt_labels = target["boxes"], target["labels"]
        boxes, is_gt = props, torch.zeros(len(props), dtype=torch.bool, device=props.device)
        if cfg.add_gt_as_proposals and len(gt_boxes):
            boxes = torch.cat([gt_boxes.to(props.dtype), props])
            is_gt = torch.cat([torch.ones(len(gt_boxes), dtype=torch.bool, device=props.device), is_gt])
        assign = assigner.assign(boxes, gt_boxes, gt_labels)
        s = sample(assign, cfg.num_samples, cfg.pos_fraction, is_gt)
        out.boxes.append(torch.cat([boxes[s.pos_inds], boxes[s.neg_inds]]))
        out.labels.append(torch.cat([gt_labels[s.pos_gt_inds], gt_labels.new_full((len(s.neg_inds),), num_classes)]))
        out.pos_gt_inds.append(s.pos_gt_inds)
        out.pos_is_gt.append(s.pos_is_gt)
    return out


def delta_targets(sampled: SampledRoIs, targets: list[dict], stds) -> Tensor:
    """Encoded regression targets of all positives, in the order of the positive RoIs."""
    pos = [encode_boxes(b[:p], t["boxes"][g], stds=stds)
           for b, p, g, t in zip(sampled.boxes, sampled.num_pos, sampled.pos_gt_inds, targets)]
    return torch.cat(pos)


def positive_mask_targets(sampled_pos_boxes: list[Tensor], pos_gt_inds: list[Tensor], targets: list[dict],
                          scale_factors, size: int) -> Tensor:
    return torch.cat([mask_targets(t["masks"], b, g, s, size)
                      for b, g, t, s in zip(sampled_pos_boxes, pos_gt_inds, targets, scale_factors)])


# P2-P5 of a standard FPN: only for a head built on its own (tests); `build_from_config` passes the neck's strides
STANDARD_FPN_STRIDES = (4, 8, 16, 32)


class RoIHead(nn.Module):
    """What every RoI head shares: RoIAlign over the finest neck levels (plus, when given, the pooled semantic
    feature of HTC) and the mask loss on the positive RoIs. Subclasses provide `_mask_logits(stage, feats)`."""

    def __init__(self, cfg: RoIHeadConfig, num_classes: int, strides):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.strides = tuple(strides)  # of the levels RoIs are pooled from, finest first
        self.mask_head = None

    @property
    def with_mask(self) -> bool:
        return self.mask_head is not None

    def _roi_features(self, features: list[Tensor], rois: Tensor, size: int,
                      semantic_feat: Tensor | None = None) -> Tensor:
        feats = multi_scale_roi_align(features[: len(self.strides)], rois, size, self.strides,
                                      finest_scale=self.cfg.finest_scale, sampling_ratio=0, aligned=True)
        if semantic_feat is not None:
            # the semantic map is pooled at the mask size for both branches, then averaged down for boxes
            stride = self.strides[self.cfg.htc.semantic_fusion_level]
            sem = roi_align(semantic_feat, rois, self.cfg.mask_head.roi_size, spatial_scale=1.0 / stride,
                            sampling_ratio=0, aligned=True)
            if sem.shape[-1] != size:
                # 14 -> 7 is a plain 2x2 average (much faster to backpropagate than the adaptive pool)
                factor = sem.shape[-1] // size
                sem = (F.avg_pool2d(sem, factor) if factor * size == sem.shape[-1]
                       else F.adaptive_avg_pool2d(sem, size))
            feats = feats + sem
        return feats

    def _mask_logits(self, stage: int, mask_feats: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def _mask_loss(self, stage: int, features, sampled: SampledRoIs, targets, scale_factors,
                   semantic_feat: Tensor | None = None) -> Tensor:
        """The mask loss of `stage`'s mask head on the positive RoIs of `sampled`."""
        pos_boxes = sampled.pos_boxes()
        mask_feats = self._roi_features(features, boxes_to_rois(pos_boxes), self.cfg.mask_head.roi_size, semantic_feat)
        logits = self._mask_logits(stage, mask_feats)[-1]
        target = positive_mask_targets(pos_boxes, sampled.pos_gt_inds, targets, scale_factors, logits.shape[-1])
        labels = torch.cat([l[:p] for l, p in zip(sampled.labels, sampled.num_pos)])
        return mask_loss(logits, labels, target)


class StandardRoIHead(RoIHead):
    """One box head (and one mask head) on RoIAlign features of P2..P5: Faster R-CNN and Mask R-CNN."""

    def __init__(self, cfg: RoIHeadConfig, num_classes: int, in_channels: int, strides=STANDARD_FPN_STRIDES):
        super().__init__(cfg, num_classes, strides)
        box, mask = cfg.box_head, cfg.mask_head
        self.bbox_head = BBoxHead(in_channels, box.roi_size, box.num_fcs, box.fc_channels, num_classes,
                                  box.reg_class_agnostic, num_convs=box.num_convs, conv_channels=box.conv_channels,
                                  norm=box.norm)
        self.mask_head = (MaskHead(in_channels, mask.conv_channels, mask.num_convs, num_classes, norm=mask.norm)
                          if cfg.with_mask else None)
        iou = cfg.iou_thresholds[0]
        self.assigner = MaxIoUAssigner(iou, iou, iou, cfg.sampler.match_low_quality)

    def _mask_logits(self, stage: int, mask_feats: Tensor) -> list[Tensor]:
        return [self.mask_head(mask_feats)[0]]

    def loss(self, features, proposals, image_sizes, targets, scale_factors) -> dict[str, Tensor]:
        sampled = sample_rois(proposals, targets, self.assigner, self.cfg.sampler, self.num_classes)
        rois = boxes_to_rois(sampled.boxes)
        cls_score, deltas = self.bbox_head(self._roi_features(features, rois, self.cfg.box_head.roi_size))
        losses = self.bbox_head.loss(cls_score, deltas, torch.cat(sampled.labels),
                                     delta_targets(sampled, targets, self.cfg.bbox_stds[0]),
                                     self.cfg.box_head.loss_bbox, self.cfg.box_head.smooth_l1_beta)
        if self.with_mask:
            losses["loss_mask"] = self._mask_loss(0, features, sampled, targets, scale_factors)
        return losses

    @torch.no_grad()
    def predict(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        rois = boxes_to_rois(proposals)
        cls_score, deltas = self.bbox_head(self._roi_features(features, rois, self.cfg.box_head.roi_size))
        scores = cls_score.float().softmax(-1)
        counts = [len(p) for p in proposals]
        detections = []
        for props, s, d, size in zip(proposals, scores.split(counts), deltas.split(counts), image_sizes):
            boxes = decode_boxes(props, d, stds=self.cfg.bbox_stds[0], max_shape=size)
            boxes = boxes.view(len(props), -1, 4)
            if boxes.shape[1] == 1:
                boxes = boxes[:, 0]
            detections.append(dict(zip(("boxes", "scores", "labels"), multiclass_nms(
                boxes, s, self.cfg.test.score_thr, self.cfg.test.nms_iou, self.cfg.test.max_per_img))))
        if self.with_mask:
            self._predict_masks(features, detections)
        return detections

    def _predict_masks(self, features, detections: list[dict]) -> None:
        """Adds `mask_probs` (N, S, S): the sigmoid mask of each detection's class, in its box."""
        det_boxes = [d["boxes"] for d in detections]
        if sum(len(b) for b in det_boxes) == 0:
            for d in detections:
                d["mask_probs"] = d["boxes"].new_zeros((0, self.cfg.mask_head.size, self.cfg.mask_head.size))
            return
        logits, _ = self.mask_head(self._roi_features(features, boxes_to_rois(det_boxes), self.cfg.mask_head.roi_size))
        labels = torch.cat([d["labels"] for d in detections])
        probs = logits[torch.arange(len(labels), device=labels.device), labels].float().sigmoid()
        for d, p in zip(detections, probs.split([len(b) for b in det_boxes])):
            d["mask_probs"] = p
