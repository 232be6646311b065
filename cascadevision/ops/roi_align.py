"""RoIAlign in pure PyTorch, with the semantics of torchvision's `roi_align` and mmcv's `RoIAlign` (avg mode).

Each output bin averages `grid_h x grid_w` bilinear samples. Bilinear interpolation is separable and the
average is linear, so one RoI's output is two small matrix products over the patch of the map it touches:

    out[c] = Ay (out_h, R) @ patch[c] (R, S) @ Ax^T (S, out_w)

where row `ph` of `Ay` holds the summed (and 1/grid_h-scaled) interpolation weights of bin `ph`'s sample rows.
The patches are gathered from a channels-last copy of the map (each patch row is one contiguous run of
cols * C numbers), RoIs are sorted by patch size and processed in chunks that fit in cache, and every chunk
is two batched matmuls. The backward pass is the transpose: two matmuls and an `index_add_` into the gradient
of the map. Nothing loops over RoIs, bins or samples in Python; the loop is over chunks only.

The result is computed channels-last and returned as a (K, C, out_h, out_w) view with channels-last strides
(`memory_format=torch.channels_last`): flatten, convolutions and additions take it as is; call `.contiguous()`
before `.view(...)`. Feeding channels-last feature maps saves the copy of the map into channels-last layout.

Sample rules copied from the reference kernels: a sample with y < -1 or y > H (x likewise) adds 0; otherwise
y is clamped to >= 0, and a sample at or beyond row H - 1 reads row H - 1 only. The divisor is always
grid_h * grid_w, whether or not samples fell off the map.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["map_roi_levels", "multi_scale_roi_align", "roi_align"]

# Numbers (channels included) gathered per chunk and CPU thread: 1M fp32 = 4 MB, small enough that the patch is
# still in cache when the two matmuls read it, large enough that a chunk is ~100 us of work. Smaller is slower
# (Python overhead per chunk), larger is slower too (cache misses), measured on a 2-core x86 CPU.
_CHUNK_ELEMENTS = 1 << 20
_FEW_CHANNELS = 16  # below this, pool channel planes separately (broadcast weights would cost more than the data)
# On a GPU, fewer and larger chunks: 32M numbers (128 MB in fp32) bounds the memory of one chunk.
_CHUNK_ELEMENTS_GPU = 1 << 25


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = 0, aligned: bool = True) -> Tensor:
    """Pool a fixed-size feature for every RoI with bilinear sampling (torchvision/mmcv RoIAlign, avg mode).

    features: (N, C, H, W); rois: (K, 5) as (batch_index, x1, y1, x2, y2) in input-image pixels, mapped to the
    map by `spatial_scale`. `aligned=True` shifts the RoI by -0.5 pixel (pixel centres); `aligned=False` keeps
    the legacy behaviour and clamps the RoI size to >= 1. `sampling_ratio=0` takes ceil(roi_size / output_size)
    samples per bin along each axis, per RoI. Returns (K, C, out_h, out_w) in the dtype of `features` with
    channels-last strides; differentiable with respect to `features` (not `rois`). Half-precision features are
    pooled in float32.

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
    Returns (K, C, out_h, out_w) in the order of `rois` (channels-last strides, see `roi_align`). Levels are
    pooled together, in one pass. Convert the maps to channels-last once if several calls share them (e.g. the
    stages of a cascade): each call otherwise copies every map it reads into that layout.
    """
    features = list(features)
    if not features or len(features) != len(strides):
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


class _Taps(NamedTuple):
    """Bilinear taps of every sample along one axis, for (K RoIs, bins, G samples per bin)."""
    low: Tensor  # (K, bins, G) lower map row (or column) of each sample
    high: Tensor  # (K, bins, G) upper one (equal to low at the last row)
    w_low: Tensor  # (K, bins, G) weight of `low`, already divided by the samples per bin; 0 for dropped samples
    w_high: Tensor
    first: Tensor  # (K,) first row any kept sample touches
    last: Tensor  # (K,) last one


def _axis_taps(start: Tensor, size: Tensor, bins: int, grid: Tensor, max_grid: int, length: Tensor) -> _Taps:
    """Taps along one axis. start, size: (K,) RoI start and extent in map pixels; grid: (K,) samples per bin;
    length: (K,) size of the map along this axis."""
    bin_size = (size / bins)[:, None, None]
    bin_index = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    sample_index = torch.arange(max(max_grid, 1), device=start.device)
    grid_f = grid.to(start.dtype)[:, None, None]
    # same operation order as the reference kernels: start + ph * bin + (iy + 0.5) * bin / grid
    # an empty RoI has grid 0 and no valid sample; the clamp keeps its (unused) positions finite, not 0/0
    pos = (start[:, None, None] + bin_index * bin_size) + ((sample_index.to(start.dtype) + 0.5) * bin_size) / grid_f.clamp(min=1)
    length = length[:, None, None]
    valid = (sample_index < grid[:, None, None]) & (pos >= -1) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= length - 1
    low = torch.where(at_edge, length - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    scale = valid.to(pos.dtype) / grid_f.clamp(min=1)
    first = torch.where(valid, low, torch.iinfo(torch.long).max).flatten(1).amin(1)
    last = torch.where(valid, high, -1).flatten(1).amax(1)
    none = last < 0  # no sample on the map: read a 1-pixel patch with zero weights
    return _Taps(low, high, (1 - frac) * scale, frac * scale, first.masked_fill(none, 0), last.masked_fill(none, 0))


def _axis_weights(taps: _Taps, window_start: Tensor, width: int) -> Tensor:
    """(K, bins, width) weights of map rows window_start + [0, width) for every bin: one row of Ay (or Ax)."""
    num, bins, _ = taps.low.shape
    index = torch.cat([taps.low, taps.high], 2) - window_start[:, None, None]
    index = index.clamp(0, max(width - 1, 0))  # only zero-weight samples are clamped
    weights = taps.w_low.new_zeros(num, bins, width)
    return weights.scatter_add_(2, index, torch.cat([taps.w_low, taps.w_high], 2))


def _make_plan(rois: Tensor, levels: Tensor, sizes: list[tuple[int, int]], scales: tuple[float, ...], out_h: int,
               out_w: int, sampling_ratio: int, aligned: bool, channels: int, batch_size: int,
               dtype: torch.dtype) -> _Plan:
    device = rois.device
    num = rois.shape[0]
    rois = rois.to(dtype)
    if num == 0:
        nothing = torch.zeros(0, dtype=torch.long, device=device)
        return _Plan(nothing, nothing, rois.new_zeros((0, out_h, 1)), rois.new_zeros((0, out_w, 1)), [])
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
    max_grid_h, max_grid_w = torch.stack([grid_h.max(), grid_w.max()]).tolist()  # host sync 1 of 2
    y_taps = _axis_taps(y1, roi_h, out_h, grid_h, max_grid_h, heights)
    x_taps = _axis_taps(x1, roi_w, out_w, grid_w, max_grid_w, widths)
    rows = y_taps.last - y_taps.first + 1  # (K,) patch height
    cols = x_taps.last - x_taps.first + 1

    # Sort by (level, coarse patch height, patch width) so that padding every chunk to its largest patch wastes
    # little, then cut each level's run into chunks of about _CHUNK_ELEMENTS.
    row_bucket = torch.floor(torch.log2(rows.float()) * 3).long()  # heights within 26% share a bucket
    key = (levels * 64 + row_bucket) * (1 << 32) + cols
    order = torch.sort(key, stable=True).indices
    levels_s, rows_s, cols_s = levels[order], rows[order], cols[order]
    cost = rows_s * cols_s + cols_s * out_h + out_h * out_w  # per channel: patch + intermediate + output
    elements = _CHUNK_ELEMENTS * torch.get_num_threads() if device.type == "cpu" else _CHUNK_ELEMENTS_GPU
    budget = max(elements // max(channels, 1), 1)  # pixels per chunk
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
    # host sync 2 of 2: chunk sizes, plus the batch-index range for a readable error
    meta = torch.cat([chunk_level, counts, chunk_rows, chunk_cols, batch_index.min().view(1),
                      batch_index.max().view(1)]).tolist()
    if meta[-2] < 0 or meta[-1] >= batch_size:
        raise ValueError(f"rois batch_index must be in [0, {batch_size}), got values in [{meta[-2]}, {meta[-1]}]")
    chunks, start = [], 0
    for c in range(num_chunks):
        count = meta[num_chunks + c]
        chunks.append((meta[c], start, start + count, meta[2 * num_chunks + c], meta[3 * num_chunks + c]))
        start += count

    # Patch windows: start at the first touched row, moved up if the padded chunk height would leave the map.
    rows_padded = torch.empty_like(rows).index_copy_(0, order, chunk_rows[inverse])
    cols_padded = torch.empty_like(cols).index_copy_(0, order, chunk_cols[inverse])
    y0 = torch.minimum(y_taps.first, heights - rows_padded).clamp(min=0)
    x0 = torch.minimum(x_taps.first, widths - cols_padded).clamp(min=0)
    max_rows = int(max(meta[2 * num_chunks:3 * num_chunks], default=1))
    max_cols = int(max(meta[3 * num_chunks:4 * num_chunks], default=1))
    weights_y = _axis_weights(y_taps, y0, max_rows)
    weights_x = _axis_weights(x_taps, x0, max_cols)
    base = (batch_index * heights + y0) * widths + x0
    return _Plan(order, base[order], weights_y[order], weights_x[order], chunks)


def _channels_last_table(features: Tensor) -> Tensor:
    """(N * H * W, C) contiguous view (channels-last input) or copy of an (N, C, H, W) map."""
    table = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return table if table.stride() == (features.shape[1], 1) else table.contiguous()


def _pool(features: tuple[Tensor, ...], plan: _Plan, out_h: int, out_w: int, dtype: torch.dtype) -> Tensor:
    """(K, out_h, out_w, C): out[k] = Ay[k] @ patch[k] @ Ax[k]^T, chunk by chunk, computed in `dtype`."""
    channels = features[0].shape[1]
    out = features[0].new_empty((plan.order.shape[0], out_h, out_w, channels))
    tables: dict[int, Tensor] = {}
    for level, start, stop, rows, cols in plan.chunks:
        if level not in tables:
            tables[level] = _channels_last_table(features[level])
        table, width, n = tables[level], features[level].shape[-1], stop - start
        # a patch row is `cols` neighbouring pixels: cols * C contiguous numbers of the table
        table_rows = table.as_strided((table.shape[0] - cols + 1, cols * channels), (channels, 1))
        row_starts = plan.base[start:stop, None] + torch.arange(rows, device=out.device) * width  # (n, rows)
        patch = table_rows.index_select(0, row_starts.flatten()).view(n, rows, cols, channels).to(dtype)
        weights_y = plan.weights_y[start:stop, :, :rows]  # (n, out_h, rows)
        weights_x = plan.weights_x[start:stop, :, :cols]  # (n, out_w, cols)
        out.index_copy_(0, plan.order[start:stop], _pool_patches(patch, weights_y, weights_x).to(out.dtype))
    return out


def _pool_patches(patch: Tensor, weights_y: Tensor, weights_x: Tensor) -> Tensor:
    """(n, out_h, out_w, C) = Ay @ patch @ Ax^T for patches (n, rows, cols, C); the longer side is pooled first,
    which leaves the second product fewer multiply-adds."""
    n, rows, cols, channels = patch.shape
    out_h, out_w = weights_y.shape[1], weights_x.shape[1]
    if channels < _FEW_CHANNELS:  # e.g. gt masks: one (rows, cols) matrix per channel, two plain bmm
        planes = patch.permute(0, 3, 1, 2).reshape(n * channels, rows, cols)
        weights_y = weights_y.repeat_interleave(channels, 0)
        weights_x = weights_x.repeat_interleave(channels, 0).transpose(1, 2)
        if cols <= rows:
            result = torch.bmm(torch.bmm(weights_y, planes), weights_x)
        else:
            result = torch.bmm(weights_y, torch.bmm(planes, weights_x))
        return result.view(n, channels, out_h, out_w).permute(0, 2, 3, 1)
    # many channels: products over whole (cols * C) rows; broadcasting the small weights costs little
    if cols <= rows:
        pooled = torch.bmm(weights_y, patch.view(n, rows, cols * channels)).view(n, out_h, cols, channels)
        return torch.matmul(weights_x[:, None], pooled)
    pooled = torch.matmul(weights_x[:, None], patch)  # (n, rows, out_w, C)
    return torch.bmm(weights_y, pooled.view(n, rows, out_w * channels)).view(n, out_h, out_w, channels)


def _pool_backward(grad_out: Tensor, plan: _Plan, sizes: list[tuple[int, int]], batch_size: int,
                   needs_grad: Sequence[bool], dtype: torch.dtype, out_dtype: torch.dtype) -> list[Tensor | None]:
    """Gradient of every map: grad_patch[k] = Ay[k]^T @ grad_out[k] @ Ax[k], added into the map's pixels."""
    num, out_h, out_w, channels = grad_out.shape  # channels-last
    grad_tables: dict[int, Tensor] = {}
    for level, start, stop, rows, cols in plan.chunks:
        if not needs_grad[level]:
            continue
        height, width = sizes[level]
        if level not in grad_tables:
            grad_tables[level] = grad_out.new_zeros((batch_size * height * width, channels), dtype=dtype)
        n = stop - start
        grad = grad_out.index_select(0, plan.order[start:stop]).to(dtype)  # (n, out_h, out_w, C)
        weights_y = plan.weights_y[start:stop, :, :rows]
        weights_x = plan.weights_x[start:stop, :, :cols]
        if cols <= rows:  # the transpose of the forward's order
            grad_pooled = torch.matmul(weights_x.transpose(1, 2)[:, None], grad)  # (n, out_h, cols, C)
            grad_patch = torch.bmm(weights_y.transpose(1, 2), grad_pooled.view(n, out_h, cols * channels))
        else:
            grad_pooled = torch.bmm(weights_y.transpose(1, 2), grad.view(n, out_h, out_w * channels))
            grad_patch = torch.matmul(weights_x.transpose(1, 2)[:, None], grad_pooled.view(n, rows, out_w, channels))
        offsets = torch.arange(rows, device=grad.device)[:, None] * width + torch.arange(cols, device=grad.device)
        pixels = plan.base[start:stop, None, None] + offsets  # (n, rows, cols)
        grad_tables[level].index_add_(0, pixels.flatten(), grad_patch.view(-1, channels))
    grads: list[Tensor | None] = []
    for level, (height, width) in enumerate(sizes):
        if not needs_grad[level]:
            grads.append(None)
        elif level in grad_tables:  # returned with channels-last strides, as computed
            grads.append(grad_tables[level].view(batch_size, height, width, channels).permute(0, 3, 1, 2)
                         .to(out_dtype))
        else:
            grads.append(grad_out.new_zeros((batch_size, channels, height, width), dtype=out_dtype))
    return grads


