"""RoIAlign in pure PyTorch, with the semantics of torchvision's `roi_align` and mmcv's `RoIAlign` (avg mode).

Each output bin averages `grid_h x grid_w` bilinear samples. Bilinear interpolation is separable and the
average is linear, so one RoI's output is two small matrix products over the patch of the map it touches:

    out[c] = Ay (out_h, R) @ patch[c] (R, S) @ Ax^T (S, out_w)

where row `ph` of `Ay` holds the summed (and 1/grid_h-scaled) interpolation weights of bin `ph`'s sample rows.
The patches are gathered from a channels-last copy of the map (each pixel is C contiguous numbers), RoIs are
sorted by patch size and processed in chunks that fit in cache, and every chunk is two batched matmuls. The
backward pass is the transpose: two matmuls and an `index_add_` into the gradient of the map.

Sample rules copied from the reference kernels: a sample with y < -1 or y > H (x likewise) adds 0; otherwise
y is clamped to >= 0, and a sample at or beyond row H - 1 reads row H - 1 only. The divisor is always
grid_h * grid_w, whether or not samples fell off the map.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["map_roi_levels", "multi_scale_roi_align", "roi_align"]

# Elements of one chunk's gathered patch (channels included). 2M fp32 numbers = 8 MB: large enough that each
# chunk is a few big matmuls, small enough that the patch is still in cache when the matmuls read it.
_CHUNK_ELEMENTS = 1 << 19


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = 0, aligned: bool = True) -> Tensor:
    """Pool a fixed-size feature for every RoI with bilinear sampling (torchvision/mmcv RoIAlign, avg mode).

    features: (N, C, H, W); rois: (K, 5) as (batch_index, x1, y1, x2, y2) in input-image pixels, mapped to the
    map by `spatial_scale`. `aligned=True` shifts the RoI by -0.5 pixel (pixel centres); `aligned=False` keeps
    the legacy behaviour and clamps the RoI size to >= 1. `sampling_ratio=0` takes ceil(roi_size / output_size)
    samples per bin along each axis, per RoI. Returns (K, C, out_h, out_w) in the dtype of `features`;
    differentiable with respect to `features` (not `rois`).

    Channels-last `features` (`memory_format=torch.channels_last`) skip one copy of the map.
    """
    _check_rois(rois)
    out_h, out_w = _pair(output_size)
    levels = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
    return _RoIAlign.apply(rois, levels, (float(spatial_scale),), out_h, out_w, int(sampling_ratio), bool(aligned),
                           features)


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: int = 56) -> Tensor:
    """FPN level of each RoI, as MMDetection's `SingleRoIExtractor`: floor(log2(sqrt(w * h) / finest_scale)).

    w = x2 - x1 and h = y2 - y1 (no +1). With the default 56 and 4 levels: scale < 112 -> 0, [112, 224) -> 1,
    [224, 448) -> 2, >= 448 -> 3. Returns a LongTensor (K,). RoIs of negative area map to level 0.
    """
    _check_rois(rois)
    boxes = rois[:, 1:].to(torch.float64 if rois.dtype == torch.float64 else torch.float32)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
    levels = torch.floor(torch.log2(area.sqrt() / finest_scale + 1e-6))
    return levels.clamp(0, num_levels - 1).long()


def multi_scale_roi_align(features: Sequence[Tensor], rois: Tensor, output_size: int | tuple[int, int],
                          strides: Sequence[int], finest_scale: int = 56, sampling_ratio: int = 0,
                          aligned: bool = True) -> Tensor:
    """RoIAlign over FPN levels: each RoI is pooled from the level `map_roi_levels` picks for it.

    features: one (N, C, H_l, W_l) map per level, finest first, with `strides[l]` its stride in input pixels.
    Returns (K, C, out_h, out_w) in the order of `rois`.
    """
    features = list(features)
    if len(features) != len(strides):
        raise ValueError(f"multi_scale_roi_align: {len(features)} feature maps but {len(strides)} strides")
    out_h, out_w = _pair(output_size)
    levels = map_roi_levels(rois, len(features), finest_scale)
    scales = tuple(1.0 / float(s) for s in strides)
    return _RoIAlign.apply(rois, levels, scales, out_h, out_w, int(sampling_ratio), bool(aligned), *features)


# ------------------------------------------------------------------------------------------------- internals


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"RoIAlign output_size must be positive, got {size}")
    return int(out_h), int(out_w)


def _check_rois(rois: Tensor) -> None:
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (K, 5) as (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")


def _check_features(features: tuple[Tensor, ...]) -> None:
    first = features[0]
    for f in features:
        if f.dim() != 4:
            raise ValueError(f"RoIAlign features must be (N, C, H, W), got shape {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"RoIAlign features must be floating point, got {f.dtype}")
        if f.shape[:2] != first.shape[:2] or f.dtype != first.dtype or f.device != first.device:
            raise ValueError("RoIAlign feature maps must share batch size, channels, dtype and device")


@dataclass
class _Plan:
    """Where every RoI reads and with which weights; RoIs are in `order` (sorted by patch size)."""
    order: Tensor  # (K,) original index of the i-th sorted RoI
    base: Tensor  # (K,) flat channels-last pixel index of the patch's top-left corner
    weights_y: Tensor  # (K, out_h, R_max): bin ph <- patch row r
    weights_x: Tensor  # (K, out_w, S_max): bin pw <- patch column s
    chunks: list[tuple[int, int, int, int, int]]  # (level, start, stop, R, S), in sorted-RoI order


def _axis_samples(start: Tensor, size: Tensor, bins: int, grid: Tensor, length: Tensor):
    """Bilinear taps of every sample along one axis.

    start, size: (K,) RoI start and extent in map pixels; grid: (K,) samples per bin; length: (K,) map size.
    Returns low, high (K, bins, G) row indices, their weights (already divided by grid), and the (K,) first and
    last row any valid sample touches.
    """
    num = start.shape[0]
    max_grid = max(int(grid.max()), 1) if num else 1
    bin_size = (size / bins)[:, None, None]
    bin_index = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    sample_index = torch.arange(max_grid, device=start.device)
    grid_f = grid.to(start.dtype)[:, None, None]
    # same operation order as the reference kernels: start + ph * bin + (iy + 0.5) * bin / grid
    pos = (start[:, None, None] + bin_index * bin_size) + ((sample_index.to(start.dtype) + 0.5) * bin_size) / grid_f
    length = length[:, None, None]
    valid = (sample_index < grid[:, None, None]) & (pos >= -1) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= length - 1
    low = torch.where(at_edge, length - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    scale = valid.to(pos.dtype) / grid_f.clamp(min=1)
    w_low, w_high = (1 - frac) * scale, frac * scale
    big = torch.iinfo(torch.long).max
    first = torch.where(valid, low, big).flatten(1).amin(1) if num else low.new_zeros(0)
    last = torch.where(valid, high, -1).flatten(1).amax(1) if num else low.new_zeros(0)
    none = last < 0  # no sample on the map: read a 1-pixel patch with zero weights
    first = torch.where(none, 0, first)
    last = torch.where(none, 0, last)
    return low, high, w_low, w_high, first, last


def _axis_weights(low, high, w_low, w_high, window_start: Tensor, width: int) -> Tensor:
    """(K, bins, width) weights of patch rows window_start + [0, width) for every bin."""
    num, bins, _ = low.shape
    index = torch.cat([low, high], 2) - window_start[:, None, None]
    index = index.clamp(0, max(width - 1, 0))  # only zero-weight samples are clamped
    weights = w_low.new_zeros(num, bins, width)
    return weights.scatter_add_(2, index, torch.cat([w_low, w_high], 2))


def _make_plan(rois: Tensor, levels: Tensor, sizes: list[tuple[int, int]], scales: tuple[float, ...], out_h: int,
               out_w: int, sampling_ratio: int, aligned: bool, channels: int, batch_size: int,
               dtype: torch.dtype) -> _Plan:
    device = rois.device
    num = rois.shape[0]
    rois = rois.to(dtype)
    heights = torch.tensor([h for h, _ in sizes], device=device)[levels]
    widths = torch.tensor([w for _, w in sizes], device=device)[levels]
    scale = torch.tensor(scales, dtype=dtype, device=device)[levels]
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_w, roi_h = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    if sampling_ratio > 0:
        grid_h = torch.full_like(heights, sampling_ratio)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / out_h).clamp(min=0).long()
        grid_w = torch.ceil(roi_w / out_w).clamp(min=0).long()
    y_taps = _axis_samples(y1, roi_h, out_h, grid_h, heights)
    x_taps = _axis_samples(x1, roi_w, out_w, grid_w, widths)
    rows = y_taps[5] - y_taps[4] + 1  # (K,) patch height
    cols = x_taps[5] - x_taps[4] + 1

    # Sort by (level, coarse patch height, patch width) so that padding every chunk to its largest patch wastes
    # little, then cut each level's run into chunks of about _CHUNK_ELEMENTS.
    row_bucket = torch.floor(torch.log2(rows.double()) * 3).long()
    key = (levels * 64 + row_bucket) * (int(cols.max()) + 1 if num else 1) + cols
    order = torch.sort(key, stable=True).indices
    levels_s, rows_s, cols_s = levels[order], rows[order], cols[order]
    cost = rows_s * cols_s + cols_s * out_h + out_h * out_w  # per channel: patch + intermediate + output
    budget = max(_CHUNK_ELEMENTS // max(channels, 1), 1)
    before = torch.cumsum(cost, 0) - cost
    level_first = torch.searchsorted(levels_s, levels_s)  # first sorted index of each RoI's level
    chunk_id = (before - before[level_first]) // budget
    _, inverse, counts = torch.unique_consecutive(levels_s * (num + 1) + chunk_id, return_inverse=True,
                                                  return_counts=True)
    num_chunks = counts.shape[0]
    chunk_rows = rows_s.new_zeros(num_chunks).scatter_reduce_(0, inverse, rows_s, "amax")
    chunk_cols = cols_s.new_zeros(num_chunks).scatter_reduce_(0, inverse, cols_s, "amax")
    chunk_level = levels_s.new_zeros(num_chunks).scatter_reduce_(0, inverse, levels_s, "amax")
    batch_index = rois[:, 0].long()
    # the one host sync: chunk sizes, plus the batch-index range for a readable error
    meta = torch.cat([chunk_level, counts, chunk_rows, chunk_cols,
                      batch_index.min().view(1) if num else counts.new_zeros(1),
                      batch_index.max().view(1) if num else counts.new_zeros(1)]).tolist()
    if num and (meta[-2] < 0 or meta[-1] >= batch_size):
        raise ValueError(f"rois batch_index must be in [0, {batch_size}), got values in [{meta[-2]}, {meta[-1]}]")
    chunks, start = [], 0
    for c in range(num_chunks):
        count = meta[num_chunks + c]
        chunks.append((meta[c], start, start + count, meta[2 * num_chunks + c], meta[3 * num_chunks + c]))
        start += count

    # Patch windows: start at the first touched row, moved up if the padded chunk height would leave the map.
    rows_padded = torch.empty_like(rows).index_copy_(0, order, chunk_rows[inverse])
    cols_padded = torch.empty_like(cols).index_copy_(0, order, chunk_cols[inverse])
    y0 = torch.minimum(y_taps[4], heights - rows_padded).clamp(min=0)
    x0 = torch.minimum(x_taps[4], widths - cols_padded).clamp(min=0)
    max_rows = int(max(meta[2 * num_chunks:3 * num_chunks], default=1))
    max_cols = int(max(meta[3 * num_chunks:4 * num_chunks], default=1))
    weights_y = _axis_weights(*y_taps[:4], y0, max_rows)
    weights_x = _axis_weights(*x_taps[:4], x0, max_cols)
    base = (batch_index * heights + y0) * widths + x0
    return _Plan(order, base[order], weights_y[order], weights_x[order], chunks)


def _channels_last_table(features: Tensor) -> Tensor:
    """(N * H * W, C) view (channels-last input) or copy of an (N, C, H, W) map."""
    return features.permute(0, 2, 3, 1).contiguous().view(-1, features.shape[1])


def _patch_pixels(base: Tensor, rows: int, cols: int, width: int) -> Tensor:
    """(n, rows, cols) flat pixel index of every patch pixel, from each patch's top-left pixel `base` (n,)."""
    offsets = torch.arange(rows, device=base.device)[:, None] * width + torch.arange(cols, device=base.device)
    return base[:, None, None] + offsets


