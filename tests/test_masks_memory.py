"""Bounded-memory mask output: the bool paste, the chunk generator, RLEs encoded chunk by chunk, the detector's
`mask_output="probs"` mode and overlays drawn from mask probabilities all give the pixels of the full float
paste thresholded at `mask_thr`, which tests/test_ops.py checks against MMDetection's per-mask grid_sample."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

import cascadevision.ops.masks as masks_module
from cascadevision import build_model
from cascadevision.engine.evaluator import encode_masks, results_to_coco
from cascadevision.errors import ConfigError
from cascadevision.ops import iter_pasted_masks, paste_masks
from cascadevision.visualize import draw_predictions

HEIGHT, WIDTH = 30, 40


def random_case(num=20, seed=0):
    """Masks and boxes with the awkward cases: boxes partly or wholly outside the image, zero width or height."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(num, 7, 5, generator=generator)
    xy = torch.rand(num, 2, generator=generator) * 50 - 8
    boxes = torch.cat([xy, xy + 0.5 + torch.rand(num, 2, generator=generator) * 30], 1)
    boxes[1] = torch.tensor([10.0, 10, 10, 20])  # no width
    boxes[2] = torch.tensor([3.0, 7, 18, 7])  # no height
    boxes[3] = torch.tensor([45.0, 2, 60, 9])  # right of the image
    boxes[4] = torch.tensor([-20.0, -15, 5, 4])  # over the top-left corner
    boxes[5] = torch.tensor([0.0, 0, WIDTH, HEIGHT])  # the whole image
    return masks, boxes


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(masks_module, "_CHUNK_ELEMENTS", 150)  # float paste chunks of a few rows: many chunks


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.0, -1.0])
def test_bool_paste_is_the_float_paste_thresholded(tiny_chunks, threshold):
    masks, boxes = random_case()
    got = paste_masks(masks, boxes, (HEIGHT, WIDTH), threshold=threshold)
    assert got.dtype == torch.bool and got.shape == (20, HEIGHT, WIDTH)
    assert torch.equal(got, paste_masks(masks, boxes, (HEIGHT, WIDTH)) >= threshold)
    if threshold > 0:
        assert not got[1:4].any() and got[5].any()


@pytest.mark.parametrize("max_pixels", [1, HEIGHT * WIDTH * 3, 10 ** 9])
def test_chunks_cover_every_detection_once_with_the_same_pixels(tiny_chunks, max_pixels):
    masks, boxes = random_case()
    expected = paste_masks(masks, boxes, (HEIGHT, WIDTH)) >= 0.5
    seen = []
    for indices, chunk in iter_pasted_masks(masks, boxes, (HEIGHT, WIDTH), 0.5, max_pixels):
        assert chunk.dtype == torch.bool and chunk.shape == (len(indices), HEIGHT, WIDTH)
        assert chunk.numel() <= max(max_pixels, HEIGHT * WIDTH)  # at least one mask per chunk
        assert torch.equal(chunk, expected[indices])
        seen += indices.tolist()
    assert sorted(seen) == list(range(20))


def test_chunks_of_nothing():
    assert list(iter_pasted_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6), 0.5)) == []
    [(indices, chunk)] = iter_pasted_masks(torch.ones(2, 28, 28), torch.zeros(2, 4), (5, 6), 0.5)
    assert sorted(indices.tolist()) == [0, 1] and chunk.shape == (2, 5, 6) and not chunk.any()


def decode(rles):
    return torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).bool()  # (N, H, W)


def test_encode_masks_round_trip():
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, :, 0] = True
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [4, 5] for r in rles)
    # column-major runs by hand: mask 1 is 4 ones (column 0) then 16 zeros
    assert mask_util.decode({"size": [4, 5], "counts": rles[1]["counts"].encode()}).sum() == 4
    assert torch.equal(decode(rles), masks)


def test_coco_results_from_probs_equal_those_from_masks(tiny_chunks):
    masks, boxes = random_case()
    scores, labels = torch.linspace(0.9, 0.1, 20), torch.arange(20) % 3
    full = {"boxes": boxes, "scores": scores, "labels": labels,
            "masks": paste_masks(masks, boxes, (HEIGHT, WIDTH)) >= 0.4}
    probs = {"boxes": boxes, "scores": scores, "labels": labels, "mask_probs": masks,
             "image_size": (HEIGHT, WIDTH), "mask_thr": 0.4}
    expected = results_to_coco([full], [7], [1, 2, 3])
    for max_pixels in (1, 10 ** 9):
        got = results_to_coco([probs], [7], [1, 2, 3], max_pixels=max_pixels)
        assert got == expected
    assert torch.equal(decode([r["segmentation"] for r in got]), full["masks"])
    with pytest.raises(ValueError, match="image_size"):
        results_to_coco([{k: v for k, v in probs.items() if k != "image_size"}], [7], [1, 2, 3])


@pytest.fixture(scope="module")
def detector_outputs():
    """A small random-weight Mask R-CNN, thresholds lowered so it returns masks, run in both output modes."""
    torch.manual_seed(0)
    model = build_model("mask_rcnn_r18_fpn", num_classes=3, roi_head={"test": {"score_thr": 0.0, "max_per_img": 30}}).eval()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 90, 120, generator=generator), torch.rand(3, 70, 50, generator=generator)]
    with torch.no_grad():
        full = model(images)
        model.cfg.roi_head.test.mask_output = "probs"
        probs = model(images)
        model.cfg.roi_head.test.mask_output = "sideways"
        with pytest.raises(ConfigError, match="mask_output"):
            model(images)
    return images, full, probs


def test_detector_probs_mode_gives_the_same_detections_and_rles(detector_outputs):
    images, full, probs = detector_outputs
    assert sum(len(out["boxes"]) for out in full) > 10
    for image, a, b in zip(images, full, probs):
        assert "masks" not in b and "mask_probs" not in a
        assert b["image_size"] == tuple(image.shape[-2:]) and b["mask_thr"] == 0.5
        assert b["mask_probs"].shape == (len(b["boxes"]), 28, 28) and b["mask_probs"].dtype == torch.float32
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key])
        assert a["masks"].shape == (len(a["boxes"]), *image.shape[-2:]) and a["masks"].any()
        assert torch.equal(a["masks"], paste_masks(b["mask_probs"], b["boxes"], b["image_size"]) >= 0.5)
    assert results_to_coco(probs, [1, 2], [1, 2, 3], max_pixels=1) == results_to_coco(full, [1, 2], [1, 2, 3])


def test_overlay_from_probs_equals_overlay_from_masks(detector_outputs):
    images, full, probs = detector_outputs
    for image, a, b in zip(images, full, probs):
        from_masks = np.asarray(draw_predictions(image, a, score_thr=0.0))
        from_probs = np.asarray(draw_predictions(image, b, score_thr=0.0))
        assert np.array_equal(from_masks, from_probs)
        nothing_drawn = np.asarray(draw_predictions(image, a, score_thr=2.0))
        assert (from_probs != nothing_drawn).any(axis=2).mean() > 0.05  # masks and boxes were drawn
