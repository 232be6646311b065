"""Behaviour of the cascade RoI head: per-stage relabelling, interleaving, mask information flow, semantic
fusion and the test-time ensembles, each checked against a hand-built expectation."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cascadevision.config import EarlyExitConfig, update
from cascadevision.early_exit.detection import (
    RegionExitPolicy,
    exit_policy_for_head,
    per_roi_macs,
)
from cascadevision.errors import ModelInputError
from cascadevision.models.cascade import CascadeRoIHead
from cascadevision.models.presets import preset_config
from cascadevision.ops import multi_scale_roi_align, roi_align

CHANNELS = 8


SMALL = {"box_head": {"fc_channels": 16}, "mask_head": {"conv_channels": CHANNELS}, "htc": {"semantic_num_classes": 4},
         "sampler": {"add_gt_as_proposals": False, "num_samples": 64}}


def make_head(semantic: bool = False, **changes) -> CascadeRoIHead:
    """HTC's head at toy width; `changes` are `model.roi_head` values (nested dicts for its sections)."""
    cfg = update(update(preset_config("htc_r50_fpn_1x").roi_head, SMALL), {"htc": {"with_semantic": semantic}})
    cfg = update(cfg, changes)
    torch.manual_seed(0)
    return CascadeRoIHead(cfg, num_classes=3, in_channels=CHANNELS)


