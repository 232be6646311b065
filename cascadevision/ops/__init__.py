"""Pure tensor functions (no nn.Module state): RoIAlign, box geometry and coder, NMS, mask pasting.

Everything runs on CPU and CUDA with plain PyTorch ops; no compiled extension is needed.
"""
from .boxes import batched_nms, box_area, box_ioa, box_iou, clip_boxes, decode_boxes, encode_boxes, nms
from .masks import paste_masks
from .roi_align import map_roi_levels, multi_scale_roi_align, roi_align

__all__ = [
    "batched_nms", "box_area", "box_ioa", "box_iou", "clip_boxes", "decode_boxes", "encode_boxes",
    "map_roi_levels", "multi_scale_roi_align", "nms", "paste_masks", "roi_align",
]
