"""Training augmentation (data.train_scales / scale_mode, data.lsj, data.photometric): after every transform the
boxes, masks and semantic labels still sit on the pixels they describe.

The images are hand-built: instance i is a rectangle of pure colour in channel i on black, so "the pixels of
instance i" is `image[i] > 0.4`, a reference that shares nothing with the transforms. Integer resize factors
keep that exact: bilinear at x2 or x3 leaves the rectangle's pixels >= 4/9 (its corners at x3) and the others
<= 1/3.
"""
import colorsys

import pytest
import torch

from cascadevision.config import Config, DataConfig, InputConfig, LSJConfig, PhotometricConfig, load_config, to_dict, update
from cascadevision.data import LargeScaleJitter, PhotoMetricDistortion, RandomHorizontalFlip, RandomResize, train_transforms
from cascadevision.data.transforms import hsv_to_rgb, rgb_to_hsv
from cascadevision.errors import ConfigError
from cascadevision.models.transform import DetectionTransform

# (channel = instance index, label, semantic class, rows, cols): rows/cols half-open, on even pixels
RECTS = [(0, 1, 5, (2, 8), (4, 12)), (1, 0, 7, (10, 18), (14, 20)), (2, 2, 9, (16, 20), (0, 6))]
H, W = 20, 24


def colour_sample():
    image = torch.zeros(3, H, W)
    masks = torch.zeros(len(RECTS), H, W, dtype=torch.uint8)
    semantic = torch.full((H, W), 3, dtype=torch.uint8)  # 3: background
    boxes, labels = [], []
    for i, (channel, label, cls, (r0, r1), (c0, c1)) in enumerate(RECTS):
        image[channel, r0:r1, c0:c1] = 1.0
        masks[i, r0:r1, c0:c1] = 1
        semantic[r0:r1, c0:c1] = cls
        boxes.append([c0, r0, c1, r1])
        labels.append(label)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "masks": masks,
              "semantic": semantic, "image_id": 1}
    return image, target


