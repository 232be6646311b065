"""Pure tensor functions (no nn.Module state): RoIAlign, box geometry and coder, NMS, mask pasting, layout.

Everything runs on CPU and CUDA with plain PyTorch ops; no compiled extension is needed.
"""
from .boxes import batched_nms, box_area, box_ioa, box_iou, clip_boxes, decode_boxes, encode_boxes, nms
from .layout import standard_strides
from .masks import iter_pasted_masks, paste_masks
from .roi_align import map_roi_levels, multi_scale_roi_align, roi_align

__all__ = [
    "batched_nms", "box_area", "box_ioa", "box_iou", "clip_boxes", "decode_boxes", "encode_boxes",
    "iter_pasted_masks", "map_roi_levels", "multi_scale_roi_align", "nms", "paste_masks", "roi_align",
    "standard_strides",
]