def features(size=64):
    torch.manual_seed(1)
    return [torch.randn(1, CHANNELS, size // s, size // s) for s in (4, 8, 16, 32, 64)]


def target(size=64):
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[0:40, 0:40] = 1
    sem = torch.full((size, size), 3, dtype=torch.uint8)
    sem[:40, :40] = 1
    return {"boxes": torch.tensor([[0.0, 0, 40, 40]]), "labels": torch.tensor([1]), "masks": mask[None],
            "semantic": sem}


def zero_regression(head):
    for bbox_head in head.bbox_head:
        torch.nn.init.zeros_(bbox_head.fc_reg.weight)
        torch.nn.init.zeros_(bbox_head.fc_reg.bias)


def test_each_stage_labels_at_its_own_iou():
    head = make_head(with_mask=False)
    zero_regression(head)  # refined boxes == input boxes, so only the thresholds change between stages
    # IoU with the gt (0,0,40,40): 0.4, 0.55, 0.65, 0.75
    proposals = torch.tensor([[0.0, 0, 40, 16], [0.0, 0, 40, 22], [0.0, 0, 40, 26], [0.0, 0, 40, 30]])
    seen = {}
    for t, bbox_head in enumerate(head.bbox_head):
        original = bbox_head.loss

        def spy(cls_score, deltas, labels, *args, t=t, original=original):
            seen[t] = labels.clone()
            return original(cls_score, deltas, labels, *args)
        bbox_head.loss = spy
    head.loss(features(), [proposals], [(64, 64)], [target()], [(1.0, 1.0)])
    positives = {t: int((labels == 1).sum()) for t, labels in seen.items()}
    assert positives == {0: 3, 1: 2, 2: 1}  # thresholds 0.5, 0.6, 0.7
    assert all(int((labels == 3).sum()) == 4 - positives[t] for t, labels in seen.items())


@pytest.mark.parametrize("interleaved", [True, False])
def test_interleaved_masks_train_on_refined_boxes(interleaved):
    head = make_head(htc={"interleaved": interleaved})
    zero_regression(head)
    # stage 1 moves every box right by 0.1 * width: dx = 1 with stds 0.1
    torch.nn.init.constant_(head.bbox_head[0].fc_reg.bias[:1], 1.0)
    proposals = torch.tensor([[0.0, 0, 40, 40]])
    mask_boxes = {}
    original = head._mask_loss

    def spy(stage, features_, sampled, *args):
        mask_boxes[stage] = torch.cat(sampled.pos_boxes())
        return original(stage, features_, sampled, *args)
    head._mask_loss = spy
    head.loss(features(), [proposals], [(64, 64)], [target()], [(1.0, 1.0)])
    expected = torch.tensor([[4.0, 0, 44, 40]]) if interleaved else proposals
    torch.testing.assert_close(mask_boxes[0], expected)


@pytest.mark.parametrize("info_flow", [True, False])
def test_mask_information_flow(info_flow):
    head = make_head(htc={"mask_info_flow": info_flow}).eval()
    mask_feats = torch.randn(2, CHANNELS, 14, 14)
    before = head._mask_logits(2, mask_feats)[-1]
    with torch.no_grad():
        head.mask_head[0].convs[0].conv.weight.mul_(3.0)
    after = head._mask_logits(2, mask_feats)[-1]
    assert (not torch.allclose(before, after)) is info_flow
    assert (head.mask_head[1].conv_res is not None) is info_flow


def test_semantic_fusion_adds_pooled_semantic_features():
    head = make_head(semantic=True).eval()
    feats = features()
    rois = torch.tensor([[0.0, 4, 4, 30, 36]])
    _, semantic_feat = head.semantic_head(feats)
    assert semantic_feat.shape[-2:] == feats[1].shape[-2:]  # stride 8
    plain_box = head._roi_features(feats, rois, 7, None)
    fused_box = head._roi_features(feats, rois, 7, semantic_feat)
    fused_mask = head._roi_features(feats, rois, 14, semantic_feat)
    sem14 = roi_align(semantic_feat, rois, 14, spatial_scale=1 / 8, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(fused_box, plain_box + F.adaptive_avg_pool2d(sem14, 7))
    plain_mask = multi_scale_roi_align(feats[:4], rois, 14, (4, 8, 16, 32))
    torch.testing.assert_close(fused_mask, plain_mask + sem14)
    assert not torch.allclose(fused_box, plain_box)


def test_semantic_loss_and_label_range():
    head = make_head(semantic=True)
    proposals = [torch.tensor([[0.0, 0, 40, 30]])]
    losses = head.loss(features(), proposals, [(64, 64)], [target()], [(1.0, 1.0)])
    assert torch.isfinite(losses["loss_semantic_seg"]) and losses["loss_semantic_seg"] > 0
    bad = target()
    bad["semantic"][0, 0] = 7  # the head has 4 classes
    bad["file_name"] = "img_7.png"
    with pytest.raises(ModelInputError, match="img_7.png: semantic label 7 is outside"):
        head.loss(features(), proposals, [(64, 64)], [bad], [(1.0, 1.0)])


def test_scores_average_logits_before_softmax():
    head = make_head(with_mask=False, test={"score_thr": 0.0}).eval()
    zero_regression(head)
    stage_logits = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0, 8.0]])
    for bbox_head, logits in zip(head.bbox_head, stage_logits):
        torch.nn.init.zeros_(bbox_head.fc_cls.weight)
        bbox_head.fc_cls.bias.data.copy_(logits)
    out = head.predict(features(), [torch.tensor([[0.0, 0, 40, 40]])], [(64, 64)])[0]
    expected = stage_logits.mean(0).softmax(0)[:3]
    mean_of_probs = stage_logits.softmax(1).mean(0)[:3]
    got = torch.zeros(3)
    got[out["labels"]] = out["scores"]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, mean_of_probs, atol=1e-3)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0, 40, 40]]).expand(3, 4))


