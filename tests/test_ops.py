"""cascadevision.ops against independent references written here as plain loops.

The references transcribe the definitions (RoIAlign's bilinear samples with the mmcv/torchvision boundary
rules, textbook greedy NMS, grid_sample mask pasting one mask at a time) with no code shared with the library.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from cascadevision.ops import (batched_nms, box_area, box_ioa, box_iou, clip_boxes, decode_boxes, encode_boxes,
                               map_roi_levels, multi_scale_roi_align, nms, paste_masks, roi_align)

roi_align_module = sys.modules["cascadevision.ops.roi_align"]
boxes_module = sys.modules["cascadevision.ops.boxes"]
masks_module = sys.modules["cascadevision.ops.masks"]


# ------------------------------------------------------------------------------------ reference RoIAlign


def _bilinear_taps(y: float, x: float, height: int, width: int) -> list[tuple[int, int, float]]:
    """(row, col, weight) taps of one sample, with the reference kernels' boundary rules."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def reference_roi_align(features, rois, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True):
    """RoIAlign (avg) as the mmcv/torchvision CPU kernels define it: loops over RoIs, bins and samples."""
    out_h, out_w = output_size
    _, channels, height, width = features.shape
    data = features.double().tolist()
    out = torch.zeros(len(rois), channels, out_h, out_w, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_x, y2 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        image = data[int(b)]
        for ph in range(out_h):
            for pw in range(out_w):
                total = [0.0] * channels
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        for row, col, weight in _bilinear_taps(y, x, height, width):
                            for c in range(channels):
                                total[c] += weight * image[c][row][col]
                for c in range(channels):
                    out[k, c, ph, pw] = total[c] / count
    return out


def random_rois(num: int, num_images: int, height: float, width: float, generator: torch.Generator):
    """RoIs in image pixels: ordinary, tiny, partly outside, fully outside and inverted ones."""
    kind = torch.randint(0, 5, (num,), generator=generator)
    x1 = torch.rand(num, generator=generator) * (width + 8) - 4
    y1 = torch.rand(num, generator=generator) * (height + 8) - 4
    w = torch.rand(num, generator=generator) * width * 0.8
    h = torch.rand(num, generator=generator) * height * 0.8
    tiny = kind == 1
    w[tiny], h[tiny] = w[tiny] / width, h[tiny] / height  # under a pixel
    outside = kind == 2
    x1[outside] = width + 3 + x1[outside]  # starts beyond the right edge
    inverted = kind == 3
    w[inverted] = -w[inverted] * 0.2
    batch = torch.randint(0, num_images, (num,), generator=generator).float()
    return torch.stack([batch, x1, y1, x1 + w, y1 + h], 1)


# --------------------------------------------------------------------------------------------- RoIAlign


@pytest.fixture(params=["many_channels", "few_channels"])
def pooling_path(request, monkeypatch):
    """Run a test through both pooling code paths (channels-last products, or per-channel planes)."""
    monkeypatch.setattr(roi_align_module, "_FEW_CHANNELS", 1 if request.param == "many_channels" else 1000)
    return request.param


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_roi_align_matches_reference_loops(aligned, sampling_ratio, pooling_path):
    generator = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    features = torch.randn(2, 3, 9, 11, generator=generator, dtype=torch.float64)
    for spatial_scale, output_size in [(1.0, (2, 3)), (0.5, (3, 3)), (0.25, (1, 1))]:
        rois = random_rois(24, 2, 9 / spatial_scale, 11 / spatial_scale, generator).double()
        expected = reference_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
        got = roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        got32 = roi_align(features.float(), rois.float(), output_size, spatial_scale, sampling_ratio, aligned)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


def test_roi_align_adaptive_grid_on_large_rois_and_many_chunks(monkeypatch, pooling_path):
    # big RoIs need several samples per bin; a tiny chunk budget forces the chunking path
    monkeypatch.setattr(roi_align_module, "_CHUNK_ELEMENTS", 200)
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3, 2, 30, 26, generator=generator, dtype=torch.float64)
    xy = torch.rand(16, 2, generator=generator) * 10 - 2
    wh = torch.rand(16, 2, generator=generator) * 20 + 5
    rois = torch.cat([torch.randint(0, 3, (16, 1), generator=generator).double(), xy, xy + wh], 1)
    # small RoIs in the bottom-right corner share chunks with big ones: their padded patch must shift inwards
    corner = torch.tensor([[0, 24.5, 28.2, 25.9, 29.8], [1, 23.0, 27.0, 27.0, 31.0], [2, 25.2, 29.1, 26.0, 30.0]])
    rois = torch.cat([rois, corner.double()])
    expected = reference_roi_align(features, rois, (4, 3), 1.0, 0, True)
    torch.testing.assert_close(roi_align(features, rois, (4, 3)), expected, rtol=1e-10, atol=1e-10)


