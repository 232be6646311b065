"""Test-time augmentation (models.tta.TTADetector, `--tta`, model.tta): flip and scales, boxes merged by
per-class NMS over the union, masks averaged in image space."""
import pytest
import torch
from torch import nn

from cascadevision.cli import build_parser
from cascadevision.commands import model_overrides
from cascadevision.config import InputConfig, ModelConfig, update
from cascadevision.models import build_model
from cascadevision.models.transform import DetectionTransform
from cascadevision.models.tta import TTADetector, merge_augmentations
from cascadevision.ops import paste_masks


class BrightBoxDetector(nn.Module):
    """A detector whose output we know: one detection per colour channel that has pixels > 0.5 in the image
    it is given, its box the extent of those pixels (in that image), score = the channel's mean brightness
    there, label = the channel, and a 28x28 left-to-right ramp as mask probabilities. It records each call's
    test scale (and ignores it: the boxes are exact at any scale)."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig()
        self.transform = DetectionTransform(InputConfig(scale=(64, 48)))
        self.scales_seen = []

    def forward(self, images):
        self.scales_seen.append(self.transform.scale)
        outputs = []
        for image in images:
            boxes, scores, labels = [], [], []
            for channel in range(3):
                region = image[channel] > 0.5
                if region.any():
                    rows, cols = region.nonzero().T
                    boxes.append([cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1])
                    scores.append(image[channel][region].mean().item())
                    labels.append(channel)
            ramp = torch.linspace(0.0, 1.0, 28).expand(len(boxes), 28, 28)  # P(mask) grows to the right
            out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                   "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.long)}
            if self.cfg.roi_head.test.mask_output == "probs":
                out.update(mask_probs=ramp.clone(), image_size=tuple(image.shape[-2:]),
                           mask_thr=self.cfg.roi_head.test.mask_thr)
            else:
                out["masks"] = paste_masks(ramp, out["boxes"], tuple(image.shape[-2:]), threshold=0.5)
            outputs.append(out)
        return outputs


def test_flip_tta_returns_the_same_box_for_a_symmetric_object():
    image = torch.zeros(3, 30, 40)
    image[0, 10:20, 12:28] = 0.9  # centred left-right: the mirror image is the same picture
    image[1, 4:9, 3:11] = 0.8  # not symmetric: flip + unflip must still land on it exactly
    detector = BrightBoxDetector()
    detector.cfg.roi_head.test.mask_thr = 0.4
    plain = detector([image])[0]
    merged = TTADetector(detector, scales=[(64, 48), (80, 60)], flip=True).eval()([image])[0]
    assert detector.scales_seen[1:] == [(64, 48), (64, 48), (80, 60), (80, 60)]  # each scale, plain and mirrored
    assert detector.transform.scale == (64, 48)  # restored afterwards
    assert merged["boxes"].tolist() == [[12.0, 10.0, 28.0, 20.0], [3.0, 4.0, 11.0, 9.0]]
    assert torch.equal(merged["labels"], plain["labels"]) and torch.equal(merged["scores"], plain["scores"])
    # the symmetric object's mask: the mean of a left-to-right ramp and its mirror image is flat at 0.5, so
    # (>= 0.4) it covers the whole box; the plain ramp leaves out the box's left part
    assert merged["masks"][0, 10:20, 12:28].all() and merged["masks"][0].sum() == 10 * 16
    assert not plain["masks"][0, 10:20, 12:17].any()


def test_one_augmentation_is_the_plain_model_exactly():
    torch.manual_seed(0)
    model = build_model("mask_rcnn_r18_fpn", num_classes=3, input={"scale": (96, 64)}, backbone={"base_channels": 8},
                        neck={"out_channels": 16}, rpn={"feat_channels": 16},
                        roi_head={"box_head": {"fc_channels": 32}, "mask_head": {"conv_channels": 8},
                                  "test": {"score_thr": 0.0}}).eval()
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 40)]
    with torch.no_grad():
        plain = model(images)
        for wrapped in (TTADetector(model, scales=[], flip=False), TTADetector(model, scales=[(96, 64)], flip=False)):
            out = wrapped.eval()(images)
            for a, b in zip(plain, out):
                assert a.keys() == b.keys() and len(a["boxes"]) > 0
                assert all(torch.equal(a[k], b[k]) for k in a)
        # another single scale is the model with that input scale
        other = TTADetector(model, scales=[(128, 80)], flip=False)(images)
        model.transform.scale = (128, 80)
        expected = model(images)
        model.transform.scale = (96, 64)
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(other, expected))


def naive_merge(predictions, flipped, size, nms_iou, max_per_img, mask_thr):
    """Per-class greedy NMS and per-detection mask averaging written as plain loops."""
    height, width = size
    dets = []  # (score, label, box in the original image, augmentation, index)
    for a, (pred, flip) in enumerate(zip(predictions, flipped)):
        for i in range(len(pred["boxes"])):
            x1, y1, x2, y2 = pred["boxes"][i].tolist()
            box = [width - x2, y1, width - x1, y2] if flip else [x1, y1, x2, y2]
            dets.append((pred["scores"][i].item(), int(pred["labels"][i]), box, a, i))

    def iou(p, q):
        w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = w * h
        return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)

    order = sorted(range(len(dets)), key=lambda k: -dets[k][0])
    kept = []
    for k in order:
        if all(dets[j][1] != dets[k][1] or iou(dets[j][2], dets[k][2]) <= nms_iou for j in kept):
            kept.append(k)
    kept = kept[:max_per_img]
    masks = []
    for k in kept:
        total, count = torch.zeros(height, width), 0
        for a, (pred, flip) in enumerate(zip(predictions, flipped)):
            group = [j for j in range(len(dets)) if dets[j][3] == a and dets[j][1] == dets[k][1]
                     and (j == k or iou(dets[j][2], dets[k][2]) > nms_iou)]
            if dets[k][3] == a:
                group = [k]
            if not group:
                continue
            best = max(group, key=lambda j: dets[j][0])
            i = dets[best][4]
            pasted = paste_masks(pred["mask_probs"][i:i + 1], pred["boxes"][i:i + 1], size)[0]
            if flip:
                pasted = pasted[:, list(range(width - 1, -1, -1))]
            total += pasted
            count += 1
        masks.append(total / count >= mask_thr)
    return [dets[k] for k in kept], torch.stack(masks)


def test_merged_masks_equal_a_naive_loop():
    torch.manual_seed(1)
    size = (40, 50)
    base = torch.tensor([[5.0, 5.0, 25.0, 30.0], [20.0, 10.0, 45.0, 35.0], [2.0, 20.0, 15.0, 38.0]])
    predictions, flipped = [], [False, True, False]
    for a, flip in enumerate(flipped):
        boxes = base + torch.rand(3, 4) * 3 - 1.5
        if flip:  # what a run on the mirrored image would have predicted
            boxes = torch.stack([size[1] - boxes[:, 2], boxes[:, 1], size[1] - boxes[:, 0], boxes[:, 3]], 1)
        predictions.append({"boxes": boxes, "scores": torch.rand(3), "labels": torch.tensor([0, 1, a % 2]),
                            "mask_probs": torch.rand(3, 28, 28)})
    merged = merge_augmentations(predictions, flipped, size, nms_iou=0.5, max_per_img=100, mask_thr=0.5)
    expected, masks = naive_merge(predictions, flipped, size, 0.5, 100, 0.5)
    assert merged["scores"].tolist() == [d[0] for d in expected]
    assert merged["labels"].tolist() == [d[1] for d in expected]
    assert torch.allclose(merged["boxes"], torch.tensor([d[2] for d in expected]))
    assert 1 < len(expected) < 9  # some boxes were merged, not all
    assert torch.equal(merged["masks"], masks)
    capped = merge_augmentations(predictions, flipped, size, nms_iou=0.5, max_per_img=2, mask_thr=0.5)
    assert torch.equal(capped["masks"], masks[:2]) and len(capped["boxes"]) == 2


def test_no_detection_anywhere_gives_empty_outputs():
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
             "mask_probs": torch.zeros(0, 28, 28)}
    merged = merge_augmentations([empty, empty], [False, True], (10, 12), 0.5, 100, 0.5)
    assert merged["boxes"].shape == (0, 4) and merged["masks"].shape == (0, 10, 12)


def test_tta_config_and_training_mode():
    cfg = update(ModelConfig(), {"tta": {"enabled": True, "scales": [[1333, 800], [1600, 1000]], "flip": False}})
    detector = BrightBoxDetector()
    detector.cfg = cfg
    wrapped = TTADetector.from_config(detector)
    assert wrapped.augmentations == [((1333, 800), False), ((1600, 1000), False)]
    assert wrapped.cfg is cfg
    with pytest.raises(RuntimeError, match="for inference"):
        wrapped.train()([torch.zeros(3, 8, 8)])


def test_the_tta_flag_sets_model_tta_enabled():
    parser = build_parser()
    args = parser.parse_args(["eval", "ckpt.pth", "--ann", "a.json", "--images", "imgs", "--tta",
                              "--set", "model.tta.scales=[[1333, 800]]"])
    assert model_overrides(args) == {"tta": {"scales": [[1333, 800]], "enabled": True}}
    args = parser.parse_args(["predict", "ckpt.pth", "img.png", "--out", "o"])
    assert "tta" not in model_overrides(args)
