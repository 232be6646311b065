"""RoIAlign and NMS as `torch.library` custom ops, for the export path only, and their ONNX translations.

The eager kernels are `cascadevision.ops.multi_scale_roi_align` and `cascadevision.ops.batched_nms` themselves,
so a graph that calls these ops computes exactly what the model computes. `torch.export` sees them as opaque
nodes (the fake kernels give the output shapes: NMS keeps a data-dependent number of boxes); in ONNX they become
the standard operators:

- `roi_align_levels` -> the FPN level of each RoI (MMDetection's floor(log2(sqrt(w h) / finest_scale + 1e-6))),
  then per level `NonZero` + `Gather` + `RoiAlign` (avg mode, `half_pixel` for aligned=True, `sampling_ratio` as
  ours: 0 = ceil(roi size / output size) samples per bin) + `ScatterND` back into RoI order.
- `batched_nms` -> one `NonMaxSuppression` with one score row per group (class or FPN level; the other groups'
  boxes get score -1 and are cut by `score_threshold`), then the kept boxes in our order: decreasing score,
  equal scores by index. ONNX suppresses a box when IoU > iou_threshold, like ours.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import batched_nms, multi_scale_roi_align

__all__ = ["ONNX_TRANSLATIONS", "OPSET", "nms_op", "roi_align_op"]

OPSET = 18  # RoiAlign with coordinate_transformation_mode is opset >= 16


@torch.library.custom_op("cascadevision::roi_align_levels", mutates_args=())
def roi_align_op(features: list[Tensor], rois: Tensor, strides: list[int], output_size: int, finest_scale: int,
                 sampling_ratio: int, aligned: bool) -> Tensor:
    """(K, C, S, S): `multi_scale_roi_align` of `rois` (K, 5) over `features` (finest first)."""
    out = multi_scale_roi_align(features, rois, output_size, strides, finest_scale=finest_scale,
                                sampling_ratio=sampling_ratio, aligned=aligned)
    return out.contiguous()


@roi_align_op.register_fake
def _(features, rois, strides, output_size, finest_scale, sampling_ratio, aligned):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], output_size, output_size))


@torch.library.custom_op("cascadevision::batched_nms", mutates_args=())
def nms_op(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, num_groups: int) -> Tensor:
    """Kept indices by decreasing score (`batched_nms`); `num_groups` bounds `groups` for the ONNX translation."""
    return batched_nms(boxes, scores, groups, iou_threshold)


@nms_op.register_fake
def _(boxes, scores, groups, iou_threshold, num_groups):
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.long)


# ------------------------------------------------------------------------------------------ ONNX translations


def _onnx_roi_align(features, rois, strides, output_size, finest_scale, sampling_ratio, aligned):
    from onnxscript import opset18 as op  # lazy: onnxscript is only needed to write ONNX files

    num_levels = len(features)
    boxes = op.Slice(rois, [1], [5], [1])  # (K, 4)
    batch_index = op.Cast(op.Squeeze(op.Slice(rois, [0], [1], [1]), [1]), to=7)  # int64 (K,)
    x1, y1, x2, y2 = op.Split(boxes, axis=1, num_outputs=4)
    area = op.Max(op.Mul(op.Sub(x2, x1), op.Sub(y2, y1)), op.Constant(value_float=0.0))
    scale = op.Add(op.Div(op.Sqrt(area), op.Constant(value_float=float(finest_scale))), op.Constant(value_float=1e-6))
    log2 = op.Div(op.Log(scale), op.Constant(value_float=0.6931471805599453))
    level = op.Clip(op.Floor(log2), op.Constant(value_float=0.0), op.Constant(value_float=float(num_levels - 1)))
    level = op.Cast(op.Squeeze(level, [1]), to=7)  # (K,)
    channels = op.Shape(features[0], start=1, end=2)
    out_shape = op.Concat(op.Shape(rois, start=0, end=1), channels,
                          op.Constant(value_ints=[output_size, output_size]), axis=0)
    out = op.Expand(op.Constant(value_float=0.0), out_shape)
    mode = "half_pixel" if aligned else "output_half_pixel"
    for lvl, (feat, stride) in enumerate(zip(features, strides)):
        index = op.NonZero(op.Equal(level, op.Constant(value_int=lvl)))  # (1, k)
        flat = op.Squeeze(index, [0])
        pooled = op.RoiAlign(feat, op.Gather(boxes, flat, axis=0), op.Gather(batch_index, flat, axis=0),
                             coordinate_transformation_mode=mode, mode="avg", output_height=output_size,
                             output_width=output_size, sampling_ratio=sampling_ratio, spatial_scale=1.0 / stride)
        out = op.ScatterND(out, op.Transpose(index, perm=[1, 0]), pooled)
    return out


def _onnx_nms(boxes, scores, groups, iou_threshold, num_groups):
    from onnxscript import opset18 as op  # lazy: onnxscript is only needed to write ONNX files

    group_ids = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=num_groups),
                                      op.Constant(value_int=1)), [1])  # (G, 1)
    in_group = op.Equal(op.Unsqueeze(groups, [0]), group_ids)  # (G, N)
    score_rows = op.Where(in_group, op.Unsqueeze(scores, [0]), op.Constant(value_float=-1.0))
    num = op.Shape(boxes, start=0, end=1)
    selected = op.NonMaxSuppression(op.Unsqueeze(boxes, [0]), op.Unsqueeze(score_rows, [0]), num,
                                    op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[-0.5]))
    kept = op.Squeeze(op.Slice(selected, [2], [3], [1]), [1])  # (M,) box indices, by group
    count = op.Shape(kept, start=0, end=1)
    kept, _ = op.TopK(kept, count, axis=0, largest=0, sorted=1)  # by index
    _, order = op.TopK(op.Gather(scores, kept, axis=0), count, axis=0, largest=1, sorted=1)  # ties: lower first
    return op.Gather(kept, order, axis=0)


ONNX_TRANSLATIONS = {
    torch.ops.cascadevision.roi_align_levels.default: _onnx_roi_align,
    torch.ops.cascadevision.batched_nms.default: _onnx_nms,
}