def test_roi_align_on_a_linear_ramp_gives_the_sample_centroid():
    # f(y, x) = x + 10 y is reproduced exactly by bilinear interpolation, so every bin is f at its samples' mean
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    ramp = (xs + 10 * ys)[None, None]  # (1, 1, 4, 4)

    def pool(box, aligned, size=1, sampling_ratio=2):
        return roi_align(ramp, torch.tensor([[0.0, *box]]), size, 1.0, sampling_ratio, aligned)[0, 0]

    # aligned: RoI [1, 3] -> map [0.5, 2.5], samples at 1.0 and 2.0, mean 1.5 on both axes
    assert pool([1, 1, 3, 3], True).item() == pytest.approx(1.5 + 15)
    # not aligned: samples at 1.5 and 2.5, mean 2.0
    assert pool([1, 1, 3, 3], False).item() == pytest.approx(2.0 + 20)
    # 2x2 bins over [0, 4] (not aligned), one sample per bin at 1.0 and 3.0
    torch.testing.assert_close(pool([0, 0, 4, 4], False, size=2, sampling_ratio=1),
                               torch.tensor([[11.0, 13.0], [31.0, 33.0]]))
    # x samples at -0.75 and -0.25 are clamped to column 0; y samples at 1.25 and 1.75
    assert pool([-1, 1, 0, 2], False).item() == pytest.approx(15.0)
    # x samples at -2 (below -1: contributes 0, still counted) and 0
    assert pool([-3, 1, 1, 2], False).item() == pytest.approx((0 + 0 + 12.5 + 17.5) / 4)
    # y samples at 3.25 and 3.75 (between the last row and H) read the last row
    assert pool([1, 3, 2, 4], False).item() == pytest.approx(1.5 + 30)
    # samples exactly at y = H and at x = -1 are still on the map
    assert pool([1, 3.5, 2, 4.5], False, sampling_ratio=1).item() == pytest.approx(1.5 + 30)
    assert pool([-1.5, 1, -0.5, 2], False, sampling_ratio=1).item() == pytest.approx(0 + 15)
    # y samples beyond H contribute nothing
    assert pool([0, 5.5, 4, 7], False).item() == 0.0


def test_roi_align_fully_outside_and_empty():
    features = torch.randn(1, 4, 6, 6)
    far = torch.tensor([[0.0, 20, 20, 30, 30], [0.0, -30, -30, -10, -10]])
    assert roi_align(features, far, 3).abs().max().item() == 0.0
    empty = roi_align(features, torch.zeros(0, 5), (2, 3))
    assert empty.shape == (0, 4, 2, 3)


def test_roi_align_bad_batch_index_is_a_readable_error():
    with pytest.raises(ValueError, match="batch_index"):
        roi_align(torch.randn(1, 2, 5, 5), torch.tensor([[1.0, 0, 0, 2, 2]]), 2)


def test_roi_align_gradcheck():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, 2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 3.9], [1, -1.5, 1.0, 3.0, 6.5], [1, 2.2, 2.1, 2.6, 2.4],
                         [0, 4.0, 0.0, 7.5, 4.0], [1, 0.2, 1.0, 5.8, 2.0]], dtype=torch.float64)
    for aligned, sampling_ratio in [(True, 0), (False, 2)]:
        assert torch.autograd.gradcheck(
            lambda f: roi_align(f, rois, (2, 3), 1.0, sampling_ratio, aligned), (features,))


