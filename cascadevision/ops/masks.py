"""Paste fixed-size mask predictions into full images (MMDetection v2 `_do_paste_mask`).

MMDetection samples each (h, w) mask with `grid_sample(align_corners=False)` at the image pixel centres
(+0.5) mapped into the box, so the box edges fall on the mask's outer edges, and it only fills the box grown
by one pixel and clipped to the image (its CPU path pastes mask by mask). Bilinear sampling on a grid whose x
depends only on the column and y only on the row is separable, so one mask's paste is two matmuls,
Wy (rows, h) @ mask (h, w) @ Wx^T (w, W), computed for the image rows around its box (full width, so whole
rows are copied into the output) and batched over masks of similar heights.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["paste_masks"]

_CHUNK_ELEMENTS = 1 << 22  # image pixels pasted together (16 MB in float32)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Paste (N, h, w) mask probabilities into (N, H, W) images, mask i stretched over boxes[i] (image pixels).

    Values equal MMDetection's grid_sample (bilinear, zero padding, align_corners=False, pixel centres +0.5)
    inside each box grown by one pixel and clipped to the image, and 0 elsewhere; boxes with no width or height
    give an empty mask (MMDetection would smear the mask's middle column or row across the image there).
    Returns float32 (float64 for float64 masks).
    """
    if masks.dim() != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"paste_masks: masks must be (N, h, w) and boxes (N, 4), got {tuple(masks.shape)} and "
                         f"{tuple(boxes.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    num, mask_h, mask_w = masks.shape
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    out = torch.zeros((num, height, width), dtype=dtype, device=masks.device)
    if num == 0 or height == 0 or width == 0:
        return out
    masks, boxes = masks.to(dtype), boxes.to(dtype)
    x0, y0, x1, y1 = boxes.unbind(1)
    row_lo = (y0.floor() - 1).clamp(0, height).long()
    row_hi = (y1.ceil() + 1).clamp(0, height).long()
    col_lo = (x0.floor() - 1).clamp(0, width).long()
    col_hi = (x1.ceil() + 1).clamp(0, width).long()
    empty = (x1 <= x0) | (y1 <= y0) | (col_hi <= col_lo)
    rows = torch.where(empty, 0, (row_hi - row_lo).clamp(min=0))  # (N,) image rows to paste; 0: nothing

    # Each mask is pasted as full-width image rows (so rows can be copied in whole); masks of similar heights are
    # pasted together, padded to the chunk's tallest, in chunks of about _CHUNK_ELEMENTS pixels.
    order = torch.sort(rows, stable=True).indices
    order = order[rows[order] > 0]
    rows_sorted = rows[order]
    octave = torch.floor(torch.log2(rows_sorted.float().clamp(min=1))).long()
    before = torch.cumsum(rows_sorted, 0) - rows_sorted
    octave_first = torch.searchsorted(octave, octave)
    chunk_key = octave * (num + 1) + (before - before[octave_first]) * width // _CHUNK_ELEMENTS
    _, inverse, counts = torch.unique_consecutive(chunk_key, return_inverse=True, return_counts=True)
    tallest = rows_sorted.new_zeros(counts.shape).scatter_reduce_(0, inverse, rows_sorted, "amax")
    counts, tallest = torch.stack([counts, tallest]).tolist()

    image_cols = torch.arange(width, device=out.device)
    out_rows = out.view(num * height, width)
    for part, win_h in zip(order.split(counts), tallest):
        top = torch.minimum(row_lo[part], torch.full_like(row_lo[part], height - win_h))
        image_rows = top[:, None] + torch.arange(win_h, device=out.device)  # (n, win_h)
        weights_y = _taps(image_rows, y0[part], y1[part], mask_h, row_lo[part], row_hi[part])  # (n, win_h, h)
        weights_x = _taps(image_cols.expand(len(part), -1), x0[part], x1[part], mask_w, col_lo[part],
                          col_hi[part])  # (n, W, w)
        pasted = torch.bmm(torch.bmm(weights_y, masks[part]), weights_x.transpose(1, 2))  # (n, win_h, W)
        out_rows.index_copy_(0, (part[:, None] * height + image_rows).flatten(), pasted.view(-1, width))
    return out


def _taps(pixels: Tensor, start: Tensor, stop: Tensor, size: int, lo: Tensor, hi: Tensor) -> Tensor:
    """(n, P, size) bilinear weights of mask cells for image pixels (n, P) along one axis.

    The arithmetic follows MMDetection + grid_sample: normalise the pixel centre into the box to [-1, 1], then
    unnormalise with align_corners=False. Taps outside the mask (zero padding) and pixels outside [lo, hi) get 0.
    """
    centre = pixels.to(start.dtype) + 0.5
    normalised = (centre - start[:, None]) / (stop - start)[:, None] * 2 - 1
    source = ((normalised + 1) * size - 1) / 2
    left = source.floor()
    frac = (source - left)[..., None]
    cells = torch.arange(size, device=pixels.device, dtype=start.dtype)
    weights = (cells == left[..., None]) * (1 - frac) + (cells == left[..., None] + 1) * frac
    inside = (pixels >= lo[:, None]) & (pixels < hi[:, None])
    return weights * inside[..., None]
