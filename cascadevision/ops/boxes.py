"""Box geometry, the delta box coder and NMS. Boxes are (x1, y1, x2, y2) with w = x2 - x1 (no +1).

Areas and IoUs are computed in float32 (float64 for float64 input) whatever the input dtype. `nms` is the exact
greedy algorithm of torchvision (a box is dropped when its IoU with a kept, higher-scoring box is
> iou_threshold), resolved block by block with tensor ops instead of a loop over boxes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .precision import autocast_off

__all__ = ["batched_nms", "box_area", "box_ioa", "box_iou", "clip_boxes", "decode_boxes", "encode_boxes", "nms"]

_EPS = 1e-6  # smallest union (or area) IoU divides by, as MMDetection's bbox_overlaps: 0 / 0 gives 0, not NaN
_NMS_BLOCK = 256  # boxes resolved together; the suppression matrix of a block is _NMS_BLOCK^2 booleans
_PAIRWISE_ELEMENTS = 1 << 22  # box_iou/box_ioa compute (rows, M) blocks of at most this many pairs
_NMS_COLUMNS = 16384  # kept boxes a block is tested against at once (bounds the (block, kept) IoU matrix)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def box_area(boxes: Tensor) -> Tensor:
    """(...,) areas of (..., 4) boxes, in float32 (float64 for float64 boxes)."""
    boxes = boxes.to(_compute_dtype(boxes))
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(N, M) intersection over union of (N, 4) and (M, 4) boxes. Differentiable."""
    return _pairwise_overlap(boxes1, boxes2, over_union=True)


def box_ioa(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(N, M) intersection over the area of boxes1 (MMDetection's "iof"), e.g. how much of a box a crowd covers."""
    return _pairwise_overlap(boxes1, boxes2, over_union=False)


def _pairwise_overlap(boxes1: Tensor, boxes2: Tensor, over_union: bool) -> Tensor:
    """IoU or IoA, a block of rows of boxes1 at a time so that the temporaries stay small (gt x 200k anchors)."""
    dtype = _compute_dtype(boxes1, boxes2)
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    x1, y1, x2, y2 = boxes2.t().contiguous()  # (M,) each
    out = boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]))
    step = max(_PAIRWISE_ELEMENTS // max(boxes2.shape[0], 1), 1)
    for start in range(0, boxes1.shape[0], step):
        part = boxes1[start:start + step]
        width = (torch.minimum(part[:, 2:3], x2) - torch.maximum(part[:, 0:1], x1)).clamp(min=0)
        height = (torch.minimum(part[:, 3:4], y2) - torch.maximum(part[:, 1:2], y1)).clamp(min=0)
        inter = width * height
        if over_union:
            denominator = area1[start:start + step, None] + area2 - inter
        else:
            denominator = area1[start:start + step, None].expand_as(inter)
        out[start:start + step] = inter / denominator.clamp(min=_EPS)
    return out


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip (..., 4) boxes to an image of size (h, w): x into [0, w], y into [0, h]. Differentiable."""
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], -1)


# ------------------------------------------------------------------------------------------------- box coder


def encode_boxes(proposals: Tensor, gt: Tensor, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets (N, 4) = (dx, dy, dw, dh) taking `proposals` to `gt` (MMDet DeltaXYWHBBoxCoder).

    dx = (gx - px) / pw, dw = log(gw / pw) (y likewise), then (delta - means) / stds. Computed in float32 and
    returned in the dtype of the inputs.
    """
    out_dtype = torch.promote_types(proposals.dtype, gt.dtype)
    dtype = _compute_dtype(proposals, gt)
    proposals, gt = proposals.to(dtype), gt.to(dtype)
    p_ctr = (proposals[..., :2] + proposals[..., 2:]) * 0.5
    p_size = proposals[..., 2:] - proposals[..., :2]
    g_ctr = (gt[..., :2] + gt[..., 2:]) * 0.5
    g_size = gt[..., 2:] - gt[..., :2]
    deltas = torch.cat([(g_ctr - p_ctr) / p_size, torch.log(g_size / p_size)], -1)  # (N, 4): dx, dy, dw, dh
    means_t = deltas.new_tensor(means)
    stds_t = deltas.new_tensor(stds)
    return ((deltas - means_t) / stds_t).to(out_dtype)


def decode_boxes(rois: Tensor, deltas: Tensor, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0), max_shape: tuple[int, int] | None = None,
                 wh_ratio_clip: float = 16 / 1000) -> Tensor:
    """Apply (N, 4 * k) deltas (k boxes per RoI, e.g. one per class) to (N, 4) `rois`; returns (N, 4 * k).

    Inverse of `encode_boxes`: deltas * stds + means, |dw|, |dh| clamped to |log(wh_ratio_clip)|, centre
    p + pw * dx, size pw * exp(dw). With max_shape = (h, w) the corners are clipped to [0, w] x [0, h].
    Computed in float32 and returned in the dtype of the inputs.
    """
    if deltas.shape[-1] % 4 != 0:
        raise ValueError(f"decode_boxes: deltas must have 4 * k columns, got shape {tuple(deltas.shape)}")
    out_dtype = torch.promote_types(rois.dtype, deltas.dtype)
    dtype = _compute_dtype(rois, deltas)
    rois, deltas = rois.to(dtype), deltas.to(dtype)
    deltas = deltas.unflatten(-1, (-1, 4))  # (N, k, 4)
    deltas = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    rois = rois[..., None, :]  # (N, 1, 4)
    p_ctr = (rois[..., :2] + rois[..., 2:]) * 0.5
    p_size = rois[..., 2:] - rois[..., :2]
    max_ratio = abs(math.log(wh_ratio_clip))
    ctr = p_ctr + p_size * deltas[..., :2]
    size = p_size * deltas[..., 2:].clamp(-max_ratio, max_ratio).exp()
    boxes = torch.cat([ctr - size * 0.5, ctr + size * 0.5], -1)  # (N, k, 4)
    if max_shape is not None:
        boxes = clip_boxes(boxes, max_shape)
    return boxes.flatten(-2).to(out_dtype)