def test_roi_align_backward_matches_reference_jacobian_transpose(monkeypatch):
    # d(sum(out * g))/d features from our backward equals the same contraction through the reference loops
    monkeypatch.setattr(roi_align_module, "_CHUNK_ELEMENTS", 50)  # about one RoI per chunk: tall and wide ones
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 3, 7, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    xy = torch.rand(12, 2, generator=generator, dtype=torch.float64) * 7 - 1
    wh = torch.rand(12, 2, generator=generator, dtype=torch.float64) * 6 + 0.5
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=generator).double(), xy, xy + wh], 1)
    out = roi_align(features, rois, (2, 2), 1.0, 0, True)
    weight = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weight).sum(), features)
    expected = torch.zeros_like(features)
    for n in range(2):  # the reference is linear in the features: probe it with one-hot maps
        for y in range(7):
            for x in range(8):
                probe = torch.zeros(2, 1, 7, 8, dtype=torch.float64)
                probe[n, 0, y, x] = 1
                response = reference_roi_align(probe, rois, (2, 2), 1.0, 0, True)  # (K, 1, 2, 2)
                expected[n, :, y, x] = (response * weight).sum((0, 2, 3))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_half_precision_is_close_to_float32(dtype):
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(2, 8, 20, 24, generator=generator)
    rois = random_rois(30, 2, 40, 48, generator)
    expected = roi_align(features, rois, 7, 0.5)
    features_half = features.to(dtype).requires_grad_()
    got = roi_align(features_half, rois, 7, 0.5)
    assert got.dtype == dtype
    tolerance = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)
    got.float().sum().backward()
    assert features_half.grad.dtype == dtype


def test_roi_align_accepts_channels_last_features():
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2, 5, 10, 12, generator=generator)
    rois = random_rois(20, 2, 10, 12, generator)
    torch.testing.assert_close(roi_align(features.contiguous(memory_format=torch.channels_last), rois, 3),
                               roi_align(features, rois, 3))


# ----------------------------------------------------------------------------------------- FPN RoI mapping