@pytest.mark.parametrize("info_flow", [False, True])
@pytest.mark.parametrize("ensemble", ["mean", "last"])
def test_mask_ensemble(ensemble, info_flow):
    head = make_head(htc={"mask_info_flow": info_flow}, test={"mask_ensemble": ensemble, "score_thr": 0.0,
                                                              "max_per_img": 1}).eval()
    feats = features()
    detections = head.predict(feats, [torch.tensor([[0.0, 0, 40, 40]])], [(64, 64)])
    box, label = detections[0]["boxes"], int(detections[0]["labels"][0])
    # the reference, written out: RoIAlign of the detection's box from P2..P5 at 14x14, then each stage's mask
    # head on it; with information flow (HTC eq. 5) stage t also gets stage t-1's last conv feature through
    # its 1x1 conv_res, added to the RoI feature
    with torch.no_grad():
        roi_feat = multi_scale_roi_align(feats[:4], torch.cat([torch.zeros(1, 1), box], 1), 14, (4, 8, 16, 32),
                                         finest_scale=56, sampling_ratio=0, aligned=True)
        probs, previous = [], None
        for mask_head in head.mask_head:
            x = roi_feat if previous is None else roi_feat + mask_head.conv_res(previous)
            for conv in mask_head.convs:
                x = conv(x)
            logits = mask_head.conv_logits(F.relu(mask_head.upsample(x)))  # (1, 3, 28, 28)
            probs.append(logits[0, label].sigmoid())
            previous = x if info_flow else None
    assert (head.mask_head[1].conv_res is not None) == info_flow
    expected = torch.stack(probs).mean(0) if ensemble == "mean" else probs[-1]
    torch.testing.assert_close(detections[0]["mask_probs"][0], expected)


def test_cascade_mask_rcnn_is_htc_with_switches_off():
    cfg = preset_config("cascade_mask_rcnn_r50_fpn_1x").roi_head
    head = CascadeRoIHead(update(cfg, SMALL), 3, CHANNELS)
    assert not head.interleaved and not head.mask_info_flow and head.semantic_head is None
    assert all(m.conv_res is None for m in head.mask_head)
    assert [a.pos_iou for a in head.assigners] == [0.5, 0.6, 0.7]
    assert not any(a.match_low_quality for a in head.assigners)


def exit_head(policy="max_prob", threshold=0.9, background=0.0, prune=0.0):
    head = make_head(test={"score_thr": 0.0})
    head.exit_policy = exit_policy_for_head(head, EarlyExitConfig(
        policy=policy, threshold=threshold, background_threshold=background, prune_threshold=prune))
    zero_regression(head)
    for bbox_head in head.bbox_head:
        torch.nn.init.zeros_(bbox_head.fc_cls.weight)
    return head.eval()


def test_confident_rois_leave_after_the_first_stage():
    head = exit_head(threshold=0.9)
    head.bbox_head[0].fc_cls.bias.data.copy_(torch.tensor([6.0, 0, 0, 0]))  # P(class 0) = 0.98 after stage 1
    head.bbox_head[1].fc_cls.bias.data.copy_(torch.tensor([0.0, 9, 0, 0]))  # would change the answer
    proposals = [torch.tensor([[0.0, 0, 40, 40], [10.0, 10, 30, 50]])]
    out = head.predict(features(), proposals, [(64, 64)])[0]
    assert head.exit_policy.counts.rois == [2, 0, 0] and head.exit_policy.counts.exits == [2, 0, 0]
    top = out["scores"].argmax()
    assert out["labels"][top] == 0
    torch.testing.assert_close(out["scores"][top], torch.tensor([6.0, 0, 0, 0]).softmax(0)[0])
    assert (out["exit_stage"] == 0).all()
    assert head.exit_policy.counts.masks == [len(out["boxes"]), 0, 0]  # masks from stage 1's head only


def test_unconfident_rois_run_every_stage_and_match_the_full_cascade():
    proposals = [torch.tensor([[0.0, 0, 40, 40], [10.0, 10, 30, 50]])]
    full = exit_head(policy="none").predict(features(), proposals, [(64, 64)])[0]
    never = exit_head(threshold=1.01)
    out = never.predict(features(), proposals, [(64, 64)])[0]
    assert never.exit_policy.counts.rois == [2, 2, 2]
    for key in ("boxes", "scores", "labels", "mask_probs"):
        torch.testing.assert_close(out[key], full[key])


