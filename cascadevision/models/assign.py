"""Max-IoU assignment and random sampling of anchors/proposals, as MMDetection's MaxIoUAssigner and RandomSampler."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import box_iou


@dataclass
class AssignResult:
    gt_inds: Tensor  # (N,) 0 = negative, -1 = ignored, k > 0 = matched to gt k-1
    max_overlaps: Tensor  # (N,)
    labels: Tensor  # (N,) class of the matched gt; -1 where not positive


class MaxIoUAssigner:
    """Each box goes to the gt it overlaps most: positive if IoU >= pos_iou, negative if IoU < neg_iou, else ignored.

    With `match_low_quality`, every gt also claims the boxes that tie its own best IoU, when that IoU >= min_pos_iou
    (gts later in the list win ties, as in the reference's sequential loop).
    """

    def __init__(self, pos_iou: float, neg_iou: float, min_pos_iou: float, match_low_quality: bool = True):
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, valid: Tensor | None = None) -> AssignResult:
        num_boxes = boxes.shape[0]
        device = boxes.device
        if gt_boxes.numel() == 0 or num_boxes == 0:
            gt_inds = torch.zeros(num_boxes, dtype=torch.long, device=device)
            if valid is not None:
                gt_inds[~valid] = -1
            return AssignResult(gt_inds, boxes.new_zeros(num_boxes), torch.full_like(gt_inds, -1))
        overlaps = box_iou(gt_boxes, boxes)  # (num_gts, num_boxes)
        if valid is not None:
            overlaps = overlaps.masked_fill(~valid[None], -1.0)
        max_overlaps, argmax = overlaps.max(dim=0)
        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
        gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou)] = 0
        pos = max_overlaps >= self.pos_iou
        gt_inds[pos] = argmax[pos] + 1
        if self.match_low_quality:
            gt_max = overlaps.max(dim=1).values  # (num_gts,)
            claims = (overlaps == gt_max[:, None]) & (gt_max[:, None] >= self.min_pos_iou)
            order = torch.arange(1, gt_boxes.shape[0] + 1, device=device)[:, None]
            last_claim = (claims.long() * order).max(dim=0).values  # highest gt index claiming each box
            gt_inds = torch.where(last_claim > 0, last_claim, gt_inds)
        labels = torch.full_like(gt_inds, -1)
        matched = gt_inds > 0
        labels[matched] = gt_labels[gt_inds[matched] - 1]
        return AssignResult(gt_inds, max_overlaps, labels)


@dataclass
class SamplingResult:
    pos_inds: Tensor  # indices into the box list the assigner saw
    neg_inds: Tensor
    pos_gt_inds: Tensor  # 0-based gt index for each positive
    pos_is_gt: Tensor  # (num_pos,) bool: the positive is a gt box added as a proposal


def sample(assign: AssignResult, num: int, pos_fraction: float, is_gt: Tensor | None = None) -> SamplingResult:
    """Random sampling of at most num*pos_fraction positives, the rest negatives (no upper bound ratio)."""
    pos = torch.nonzero(assign.gt_inds > 0).squeeze(1)
    neg = torch.nonzero(assign.gt_inds == 0).squeeze(1)
    num_pos = int(num * pos_fraction)
    if pos.numel() > num_pos:
        pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
    num_neg = num - pos.numel()
    if neg.numel() > num_neg:
        neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
    pos_is_gt = is_gt[pos] if is_gt is not None else torch.zeros_like(pos, dtype=torch.bool)
    return SamplingResult(pos, neg, assign.gt_inds[pos] - 1, pos_is_gt)