def test_map_roi_levels_thresholds():
    sides = torch.tensor([16.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 1000.0])
    rois = torch.stack([torch.zeros(8), torch.zeros(8), torch.zeros(8), sides, sides], 1)
    assert map_roi_levels(rois, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert map_roi_levels(rois, 2).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    # MMDetection adds 1e-6 inside the log: a hair under 112 already counts as 112
    assert map_roi_levels(torch.tensor([[0.0, 0, 0, 111.99995, 111.99995]]), 4).tolist() == [1]
    # the scale is sqrt(w * h): a 56 x 224 box has scale 112
    assert map_roi_levels(torch.tensor([[0.0, 10, 10, 66, 234]]), 4).tolist() == [1]


def test_multi_scale_roi_align_pools_each_roi_from_its_level(pooling_path):
    generator = torch.Generator().manual_seed(8)
    strides = (4, 8, 16)
    features = [torch.randn(2, 3, 64 // s, 96 // s, generator=generator, dtype=torch.float64) for s in strides]
    side = torch.tensor([8.0, 40, 120, 150, 300, 500, 20, 230])
    x1 = torch.rand(8, generator=generator) * 40
    rois = torch.stack([torch.tensor([0.0, 1, 0, 1, 1, 0, 1, 0]), x1, x1 * 0.5, x1 + side, x1 * 0.5 + side * 0.8], 1)
    rois = rois.double()
    got = multi_scale_roi_align(features, rois, (3, 2), strides, finest_scale=56, sampling_ratio=0)
    levels = [min(max(math.floor(math.log2(math.sqrt(w * h) / 56 + 1e-6)), 0), 2)
              for w, h in (rois[:, 3:] - rois[:, 1:3]).tolist()]
    assert sorted(set(levels)) == [0, 1, 2]
    for k, level in enumerate(levels):
        expected = reference_roi_align(features[level], rois[k:k + 1], (3, 2), 1 / strides[level], 0, True)
        torch.testing.assert_close(got[k:k + 1], expected, rtol=1e-10, atol=1e-10)


def test_multi_scale_roi_align_gradcheck_and_unused_levels():
    generator = torch.Generator().manual_seed(9)
    features = [torch.randn(1, 2, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True),
                torch.randn(1, 2, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True),
                torch.randn(1, 2, 2, 2, generator=generator, dtype=torch.float64, requires_grad=True)]
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0], [0, 2.0, 1.0, 30.0, 28.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *f: multi_scale_roi_align(list(f), rois, 2, (4, 8, 16), finest_scale=10), tuple(features))
    out = multi_scale_roi_align(features, rois, 2, (4, 8, 16), finest_scale=10)
    out.sum().backward()
    assert features[2].grad is None or features[2].grad.abs().max() == 0  # no RoI maps to level 2


# ------------------------------------------------------------------------------------------- box geometry


def test_box_iou_ioa_and_area_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 1], [5, 5, 6, 6]])
    assert box_area(a).tolist() == [4.0, 4.0]
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 2 / 4, 0], [0, 2 / 4, 0]]))
    torch.testing.assert_close(box_ioa(a, b), torch.tensor([[1 / 4, 2 / 4, 0], [0, 2 / 4, 0]]))
    assert box_iou(a.half(), b.half()).dtype == torch.float32
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 3)
    degenerate = torch.tensor([[1.0, 1, 1, 1]])
    assert box_iou(degenerate, degenerate).item() == 0.0  # no NaN for an empty union


def test_box_iou_random_boxes_in_blocks_and_gradient(monkeypatch):
    monkeypatch.setattr(boxes_module, "_PAIRWISE_ELEMENTS", 20)  # several row blocks
    generator = torch.Generator().manual_seed(14)
    xy = torch.rand(9, 2, generator=generator, dtype=torch.float64) * 20
    boxes1 = torch.cat([xy, xy + torch.rand(9, 2, generator=generator, dtype=torch.float64) * 10], 1)
    xy = torch.rand(7, 2, generator=generator, dtype=torch.float64) * 20
    boxes2 = torch.cat([xy, xy + torch.rand(7, 2, generator=generator, dtype=torch.float64) * 10], 1)
    expected = torch.tensor([[_iou(a, b) for b in boxes2.tolist()] for a in boxes1.tolist()], dtype=torch.float64)
    torch.testing.assert_close(box_iou(boxes1, boxes2), expected)
    boxes1.requires_grad_()
    assert torch.autograd.gradcheck(lambda b: box_iou(b, boxes2), (boxes1,))


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -1, 30, 8], [2, 3, 4, 5]])
    assert clip_boxes(boxes, (6, 20)).tolist() == [[0, 0, 20, 6], [2, 3, 4, 5]]


# ---------------------------------------------------------------------------------------------- box coder


def test_encode_decode_round_trip_and_known_values():
    proposals = torch.tensor([[10.0, 20, 30, 60], [0, 0, 8, 4]])
    gt = torch.tensor([[12.0, 18, 34, 70], [1, 1, 5, 5]])
    deltas = encode_boxes(proposals, gt)
    # proposal 0: centre (20, 40), size (20, 40); gt 0: centre (23, 44), size (22, 52)
    torch.testing.assert_close(deltas[0], torch.tensor([3 / 20, 4 / 40, math.log(22 / 20), math.log(52 / 40)]))
    means, stds = (0.1, -0.1, 0.0, 0.05), (0.1, 0.1, 0.2, 0.2)
    normalized = encode_boxes(proposals, gt, means, stds)
    torch.testing.assert_close(normalized, (deltas - torch.tensor(means)) / torch.tensor(stds))
    torch.testing.assert_close(decode_boxes(proposals, normalized, means, stds), gt)


