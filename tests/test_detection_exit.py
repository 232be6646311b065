"""Region-level early exit (`early_exit/detection.py`) on hand-made class probabilities: which RoIs leave, which
are dropped, and what the counts cost. Every expectation is worked out by hand in the comments."""
import math

import pytest
import torch

from cascadevision.config import EarlyExitConfig
from cascadevision.early_exit.detection import RegionExitPolicy, StageCounts, exit_summary

# four RoIs, three classes and background (last): probabilities after some stage
PROBS = torch.tensor([
    [0.70, 0.10, 0.10, 0.10],  # A: clearly class 0
    [0.30, 0.30, 0.10, 0.30],  # B: unsure
    [0.10, 0.00, 0.00, 0.90],  # C: background
    [0.45, 0.05, 0.00, 0.50],  # D: class 0 or background
])


def decide(stage=0, num_stages=3, **cfg):
    leave, drop = RegionExitPolicy(EarlyExitConfig(**cfg), num_stages)(stage, PROBS)
    return leave.tolist(), drop.tolist()


def entropy(*p):
    """H(p) / log 4, with 0 log 0 = 0."""
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(4)


def test_max_prob_reads_the_best_foreground_class():
    # best foreground probability: A 0.7, B 0.3, C 0.1, D 0.45
    assert decide(policy="max_prob", threshold=0.6) == ([True, False, False, False], [False] * 4)
    # D leaves at 0.4 although background is its most likely class: max_prob looks at the classes only
    assert decide(policy="max_prob", threshold=0.4) == ([True, False, False, True], [False] * 4)


def test_entropy_and_margin_also_need_a_foreground_winner():
    # normalised entropy: A 0.678, B 0.948, C 0.235, D 0.617 (C and D: background is the most likely class)
    assert entropy(0.7, 0.1, 0.1, 0.1) == pytest.approx(0.678, abs=1e-3)
    assert entropy(0.1, 0.9) == pytest.approx(0.235, abs=1e-3)
    assert entropy(0.45, 0.05, 0.5) == pytest.approx(0.617, abs=1e-3)
    assert decide(policy="entropy", threshold=0.7) == ([True, False, False, False], [False] * 4)
    assert decide(policy="entropy", threshold=0.6) == ([False] * 4, [False] * 4)
    # top-1 minus top-2: A 0.6, B 0.0, C 0.8 (background first), D 0.05
    assert decide(policy="margin", threshold=0.5) == ([True, False, False, False], [False] * 4)


def test_background_drop_wins_over_leaving():
    # P(background): C 0.9 >= 0.85 is dropped; with max_prob 0.05 it would otherwise leave (best class 0.1)
    assert decide(policy="none", background_threshold=0.85) == ([False] * 4, [False, False, True, False])
    assert decide(policy="max_prob", threshold=0.05, background_threshold=0.85) == (
        [True, True, False, True], [False, False, True, False])


def test_pruned_rois_leave_and_are_kept():
    # best class below 0.35: B (0.3) and C (0.1) stop being refined; C is dropped as background first
    assert decide(policy="none", prune_threshold=0.35) == ([False, True, True, False], [False] * 4)
    assert decide(policy="none", prune_threshold=0.35, background_threshold=0.85) == (
        [False, True, False, False], [False, False, True, False])
    # a pruned RoI leaves whatever the policy says about it
    assert decide(policy="max_prob", threshold=0.6, prune_threshold=0.35) == ([True, True, True, False], [False] * 4)


def test_the_last_stage_and_a_passed_deadline_let_every_roi_leave():
    everything = dict(policy="max_prob", threshold=0.99, background_threshold=0.5, prune_threshold=0.2)
    assert decide(stage=2, num_stages=3, **everything) == ([True] * 4, [False] * 4)  # nothing dropped at the end
    # before the end: C (P(background) 0.9) and D (0.5) are dropped, C's pruning (0.1 < 0.2) loses to that
    assert decide(stage=0, num_stages=3, **everything) == ([False] * 4, [False, False, True, True])
    policy = RegionExitPolicy(EarlyExitConfig(**everything, time_budget_ms=1e9), 3)
    policy.start_clock()  # a budget of 11 days: not passed
    assert policy(0, PROBS)[0].tolist() == [False] * 4
    policy.deadline = 0.0  # passed
    leave, drop = policy(1, PROBS)
    assert leave.tolist() == [True] * 4 and drop.tolist() == [False] * 4


def test_counts_follow_the_decisions():
    policy = RegionExitPolicy(EarlyExitConfig(policy="max_prob", threshold=0.6, background_threshold=0.85), 3)
    policy(0, PROBS)  # A leaves, C is dropped
    policy(1, PROBS[[1, 3]])  # B and D: nobody passes 0.6
    policy(2, PROBS[[1, 3]])  # the last stage: both leave
    policy.count_masks(torch.tensor([0, 2, 2]))  # three detections: one from stage 0, two from stage 2
    assert policy.counts == StageCounts(3, rois=[4, 2, 2], exits=[1, 0, 2], dropped=[1, 0, 0], masks=[1, 0, 2])
    policy(0, PROBS)  # a new image: the counts so far go to the totals
    assert policy.total().rois == [8, 2, 2] and policy.counts.rois == [4, 0, 0]
    policy.reset()
    assert policy.total() == StageCounts(3)


def test_exit_summary_macs():
    counts = StageCounts(3, rois=[10, 6, 2], exits=[4, 4, 2], dropped=[0, 0, 0], masks=[3, 1, 2])
    box, mask = [100, 200, 300], [10, 20, 30]  # per RoI and stage
    summary = exit_summary(counts, box, mask)
    # boxes: 10*100 + 6*200 + 2*300 = 2800; masks from stages 0..t: 3*10 + 1*(10+20) + 2*(10+20+30) = 180
    # the full cascade: 10 RoIs through 600 + 6 masks through 60 = 6360
    assert summary["roi_head_gmacs"] == pytest.approx(2980 / 1e9)
    assert summary["full_cascade_gmacs"] == pytest.approx(6360 / 1e9)
    assert summary["saved_fraction"] == pytest.approx(1 - 2980 / 6360)
    assert (summary["rois"], summary["exits"], summary["masks"]) == ([10, 6, 2], [4, 4, 2], [3, 1, 2])
    no_masks = exit_summary(counts, box, [])  # Cascade R-CNN: boxes only
    assert no_masks["saved_fraction"] == pytest.approx(1 - 2800 / 6000)
    assert exit_summary(StageCounts(3), box, mask)["saved_fraction"] == 0.0  # nothing ran
