"""HTC's semantic loss normalisation: MMDetection v3's CrossEntropyLoss(ignore_index=255) with its default
avg_non_ignore=False divides the summed per-pixel loss by every pixel, ignored (255) and padding included;
`semantic_loss_avg_non_ignore=True` divides by the labelled pixels only. Expectations are explicit pixel loops."""
import math

import pytest
import torch

from cascadevision.config import update
from cascadevision.models.cascade import CascadeRoIHead, SemanticHead
from cascadevision.models.presets import preset_config


def loop_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(summed CE over the labelled pixels, labelled pixels, all pixels) by a loop with math.exp / math.log."""
    total, labelled = 0.0, 0
    batch, classes, height, width = logits.shape
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                label = int(labels[b, y, x])
                if label == 255:
                    continue
                values = [float(logits[b, c, y, x]) for c in range(classes)]
                top = max(values)
                log_sum = top + math.log(sum(math.exp(v - top) for v in values))
                total += log_sum - values[label]
                labelled += 1
    return total, labelled, batch * height * width


def test_hand_computed_with_ignored_pixels():
    # one image, 3 classes, 2x2 pixels; two pixels are ignored
    logits = torch.tensor([[[[2.0, 0.0], [1.0, -1.0]],
                            [[0.0, 1.0], [1.0, 3.0]],
                            [[-1.0, 0.5], [1.0, 0.0]]]])  # (1, 3, 2, 2)
    labels = torch.tensor([[[0, 255], [2, 255]]])
    # pixel (0,0): logits (2, 0, -1), label 0; pixel (1,0): logits (1, 1, 1), label 2 -> log 3
    first = math.log(math.exp(2) + math.exp(0) + math.exp(-1)) - 2
    second = math.log(3.0)
    head = SemanticHead(4, 5, 3)
    assert head.loss(logits, labels).item() == pytest.approx((first + second) / 4, rel=1e-6)
    assert head.loss(logits, labels, avg_non_ignore=True).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_random_logits_against_the_pixel_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7)
    labels = torch.randint(0, 5, (2, 6, 7))
    labels[torch.rand(2, 6, 7) < 0.3] = 255
    labels[1, 4:] = 255  # padding rows
    total, labelled, pixels = loop_cross_entropy(logits, labels)
    head = SemanticHead(4, 5, 5)
    assert labelled < pixels
    assert head.loss(logits, labels).item() == pytest.approx(total / pixels, rel=1e-6)
    assert head.loss(logits, labels, avg_non_ignore=True).item() == pytest.approx(total / labelled, rel=1e-6)


def test_no_ignored_pixels_gives_the_same_loss_in_both_modes():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 5, 5))
    head = SemanticHead(4, 5, 4)
    assert head.loss(logits, labels).item() == head.loss(logits, labels, avg_non_ignore=True).item()


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_the_roi_head_loss_follows_the_config(avg_non_ignore):
    """Through CascadeRoIHead.loss: a 48x64 image padded to 64x64 (padding = 255), labels taken at stride 8."""
    channels = 8
    cfg = update(preset_config("htc_r50_fpn_1x").roi_head, {
        "box_head": {"fc_channels": 16}, "mask_head": {"conv_channels": channels},
        "sampler": {"add_gt_as_proposals": False, "num_samples": 64},
        "htc": {"semantic_num_classes": 4, "with_semantic": True, "semantic_loss_avg_non_ignore": avg_non_ignore}})
    assert preset_config("htc_r50_fpn_1x").roi_head.htc.semantic_loss_avg_non_ignore is False  # the reference default
    torch.manual_seed(0)
    head = CascadeRoIHead(cfg, num_classes=3, in_channels=channels)
    features = [torch.randn(1, channels, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    semantic = torch.full((48, 64), 3, dtype=torch.uint8)
    semantic[:24, :40] = 1
    semantic[30:, 50:] = 255
    mask = torch.zeros(48, 64, dtype=torch.uint8)
    mask[:24, :40] = 1
    target = {"boxes": torch.tensor([[0.0, 0, 40, 24]]), "labels": torch.tensor([1]), "masks": mask[None],
              "semantic": semantic}
    losses = head.loss(features, [torch.tensor([[0.0, 0, 40, 30]])], [(48, 64)], [target], [(1.0, 1.0)])

    logits = head.semantic_head(features)[0].detach()  # (1, 4, 8, 8)
    labels = torch.full((1, 8, 8), 255)
    for y in range(8):  # nearest 1/8 of the padded map: pixel (8y, 8x); rows 48.. are padding
        for x in range(8):
            labels[0, y, x] = int(semantic[8 * y, 8 * x]) if 8 * y < 48 else 255
    total, labelled, pixels = loop_cross_entropy(logits, labels)
    expected = 0.2 * total / (labelled if avg_non_ignore else pixels)
    assert losses["loss_semantic_seg"].item() == pytest.approx(expected, rel=1e-5)