def test_decode_clamps_log_size_and_clips_to_the_image():
    rois = torch.tensor([[10.0, 10, 20, 30]])
    huge = torch.tensor([[0.0, 0, 10, -10]])
    box = decode_boxes(rois, huge, wh_ratio_clip=16 / 1000)[0]
    limit = abs(math.log(16 / 1000))
    torch.testing.assert_close(box[2] - box[0], torch.tensor(10 * math.exp(limit)))
    torch.testing.assert_close(box[3] - box[1], torch.tensor(20 * math.exp(-limit)))
    clipped = decode_boxes(rois, torch.tensor([[0.0, 0, 3, 0]]), max_shape=(25, 40))[0]
    assert clipped.tolist() == pytest.approx([0.0, 10.0, 40.0, 25.0])  # x: 5 +- 45 -> [0, 40]; y2: 30 -> 25


def test_decode_several_boxes_per_roi_and_half_precision():
    rois = torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 15]])
    deltas = torch.tensor([[0.1, 0, 0, 0, 0, 0.2, 0.1, 0], [0, 0, 0, 0, -0.1, 0, 0, 0.3]])
    both = decode_boxes(rois, deltas)
    assert both.shape == (2, 8)
    torch.testing.assert_close(both[:, 4:], decode_boxes(rois, deltas[:, 4:]))
    half = decode_boxes(rois.half(), deltas.half(), max_shape=(20, 30))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), decode_boxes(rois, deltas, max_shape=(20, 30)), atol=0.02, rtol=1e-3)
    big = decode_boxes(torch.tensor([[0.0, 0, 3000, 3000]]).half(), torch.tensor([[0.0, 0, 4, 4]]).half(),
                       max_shape=(800, 1333))
    assert torch.isfinite(big).all()  # exp(4) * 3000 overflows float16, but the clip happens in float32


def test_box_coder_is_differentiable():
    rois = torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 15]], dtype=torch.float64)
    deltas = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: decode_boxes(rois, d, stds=(0.1, 0.1, 0.2, 0.2)), (deltas,))
    gt = torch.tensor([[1.0, 2, 9, 12], [4, 6, 20, 16]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: encode_boxes(rois, g), (gt,))


# --------------------------------------------------------------------------------------------------- NMS


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_nms(boxes, scores, threshold) -> list[int]:
    """Textbook greedy NMS: visit by decreasing score (lower index first on ties), keep unless overlapping."""
    boxes, scores = boxes.tolist(), scores.tolist()
    keep: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: (-scores[i], i)):
        if all(_iou(boxes[i], boxes[j]) <= threshold for j in keep):
            keep.append(i)
    return keep


def crowded_boxes(num: int, generator: torch.Generator):
    """Integer boxes packed in a 100 x 100 area (many overlaps, exact IoU ties) with heavily tied scores."""
    xy = torch.randint(0, 80, (num, 2), generator=generator)
    wh = torch.randint(1, 30, (num, 2), generator=generator)
    boxes = torch.cat([xy, xy + wh], 1).float()
    scores = torch.randint(0, 25, (num,), generator=generator).float() / 25
    return boxes, scores


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_loop(threshold, monkeypatch):
    monkeypatch.setattr(boxes_module, "_NMS_BLOCK", 64)  # several blocks
    generator = torch.Generator().manual_seed(int(threshold * 10))
    boxes, scores = crowded_boxes(600, generator)
    keep = nms(boxes, scores, threshold)
    assert keep.dtype == torch.long
    assert keep.tolist() == reference_nms(boxes, scores, threshold)


def test_nms_suppresses_only_above_the_threshold():
    boxes = torch.tensor([[0.0, 0, 4, 1], [0, 0, 2, 1], [0, 0, 3, 1]])  # IoU(0, 1) = 0.5, IoU(0, 2) = 0.75
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_nms_long_overlap_chain_and_equal_scores():
    # each box overlaps the next one a lot: greedy keeps every other box, a deep dependency chain
    x = torch.arange(300.0)
    boxes = torch.stack([x, torch.zeros(300), x + 10, torch.ones(300)], 1)
    scores = torch.linspace(1, 0.5, 300)
    assert nms(boxes, scores, 0.8).tolist() == reference_nms(boxes, scores, 0.8)
    same = torch.full((300,), 0.5)  # all tied: the order is by index
    assert nms(boxes, same, 0.8).tolist() == reference_nms(boxes, same, 0.8)