def assert_aligned(image, target):
    """Every kept instance's mask is exactly its colour region, its box the region's extent; the semantic map is
    the colour map; instances whose colour left the image are gone."""
    present = [i for i in range(len(RECTS)) if (image[RECTS[i][0]] > 0.4).any()]
    label_of = {RECTS[i][1]: i for i in range(len(RECTS))}
    kept = [label_of[int(label)] for label in target["labels"]]
    assert kept == present
    expected_semantic = torch.full(image.shape[1:], 3, dtype=torch.uint8)
    for i in range(len(RECTS)):
        expected_semantic[image[RECTS[i][0]] > 0.4] = RECTS[i][2]
    assert torch.equal(target["semantic"], expected_semantic)
    assert target["masks"].shape == (len(present), *image.shape[1:])
    for k, i in enumerate(present):
        region = image[RECTS[i][0]] > 0.4
        assert torch.equal(target["masks"][k].bool(), region)
        rows, cols = region.nonzero().T
        extent = [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
        assert target["boxes"][k].tolist() == extent


def test_the_hand_built_sample_is_aligned():
    assert_aligned(*colour_sample())


def test_choice_resize_picks_each_scale_and_keeps_everything_aligned():
    image, target = colour_sample()  # 24 x 20: (48, 40) doubles it, (72, 60) triples it
    transform = RandomResize([(48, 40), (72, 60)], mode="choice")
    torch.manual_seed(0)
    sizes = set()
    for _ in range(8):
        out_image, out = transform(image, target)
        sizes.add(tuple(out_image.shape[1:]))
        assert_aligned(out_image, out)
    assert sizes == {(40, 48), (60, 72)}
    assert_aligned(image, target)  # the input is left as it was


def test_short_side_scales_and_range_mode():
    image, target = colour_sample()
    out_image, out = RandomResize([(40,)])(image, target)  # short side 20 -> 40, the long side follows
    assert out_image.shape[1:] == (40, 48)
    assert_aligned(out_image, out)
    ranged = RandomResize([(30,), (50,)], mode="range")
    torch.manual_seed(1)
    shorts = {ranged(image, target)[0].shape[1] for _ in range(12)}
    assert shorts <= set(range(30, 51)) and len(shorts) > 3
    pairs = RandomResize([(40, 20), (48, 30)], mode="range")  # long side 40-48 (never binding), short 20-30
    heights = {pairs(image, target)[0].shape[1] for _ in range(12)}
    assert heights <= set(range(20, 31)) and len(heights) > 3
    # a fractional factor: nearest masks stay within a pixel of the bilinear colour edges
    torch.manual_seed(2)
    out_image, out = ranged(image, target)
    for k, (channel, *_rest) in enumerate(RECTS):
        region = out_image[channel] > 0.4
        assert (out["masks"][k].bool() ^ region).sum() <= region.sum() * 0.25


def test_lsj_crop_drops_instances_that_leave_and_clips_the_rest():
    image, target = colour_sample()
    transform = LargeScaleJitter(output_size=24, scale_range=(2.0, 2.0))  # to fit 48 x 48: 48 x 40, crop 24 x 24
    torch.manual_seed(0)
    counts = set()
    for _ in range(20):
        out_image, out = transform(image, target)
        assert out_image.shape == (3, 24, 24) and out["keep_size"] is True
        assert_aligned(out_image, out)
        counts.add(len(out["labels"]))
    assert min(counts) < len(RECTS)  # some crops lost instances ...
    assert max(counts) >= 2  # ... and some kept several


def test_lsj_shrinks_without_cropping_and_the_model_pads_and_keeps_the_size():
    image, target = colour_sample()
    transform = LargeScaleJitter(output_size=96, scale_range=(0.5, 0.5))  # 48 x 40 fits in 96: no crop
    out_image, out = transform(torch.nn.functional.interpolate(image[None], scale_factor=4, mode="nearest")[0],
                               {**target, "boxes": target["boxes"] * 4,
                                "masks": target["masks"].repeat_interleave(4, 1).repeat_interleave(4, 2),
                                "semantic": target["semantic"].repeat_interleave(4, 0).repeat_interleave(4, 1)})
    assert out_image.shape == (3, 40, 48)
    assert_aligned(out_image, out)
    assert torch.equal(out["boxes"], target["boxes"] * 2)
    model_transform = DetectionTransform(InputConfig(scale=(1333, 800)))
    batch, sizes, factors, _ = model_transform([out_image, out_image], [out, {k: v for k, v in out.items()
                                                                              if k != "keep_size"}])
    assert sizes == [(40, 48), (800, 960)] and factors[0] == (1.0, 1.0)
    assert batch.shape == (2, 3, 800, 960)
    assert (batch[0, :, 40:] == 0).all() and (batch[0, :, :, 48:] == 0).all()  # padding after normalisation


def test_photometric_distortion_moves_no_pixel_and_no_annotation():
    image, target = colour_sample()
    image = image * 0.6 + 0.2
    transform = PhotoMetricDistortion()
    torch.manual_seed(0)
    changed = 0
    for _ in range(6):
        out_image, out = transform(image, target)
        assert out is target and out_image.shape == image.shape
        assert 0 <= out_image.min() and out_image.max() <= 1
        # the image is recoloured, but every pixel of one rectangle still has one colour
        for channel, _label, _cls, (r0, r1), (c0, c1) in RECTS:
            patch = out_image[:, r0:r1, c0:c1].flatten(1)
            assert torch.allclose(patch, patch[:, :1].expand_as(patch), atol=1e-6)
        changed += not torch.equal(out_image, image)
    assert changed >= 4


def test_hsv_conversion_matches_colorsys():
    torch.manual_seed(0)
    pixels = torch.rand(3, 4, 5, dtype=torch.float64)
    pixels[:, 0, 0] = torch.tensor([0.3, 0.3, 0.3])  # grey: no hue
    pixels[:, 0, 1] = torch.tensor([0.9, 0.9, 0.2])  # two channels tied at the max
    hue, saturation, value = rgb_to_hsv(pixels)
    for r in range(4):
        for c in range(5):
            expected = colorsys.rgb_to_hsv(*pixels[:, r, c].tolist())
            assert [hue[r, c].item(), saturation[r, c].item(), value[r, c].item()] == pytest.approx(expected, abs=1e-9)
    assert torch.allclose(hsv_to_rgb(hue, saturation, value), pixels, atol=1e-9)
    shifted = hsv_to_rgb((hue + 0.25) % 1, saturation, value)
    expected = colorsys.hsv_to_rgb((hue[1, 2].item() + 0.25) % 1, saturation[1, 2].item(), value[1, 2].item())
    assert shifted[:, 1, 2].tolist() == pytest.approx(expected, abs=1e-9)


def test_train_transforms_from_the_data_config_and_seeds():
    assert repr(train_transforms(DataConfig())) == "RandomHorizontalFlip(p=0.5)"  # options off: the flip alone
    data = update(DataConfig(), {"lsj": {"output_size": 24, "scale_range": [2.0, 2.0]}, "flip_prob": 0.5,
                                 "photometric": {"enabled": True}})
    transform = train_transforms(data)
    image, target = colour_sample()

    def draws(seed):
        torch.manual_seed(seed)
        return [transform(image, target) for _ in range(4)]

    first, again, other = draws(3), draws(3), draws(4)
    for (a_image, a), (b_image, b) in zip(first, again):
        assert torch.equal(a_image, b_image) and torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["semantic"], b["semantic"])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # geometry only (no colour jitter), with the flip: the colour reference still holds
    geometric = train_transforms(update(data, {"photometric": {"enabled": False}, "flip_prob": 1.0}))
    torch.manual_seed(5)
    for _ in range(6):
        assert_aligned(*geometric(image, target))
    multi = train_transforms(update(DataConfig(), {"train_scales": [[48, 40], [72, 60]]}))
    out_image, out = multi(image, target)
    assert out["keep_size"] is True and out_image.shape[1] in (40, 60)
    assert_aligned(out_image, out)