def test_background_rois_are_dropped_and_deadline_stops_the_cascade():
    head = exit_head(policy="none", background=0.5)
    head.bbox_head[0].fc_cls.bias.data.copy_(torch.tensor([0.0, 0, 0, 5]))  # P(background) = 0.87
    out = head.predict(features(), [torch.tensor([[0.0, 0, 40, 40]])], [(64, 64)])[0]
    assert head.exit_policy.counts.rois == [1, 0, 0] and head.exit_policy.counts.dropped == [1, 0, 0]
    assert len(out["boxes"]) == 0 and out["mask_probs"].shape == (0, 28, 28)
    head = exit_head(policy="none")
    head.exit_policy.deadline = 0.0  # already past
    head.predict(features(), [torch.tensor([[0.0, 0, 40, 40]])], [(64, 64)])
    assert head.exit_policy.counts.rois == [1, 0, 0] and head.exit_policy.counts.exits == [1, 0, 0]


def test_pruned_rois_stop_after_the_first_stage_but_are_kept():
    head = exit_head(policy="none", prune=0.3)
    # stage 1: P = softmax(0, 0, 0, 2) -> best class 0.095 < 0.3; the later stages would make it confident
    head.bbox_head[0].fc_cls.bias.data.copy_(torch.tensor([0.0, 0, 0, 2]))
    head.bbox_head[1].fc_cls.bias.data.copy_(torch.tensor([0.0, 9, 0, 0]))
    out = head.predict(features(), [torch.tensor([[0.0, 0, 40, 40]])], [(64, 64)])[0]
    assert head.exit_policy.counts.rois == [1, 0, 0] and head.exit_policy.counts.exits == [1, 0, 0]
    assert head.exit_policy.counts.dropped == [0, 0, 0]
    expected = 1 / (3 + math.exp(2))
    torch.testing.assert_close(out["scores"], torch.full((3,), expected))  # every class of the one RoI
    assert (out["exit_stage"] == 0).all() and head.exit_policy.counts.masks == [3, 0, 0]
    # a RoI above the prune threshold keeps going; background dropping wins over pruning
    head.exit_policy = exit_policy_for_head(head, dataclasses.replace(head.exit_policy.cfg, prune_threshold=0.05))
    head.predict(features(), [torch.tensor([[0.0, 0, 40, 40]])], [(64, 64)])
    assert head.exit_policy.counts.rois == [1, 1, 1]
    probs = torch.tensor([[0.05, 0.05, 0.0, 0.9], [0.5, 0.1, 0.1, 0.3]])
    leave, drop = RegionExitPolicy(dataclasses.replace(head.exit_policy.cfg, background_threshold=0.8), 3)(0, probs)
    assert leave.tolist() == [False, False] and drop.tolist() == [True, False]


def test_exit_summary_counts_roi_head_compute():
    head = exit_head(threshold=0.9)
    head.bbox_head[0].fc_cls.bias.data.copy_(torch.tensor([6.0, 0, 0, 0]))
    head.reset_exit_stats()
    head.predict(features(), [torch.tensor([[0.0, 0, 40, 40], [10.0, 10, 30, 50]])], [(64, 64)])
    summary = head.exit_summary()
    box, mask = per_roi_macs(head)
    # box head: two FCs (8*7*7 -> 16 -> 16) plus cls (16 -> 4) and reg (16 -> 4) per RoI
    assert box == [8 * 49 * 16 + 16 * 16 + 16 * 4 + 16 * 4] * 3
    dets = sum(summary["masks"])
    spent = 2 * box[0] + dets * mask[0]
    full = 2 * sum(box) + dets * sum(mask)
    assert summary["roi_head_gmacs"] * 1e9 == pytest.approx(spent)
    assert summary["saved_fraction"] == pytest.approx(1 - spent / full)


def test_info_flow_with_narrower_mask_convs():
    head = make_head(mask_head={"conv_channels": 4}).eval()
    logits = head._mask_logits(2, torch.randn(2, CHANNELS, 14, 14))
    assert [tuple(l.shape) for l in logits] == [(2, 3, 28, 28)] * 3
    assert head.mask_head[1].conv_res.conv.weight.shape == (CHANNELS, 4, 1, 1)