def test_nms_random_float_boxes():
    generator = torch.Generator().manual_seed(11)
    xy = torch.rand(400, 2, generator=generator) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(400, 2, generator=generator) * 60], 1).double()
    scores = torch.rand(400, generator=generator)
    assert nms(boxes, scores, 0.5).tolist() == reference_nms(boxes, scores, 0.5)


def test_nms_empty():
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.long
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)


def test_batched_nms_is_nms_per_class(monkeypatch):
    monkeypatch.setattr(boxes_module, "_NMS_BLOCK", 32)
    generator = torch.Generator().manual_seed(12)
    boxes, scores = crowded_boxes(500, generator)
    boxes = boxes - 40  # negative coordinates too
    classes = torch.randint(0, 7, (500,), generator=generator)
    expected = []
    for c in range(7):
        members = (classes == c).nonzero().squeeze(1)
        expected += members[reference_nms(boxes[members], scores[members], 0.5)].tolist()
    expected.sort(key=lambda i: (-scores[i].item(), i))
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == expected


def test_batched_nms_never_suppresses_across_classes():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 2]


# ------------------------------------------------------------------------------------------- paste_masks


def reference_paste(masks, boxes, image_size):
    """MMDetection's CPU paste, one mask at a time, with torch's own grid_sample."""
    height, width = image_size
    out = torch.zeros(len(masks), height, width, dtype=torch.float64)
    for i, (x0, y0, x1, y1) in enumerate(boxes.double().tolist()):
        if x1 <= x0 or y1 <= y0:
            continue
        left, top = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        right, bottom = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
        if right <= left or bottom <= top:
            continue
        img_x = (torch.arange(left, right, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
        img_y = (torch.arange(top, bottom, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(img_y, img_x, indexing="ij")[::-1], -1)[None]  # (1, h, w, 2) as (x, y)
        out[i, top:bottom, left:right] = F.grid_sample(masks[i][None, None].double(), grid, align_corners=False)[0, 0]
    return out


def test_paste_masks_matches_grid_sample_per_mask(monkeypatch):
    monkeypatch.setattr(masks_module, "_CHUNK_ELEMENTS", 300)  # several chunks
    generator = torch.Generator().manual_seed(13)
    masks = torch.rand(12, 7, 5, generator=generator)
    xy = torch.rand(12, 2, generator=generator) * 40 - 5
    boxes = torch.cat([xy, xy + 1 + torch.rand(12, 2, generator=generator) * 25], 1)
    boxes[3] = torch.tensor([10.0, 10, 10, 20])  # no width: empty
    boxes[4] = torch.tensor([45.0, 2, 60, 9])  # starts right of the image
    got = paste_masks(masks, boxes, (30, 40))
    assert got.shape == (12, 30, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_paste(masks, boxes, (30, 40)), atol=1e-5, rtol=1e-5)
    assert got[3].abs().max() == 0 and got[4].abs().max() == 0


def test_paste_masks_full_box_is_the_upsampled_mask():
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    pasted = paste_masks(mask[None], torch.tensor([[0.0, 0, 4, 4]]), (4, 4))[0]
    # pixel centres 0.5..3.5 map to mask coordinates -0.25, 0.25, 0.75, 1.25 (clamped by zero padding at the ends)
    first = torch.tensor([0.75, 0.75, 0.25, 0.0])  # weight of mask cell 0 at image pixels 0..3 (zero padded)
    second = first.flip(0)  # weight of mask cell 1
    expected = torch.outer(first, second) + torch.outer(second, first)
    torch.testing.assert_close(pasted, expected)
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)