@pytest.mark.parametrize("overrides, message", [
    (["data.train_scales=[[1333, 800, 3]]"], "train_scales: each entry is"),
    (["data.train_scales=[[1333, 640]]", "data.scale_mode=range"], "scale_mode range needs two"),
    (["data.train_scales=[[1333, 640], 800]", "data.scale_mode=range"], "scale_mode range needs two"),
    (["data.scale_mode=random"], "data.scale_mode must be one of choice, range"),
    (["data.train_scales=[0]"], "data.train_scales"),
    (["data.lsj.output_size=1024", "data.train_scales=[800]"], "give one of them"),
    (["data.lsj.output_size=1024", "data.lsj.scale_range=[2.0, 0.1]"], "lsj.scale_range must be"),
    (["data.photometric.hue_delta=400"], "data.photometric.hue_delta must be in"),
    (["model.tta.scales=[[1333]]"], "model.tta.scales"),
])
def test_bad_augmentation_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mask_rcnn_r18_fpn", overrides)


def test_the_keys_show_in_the_full_config_and_the_recipes_load():
    shown = to_dict(Config())
    assert shown["data"]["train_scales"] == [] and shown["data"]["scale_mode"] == "choice"
    assert shown["data"]["lsj"] == to_dict(LSJConfig()) and shown["data"]["photometric"] == to_dict(PhotometricConfig())
    assert shown["model"]["tta"] == {"enabled": False, "scales": [], "flip": True}
    ms = load_config("htc_r50_fpn_20e_ms")
    assert ms.data.scale_mode == "range" and ms.data.train_scales == ((1600, 400), (1600, 1400))
    lsj = load_config("mask_rcnn_r50_fpn_lsj")
    assert lsj.data.lsj.output_size == 1024 and lsj.model.input.scale == (1024, 1024)
    assert isinstance(train_transforms(ms.data).transforms[-1], RandomHorizontalFlip)