# ------------------------------------------------------------------------------------------------------- NMS


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; returns the kept indices (LongTensor) by decreasing score.

    A box is suppressed when its IoU with an already kept, higher-scoring box is > iou_threshold. Equal scores
    are ranked by index (the lower index first).
    """
    _check_nms_inputs(boxes, scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[_greedy_keep(boxes[order].to(_compute_dtype(boxes)), iou_threshold)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently for each value of `idxs` (a class or FPN level); kept indices by decreasing score.

    Same result as torchvision/MMDetection's coordinate-offset trick (boxes of different idxs never suppress each
    other), but without moving boxes by idx * (max_coordinate + 1): the suppression test simply requires equal
    idxs, so there is no float32 rounding of offset coordinates and negative coordinates are fine.
    """
    _check_nms_inputs(boxes, scores)
    if idxs.shape != scores.shape:
        raise ValueError(f"batched_nms: idxs must be ({scores.shape[0]},), got shape {tuple(idxs.shape)}")
    # process group by group (score order inside a group): earlier groups can then be skipped entirely
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(idxs[order], stable=True).indices]
    kept = order[_greedy_keep(boxes[order].to(_compute_dtype(boxes)), iou_threshold, idxs[order])]
    kept = kept.sort().values  # rank equal scores by index
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def _check_nms_inputs(boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms: boxes must be (N, 4) and scores (N,), got {tuple(boxes.shape)} and "
                         f"{tuple(scores.shape)}")


def _iou_columns(block: Tensor, block_area: Tensor, others: Tensor, others_area: Tensor) -> Tensor:
    """(B, M) IoU of boxes given as (4, n) coordinate rows (same arithmetic as box_iou, fewer temporaries)."""
    width = torch.minimum(block[2][:, None], others[2][None, :])
    width.sub_(torch.maximum(block[0][:, None], others[0][None, :])).clamp_(min=0)
    height = torch.minimum(block[3][:, None], others[3][None, :])
    height.sub_(torch.maximum(block[1][:, None], others[1][None, :])).clamp_(min=0)
    inter = width.mul_(height)
    union = block_area[:, None] + others_area[None, :]
    union.sub_(inter).clamp_(min=_EPS)
    return inter.div_(union)


def _greedy_keep(boxes: Tensor, iou_threshold: float, groups: Tensor | None = None) -> Tensor:
    """Positions kept by greedy NMS over `boxes` taken in the given order (sorted by `groups` when given).

    Blocks of _NMS_BLOCK boxes are resolved in order. A block first drops the boxes overlapping any box kept by
    earlier blocks (one matrix test), then settles its own greedy order by the fixed-point iteration
    keep_i = alive_i and not any_{j < i}(keep_j and iou_ij > t): entry i only depends on entries before it, so
    after t rounds the first t entries are final and the first round with no change gives the greedy answer.
    """
    with autocast_off(boxes.device):  # the suppression count is a matmul: keep it in the boxes' dtype
        return _greedy_keep_blocks(boxes, iou_threshold, groups)


def _greedy_keep_blocks(boxes: Tensor, iou_threshold: float, groups: Tensor | None) -> Tensor:
    num = boxes.shape[0]
    coords = boxes.t().contiguous()  # (4, N): x1, y1, x2, y2 rows, so every broadcast below is contiguous
    areas = (coords[2] - coords[0]) * (coords[3] - coords[1])
    kept = torch.zeros(0, dtype=torch.long, device=boxes.device)  # positions kept so far, in order
    for start in range(0, num, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, num)
        block, block_area = coords[:, start:stop], areas[start:stop]
        alive = torch.ones(stop - start, dtype=torch.bool, device=boxes.device)
        earlier = kept
        if groups is not None and earlier.numel():
            # boxes are sorted by group: only kept boxes of this block's first group or later can suppress it
            earlier = earlier[int(torch.searchsorted(groups[earlier], groups[start:start + 1])):]
        for first in range(0, earlier.numel(), _NMS_COLUMNS):
            columns = earlier[first:first + _NMS_COLUMNS]
            iou = _iou_columns(block, block_area, coords[:, columns], areas[columns])
            if groups is not None:
                iou.mul_(groups[start:stop, None] == groups[None, columns])
            alive &= iou.amax(1) <= iou_threshold
        # [i, j]: box j comes before box i in the block and overlaps it
        suppresses = (_iou_columns(block, block_area, block, block_area) > iou_threshold).tril_(-1)
        if groups is not None:
            suppresses &= groups[start:stop, None] == groups[None, start:stop]
        suppresses = suppresses.to(boxes.dtype)
        block_keep = alive
        while True:
            update = alive & ((suppresses @ block_keep.to(boxes.dtype)) == 0)
            if torch.equal(update, block_keep):
                break
            block_keep = update
        kept = torch.cat([kept, block_keep.nonzero().squeeze(1) + start])
    return kept