class _RoIAlign(torch.autograd.Function):
    """Multi-level RoIAlign; `levels[k]` picks the map (and scale) RoI k is pooled from.

    The output is computed channels-last, (K, out_h, out_w, C), and returned as its (K, C, out_h, out_w)
    permuted view: the heads' flatten/conv accept it, and it saves a transpose of the whole output.
    """

    @staticmethod
    def forward(ctx, rois, levels, scales, out_h, out_w, sampling_ratio, aligned, *features):
        _check_features(features)
        batch_size, channels = features[0].shape[:2]
        dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32  # weights and sums
        sizes = [tuple(f.shape[-2:]) for f in features]
        with torch.autocast(device_type=features[0].device.type, enabled=False):  # keep the dtypes chosen here
            plan = _make_plan(rois.detach(), levels, sizes, scales, out_h, out_w, sampling_ratio, aligned,
                              channels, batch_size, dtype)
            out = _pool(features, plan, out_h, out_w, dtype)
        ctx.plan, ctx.sizes, ctx.batch_size, ctx.dtypes = plan, sizes, batch_size, (dtype, features[0].dtype)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_out = grad_out.permute(0, 2, 3, 1).contiguous()  # (K, out_h, out_w, C); a view if channels-last
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            grads = _pool_backward(grad_out, ctx.plan, ctx.sizes, ctx.batch_size, ctx.needs_input_grad[7:],
                                   *ctx.dtypes)
        return (None,) * 7 + tuple(grads)
