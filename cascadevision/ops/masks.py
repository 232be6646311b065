"""Paste fixed-size mask predictions into full images (MMDetection v2 `_do_paste_mask`).

MMDetection samples each (h, w) mask with `grid_sample(align_corners=False)` at the image pixel centres
(+0.5) mapped into the box, so the box edges fall on the mask's outer edges, and it only fills the box grown
by one pixel and clipped to the image (its CPU path pastes mask by mask). Bilinear sampling on a grid whose x
depends only on the column and y only on the row is separable, so one mask's paste is two matmuls,
Wy (rows, h) @ mask (h, w) @ Wx^T (w, W), computed for the image rows around its box (full width, so whole
rows are copied into the output) and batched over masks of similar heights.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .precision import autocast_off

__all__ = ["iter_pasted_masks", "paste_masks"]

_CHUNK_ELEMENTS = 1 << 22  # image pixels pasted together (16 MB in float32)
MASK_CHUNK_PIXELS = 1 << 25  # default bound on the pixels of one chunk of bool masks (32 MB)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float | None = None) -> Tensor:
    """Paste (N, h, w) mask probabilities into (N, H, W) images, mask i stretched over boxes[i] (image pixels).

    Values equal MMDetection's grid_sample (bilinear, zero padding, align_corners=False, pixel centres +0.5)
    inside each box grown by one pixel and clipped to the image, and 0 elsewhere; boxes with no width or height
    give an empty mask (MMDetection would smear the mask's middle column or row across the image there).
    Returns float32 (float64 for float64 masks), or with `threshold` the bool masks `pasted >= threshold`,
    exactly those values, binarised chunk by chunk so no (N, H, W) float tensor is ever made.
    """
    height, width = _check(masks, boxes, image_size)
    num = masks.shape[0]
    if threshold is None:
        out = torch.zeros((num, height, width), dtype=_float_dtype(masks), device=masks.device)
    else:  # what the float paste holds where nothing is pasted: 0
        out = torch.full((num, height, width), 0.0 >= threshold, dtype=torch.bool, device=masks.device)
    out_rows = out.view(num * height, width)
    for part, image_rows, pasted in _pasted_rows(masks, boxes, height, width):
        if threshold is not None:
            pasted = pasted >= threshold
        out_rows.index_copy_(0, (part[:, None] * height + image_rows).flatten(), pasted.view(-1, width))
    return out


def iter_pasted_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float,
                      max_pixels: int = MASK_CHUNK_PIXELS) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield `(indices, chunk)`: (k,) long detection indices and their (k, H, W) bool masks, equal to
    `paste_masks(masks, boxes, image_size)[indices] >= threshold`, with k * H * W <= max_pixels (k >= 1).

    Every detection comes exactly once, in no particular order. Memory: one chunk plus one float paste chunk
    (about 4M pixels, or one mask's H * W), whatever N is: a consumer (an RLE encoder, an overlay) handles each
    chunk and drops it.
    """
    height, width = _check(masks, boxes, image_size)
    num = masks.shape[0]
    per_chunk = max(1, max_pixels // max(1, height * width))
    outside = 0.0 >= threshold  # the value where nothing is pasted
    seen = torch.zeros(num, dtype=torch.bool)
    for part, image_rows, pasted in _pasted_rows(masks, boxes, height, width):
        for first in range(0, len(part), per_chunk):
            indices, rows = part[first:first + per_chunk], image_rows[first:first + per_chunk]
            chunk = torch.full((len(indices), height, width), outside, dtype=torch.bool, device=masks.device)
            local = torch.arange(len(indices), device=masks.device)[:, None] * height + rows  # (k, win_h)
            chunk.view(-1, width).index_copy_(0, local.flatten(),
                                              (pasted[first:first + per_chunk] >= threshold).view(-1, width))
            seen[indices.cpu()] = True
            yield indices, chunk
    nothing_pasted = torch.nonzero(~seen)[:, 0].to(masks.device)
    for indices in nothing_pasted.split(per_chunk) if len(nothing_pasted) else ():
        yield indices, torch.full((len(indices), height, width), outside, dtype=torch.bool, device=masks.device)


def _check(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> tuple[int, int]:
    if masks.dim() != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"paste_masks: masks must be (N, h, w) and boxes (N, 4), got {tuple(masks.shape)} and "
                         f"{tuple(boxes.shape)}")
    return int(image_size[0]), int(image_size[1])


def _float_dtype(masks: Tensor) -> torch.dtype:
    return torch.float64 if masks.dtype == torch.float64 else torch.float32


def _pasted_rows(masks: Tensor, boxes: Tensor, height: int, width: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (part (n,), image_rows (n, win_h), pasted (n, win_h, W)): the pasted values of masks `part` on
    those full-width image rows (0 outside each mask's box), a chunk at a time. Masks with nothing to paste are
    not yielded. The chunks depend only on all N boxes, so every caller gets bit-identical values."""
    num, mask_h, mask_w = masks.shape
    if num == 0 or height == 0 or width == 0:
        return
    dtype = _float_dtype(masks)
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

    image_cols = torch.arange(width, device=masks.device)
    for part, win_h in zip(order.split(counts), tallest):
        top = torch.minimum(row_lo[part], torch.full_like(row_lo[part], height - win_h))
        image_rows = top[:, None] + torch.arange(win_h, device=masks.device)  # (n, win_h)
        weights_y = _taps(image_rows, y0[part], y1[part], mask_h, row_lo[part], row_hi[part])  # (n, win_h, h)
        weights_x = _taps(image_cols.expand(len(part), -1), x0[part], x1[part], mask_w, col_lo[part],
                          col_hi[part])  # (n, W, w)
        with autocast_off(masks.device):  # not around the yield: the caller's autocast state stays its own
            pasted = torch.bmm(torch.bmm(weights_y, masks[part]), weights_x.transpose(1, 2))  # (n, win_h, W)
        yield part, image_rows, pasted


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