class _RoIAlign(torch.autograd.Function):
    """Multi-level RoIAlign; `levels[k]` picks the map (and scale) RoI k is pooled from.

    The output is computed channels-last, (K, out_h, out_w, C), and returned as its (K, C, out_h, out_w)
    permuted view: the heads' flatten/conv accept it, and it saves a transpose of the whole output.
    """

    @staticmethod
    def forward(ctx, rois, levels, scales, out_h, out_w, sampling_ratio, aligned, *features):
        _check_features(features)
        batch_size, channels = features[0].shape[:2]
        compute_dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32
        sizes = [tuple(f.shape[-2:]) for f in features]
        plan = _make_plan(rois.detach(), levels, sizes, scales, out_h, out_w, sampling_ratio, aligned, channels,
                          batch_size, compute_dtype)
        out = features[0].new_empty((rois.shape[0], out_h, out_w, channels))
        tables: dict[int, Tensor] = {}
        for level, start, stop, rows, cols in plan.chunks:
            if level not in tables:
                tables[level] = _channels_last_table(features[level])
            n = stop - start
            pixels = _patch_pixels(plan.base[start:stop], rows, cols, sizes[level][1])  # (n, rows, cols)
            patch = tables[level].index_select(0, pixels.flatten()).view(n, rows, cols * channels)
            patch = patch.to(compute_dtype)
            wy = plan.weights_y[start:stop, :, :rows]  # (n, out_h, rows)
            wx = plan.weights_x[start:stop, :, :cols]  # (n, out_w, cols)
            pooled = torch.bmm(wy, patch).view(n, out_h, cols, channels)  # rows pooled: (n, out_h, cols, C)
            result = torch.matmul(wx[:, None], pooled)  # (n, out_h, out_w, C)
            out.index_copy_(0, plan.order[start:stop], result.to(out.dtype))
        ctx.plan = plan
        ctx.meta = (sizes, channels, batch_size, out_h, out_w, compute_dtype, features[0].dtype)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        plan: _Plan = ctx.plan
        sizes, channels, batch_size, out_h, out_w, compute_dtype, dtype = ctx.meta
        grad_out = grad_out.permute(0, 2, 3, 1).contiguous()  # (K, out_h, out_w, C); a view if channels-last
        grad_tables: dict[int, Tensor] = {}
        for level, start, stop, rows, cols in plan.chunks:
            if not ctx.needs_input_grad[7 + level]:
                continue
            height, width = sizes[level]
            if level not in grad_tables:
                grad_tables[level] = grad_out.new_zeros((batch_size * height * width, channels), dtype=compute_dtype)
            n = stop - start
            grad = grad_out.index_select(0, plan.order[start:stop]).to(compute_dtype)  # (n, out_h, out_w, C)
            wy = plan.weights_y[start:stop, :, :rows]
            wx = plan.weights_x[start:stop, :, :cols]
            grad_pooled = torch.matmul(wx.transpose(1, 2)[:, None], grad)  # (n, out_h, cols, C)
            grad_patch = torch.bmm(wy.transpose(1, 2), grad_pooled.view(n, out_h, cols * channels))
            pixels = _patch_pixels(plan.base[start:stop], rows, cols, width)
            grad_tables[level].index_add_(0, pixels.flatten(), grad_patch.view(-1, channels))
        grads = []
        for level, (height, width) in enumerate(sizes):
            if not ctx.needs_input_grad[7 + level]:
                grads.append(None)
            elif level in grad_tables:  # channels-last strides, like the features' channels-last copy
                grad = grad_tables[level].view(batch_size, height, width, channels).permute(0, 3, 1, 2)
                grads.append(grad.to(dtype))
            else:
                grads.append(grad_out.new_zeros((batch_size, channels, height, width), dtype=dtype))
        return (None,) * 7 + tuple(grads)
