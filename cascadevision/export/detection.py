"""The detectors' inference as one exportable graph: one resized, normalised, padded image in, the detections
(in the resized image's pixels) and the unpasted 28x28 mask probabilities out.

`DetectionGraph` runs the model's own modules (backbone, neck, RPN convs, box and mask heads, semantic head) and
re-states only the glue between them without Python decisions on data: batch of one, `topk` bounded with
`sym_min`, boxes clipped against the `image_size` input, and RoIAlign / NMS as the custom ops of
`cascadevision.export.ops` (whose eager kernels are the model's own). The same detections as `model(images)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.cascade import CascadeRoIHead
from ..ops import decode_boxes
from .ops import nms_op, roi_align_op


class DetectionGraph(nn.Module):
    """forward(image (1, 3, H, W) float32, H and W multiples of the size divisor; image_size (2,) int64: the
    (h, w) of the image inside the padding) -> boxes (N, 4), scores (N,), labels (N,) [, mask_probs (N, S, S)]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        head = model.roi_head
        if isinstance(head, CascadeRoIHead) and head.cfg.early_exit.enabled:
            # an attached policy that asks for nothing leaves the plain cascade, which is what is exported
            raise ConfigError("export: region-level early exit (model.roi_head.early_exit) does not export (RoIs "
                              "leave the cascade at data-dependent stages); export without it: --set "
                              "model.roi_head.early_exit.policy=none (and its thresholds and time budget at 0)")
        self.model = model
        self.cascade = isinstance(head, CascadeRoIHead)
        self.with_mask = head.with_mask

    # ------------------------------------------------------------------------------------------- pieces

    def _clip(self, boxes: Tensor, size: Tensor) -> Tensor:
        """clip_boxes against a size tensor: x into [0, w], y into [0, h]."""
        h, w = size[0].to(boxes.dtype), size[1].to(boxes.dtype)
        zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
        x1, y1, x2, y2 = boxes.unbind(-1)
        return torch.stack([torch.clamp(x1, zero, w), torch.clamp(y1, zero, h),
                            torch.clamp(x2, zero, w), torch.clamp(y2, zero, h)], -1)

    def _decode(self, rois: Tensor, deltas: Tensor, size: Tensor, stds=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
        boxes = decode_boxes(rois, deltas, stds=stds)  # (N, 4k), computed in float32
        return self._clip(boxes.unflatten(-1, (-1, 4)), size).flatten(-2)

    def _roi_features(self, features, rois: Tensor, size: int, semantic_feat: Tensor | None = None) -> Tensor:
        head = self.model.roi_head
        feats = roi_align_op(features[: len(head.strides)], rois, list(head.strides), size, head.cfg.finest_scale,
                             0, True)
        if semantic_feat is not None:
            stride = head.strides[head.cfg.htc.semantic_fusion_level]
            mask_size = head.cfg.mask_head.roi_size
            sem = roi_align_op([semantic_feat], rois, [stride], mask_size, head.cfg.finest_scale, 0, True)
            if mask_size != size:
                factor = mask_size // size
                sem = F.avg_pool2d(sem, factor) if factor * size == mask_size else F.adaptive_avg_pool2d(sem, size)
            feats = feats + sem
        return feats

    def _proposals(self, features: list[Tensor], size: Tensor) -> Tensor:
        rpn = self.model.rpn_head
        cfg = rpn.cfg
        anchors = rpn.anchor_generator.grid_anchors([f.shape[-2:] for f in features], features[0].device)
        boxes_all, scores_all, levels = [], [], []
        for level, (x, a) in enumerate(zip(features, anchors)):
            x = F.relu(rpn.rpn_conv(x))
            s = rpn.rpn_cls(x).permute(0, 2, 3, 1).reshape(-1)  # (H*W*A,)
            d = rpn.rpn_reg(x).permute(0, 2, 3, 1).reshape(-1, 4)
            s, idx = s.topk(torch.sym_min(cfg.test_pre_nms, s.shape[0]))
            boxes_all.append(self._decode(a[idx], d[idx], size))
            scores_all.append(s.sigmoid())
            levels.append(torch.full_like(s, level, dtype=torch.long))
        boxes, scores, levels_ = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(levels)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (w > cfg.min_box_size) & (h > cfg.min_box_size)
        boxes, scores, levels_ = boxes[keep], scores[keep], levels_[keep]
        keep = nms_op(boxes.float(), scores.float(), levels_, cfg.nms_iou, len(features))[: cfg.test_post_nms]
        return boxes[keep]

    def _multiclass_nms(self, boxes: Tensor, scores: Tensor):
        """multiclass_nms of models/bbox_head.py with the custom NMS op; also returns each detection's row."""
        test = self.model.roi_head.cfg.test
        num_classes = scores.shape[1] - 1
        scores = scores[:, :num_classes]
        if boxes.dim() == 2:
            boxes = boxes[:, None].expand(-1, num_classes, 4)
        rows, labels = (scores > test.score_thr).nonzero(as_tuple=True)
        boxes, scores = boxes[rows, labels], scores[rows, labels]
        keep = nms_op(boxes.float(), scores.float(), labels, test.nms_iou, num_classes)[: test.max_per_img]
        return boxes[keep], scores[keep], labels[keep], rows[keep]

    @staticmethod
    def _rois(boxes: Tensor) -> Tensor:
        return torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], 1)  # (K, 5), batch index 0

    # ------------------------------------------------------------------------------------------- heads

    def _standard(self, features, proposals, size):
        head = self.model.roi_head
        cls_score, deltas = head.bbox_head(self._roi_features(features, self._rois(proposals), head.cfg.box_head.roi_size))
        scores = cls_score.float().softmax(-1)
        boxes = self._decode(proposals, deltas, size, head.cfg.bbox_stds[0])
        boxes = boxes.view(proposals.shape[0], -1, 4)
        if boxes.shape[1] == 1:  # class-agnostic regression: a static shape, not data
            boxes = boxes[:, 0]
        boxes, scores, labels, _ = self._multiclass_nms(boxes, scores)
        out = [boxes, scores, labels]
        if self.with_mask:
            feats = self._roi_features(features, self._rois(boxes), head.cfg.mask_head.roi_size)
            logits, _ = head.mask_head(feats)
            index = torch.arange(labels.shape[0], device=labels.device)
            out.append(logits[index, labels].float().sigmoid())
        return tuple(out)

    def _cascade(self, features, proposals, size):
        head = self.model.roi_head
        semantic_feat = head.semantic_head(features)[1] if head.semantic_head is not None else None
        rois = self._rois(proposals)
        logit_sum = None
        for t in range(head.num_stages):
            cls_score, deltas = head.bbox_head[t](self._roi_features(features, rois, head.cfg.box_head.roi_size,
                                                                     semantic_feat))
            logit_sum = cls_score.float() if logit_sum is None else logit_sum + cls_score.float()
            predicted = cls_score[:, :-1].argmax(1)
            deltas = head.bbox_head[t].select_deltas(deltas, predicted)
            rois = self._rois(self._decode(rois[:, 1:], deltas, size, head.cfg.bbox_stds[t]))
        scores = (logit_sum / head.num_stages).softmax(-1)
        boxes, scores, labels, _ = self._multiclass_nms(rois[:, 1:], scores)
        out = [boxes, scores, labels]
        if self.with_mask:
            feats = self._roi_features(features, self._rois(boxes), head.cfg.mask_head.roi_size, semantic_feat)
            index = torch.arange(labels.shape[0], device=labels.device)
            probs = [logits[index, labels].float().sigmoid()
                     for logits in head._mask_logits(head.num_stages - 1, feats)]
            out.append(torch.stack(probs).mean(0) if head.cfg.test.mask_ensemble == "mean" else probs[-1])
        return tuple(out)

    def forward(self, image: Tensor, image_size: Tensor):
        features = self.model.extract_features(image)
        proposals = self._proposals(features, image_size)
        if self.cascade:
            return self._cascade(features, proposals, image_size)
        return self._standard(features, proposals, image_size)
