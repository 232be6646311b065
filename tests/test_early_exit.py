"""Early-exit cascades: costs, policies, execution, calibration, training losses and statistics.

Hand-computed numbers throughout; the end-to-end CLI run is in test_early_exit_cli.py.
"""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascadevision.early_exit import (EntropyPolicy, ExitGate, ExitModelConfig, ExitStatistics, GatePolicy,
                                      MarginPolicy, MaxProbPolicy, ModelCascade, MultiExitResNet, NoEarlyExit,
                                      PatiencePolicy, anytime, assign_exits, calibrate_for_accuracy,
                                      calibrate_for_budget, compact, confidence_gate_weights, decide_exits,
                                      exit_decision, exits_config, geometric_exit_distribution, multi_exit_loss,
                                      plot_accuracy_vs_compute, quantile_thresholds, run_full, sdn_weights,
                                      simulate, softmax_entropy, softmax_margin, subset_loss, summarize_exits,
                                      train_gates, train_multi_exit)
from cascadevision.early_exit.calibration import Calibration, budget_sweep
from cascadevision.early_exit.data import load_digits_splits
from cascadevision.early_exit.config import ExitDataConfig, ExitTrainConfig
from cascadevision.early_exit.models import ResNetClassifier
from cascadevision.errors import ConfigError
from cascadevision.macs import count_macs


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_resnet(num_stages=3, base_width=4, seed=0):
    torch.manual_seed(seed)
    return MultiExitResNet(ExitModelConfig(num_stages=num_stages, base_width=base_width)).eval()


# ----------------------------------------------------------------------------------------------------------
# costs


def test_mac_counter_matches_a_hand_count_of_a_conv():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.zeros(1, 3, 9, 9)  # output 5x5
    assert count_macs(conv, x) == 5 * 3 * 3 * 3 * 5 * 5


def test_stage_costs_of_the_multi_exit_resnet_match_hand_counts():
    model = tiny_resnet(num_stages=2, base_width=4)  # widths 4, 8; exits pool to 4x4
    costs = model.stage_costs(torch.zeros(1, 1, 8, 8))
    stem = 4 * 1 * 9 * 64  # 3x3 conv 1->4 at 8x8
    block0 = 2 * (4 * 4 * 9 * 64)  # two 3x3 convs 4->4 at 8x8
    block1 = 8 * 4 * 9 * 16 + 8 * 8 * 9 * 16 + 8 * 4 * 16  # stride-2 conv 4->8, conv 8->8, 1x1 projection, at 4x4
    assert costs.body == [stem + block0, block1]
    assert costs.head == [4 * 16 * 10, 8 * 16 * 10]  # linear layers on 4x4-pooled maps
    assert costs.cumulative == [stem + block0 + 640, stem + block0 + 640 + block1 + 1280]
    assert costs.full == stem + block0 + block1 + 1280  # no intermediate head in the plain model


def test_a_cascade_of_models_costs_the_members_it_runs():
    torch.manual_seed(0)
    small, large = ResNetClassifier(1, 10, 4), ResNetClassifier(1, 10, 8)
    cascade = ModelCascade([small, large]).eval()
    x = torch.zeros(1, 1, 8, 8)
    costs = cascade.stage_costs(x)
    assert costs.body == [0, 0]
    assert costs.head == [count_macs(small, x), count_macs(large, x)]
    assert costs.full == count_macs(large, x)  # the baseline is the large model alone
    assert torch.allclose(cascade(x)[1], large(x))


# ----------------------------------------------------------------------------------------------------------
# policies


def probs_to_logits(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_entropy_margin_and_max_probability_by_hand():
    logits = probs_to_logits([0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3])
    expected_h = 1.5 * math.log(2)  # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25)
    assert softmax_entropy(logits, normalized=False)[0].item() == pytest.approx(expected_h)
    assert softmax_entropy(logits)[0].item() == pytest.approx(expected_h / math.log(3))
    assert softmax_entropy(logits)[1].item() == pytest.approx(1.0)  # uniform: the maximum
    assert softmax_margin(logits).tolist() == pytest.approx([0.25, 0.0], abs=1e-6)
    assert MaxProbPolicy(0.5).exit_mask(logits, 0).tolist() == [True, False]
    assert MarginPolicy(0.2).exit_mask(logits, 0).tolist() == [True, False]
    # exit when H / log C <= T: 0.946 passes T = 0.95, the uniform row does not
    assert EntropyPolicy(0.95).exit_mask(logits, 0).tolist() == [True, False]
    assert EntropyPolicy(0.9).exit_mask(logits, 0).tolist() == [False, False]


def test_per_exit_thresholds_and_the_last_exit_always_accepts():
    logits = probs_to_logits([0.6, 0.4], [0.9, 0.1])
    policy = MaxProbPolicy([0.95, 0.55, 2.0])  # exit 0 strict, exit 1 loose
    assert policy.exit_mask(logits, 0).tolist() == [False, False]
    assert policy.exit_mask(logits, 1).tolist() == [True, True]
    closed = MaxProbPolicy(math.inf)
    assert exit_decision(closed, logits, 1, num_stages=3).tolist() == [False, False]
    assert exit_decision(closed, logits, 2, num_stages=3).tolist() == [True, True]


def test_patience_exits_after_k_agreeing_exits_in_a_row():
    # predictions per exit for four samples: (exit0, exit1, exit2, exit3)
    predictions = [(1, 1, 2, 2), (1, 2, 1, 2), (3, 3, 3, 3), (0, 4, 4, 4)]
    all_logits = [F.one_hot(torch.tensor([p[k] for p in predictions]), 5).float() * 5 for k in range(4)]
    assert decide_exits(PatiencePolicy(2), all_logits).tolist() == [1, 3, 1, 2]
    assert decide_exits(PatiencePolicy(3), all_logits).tolist() == [3, 3, 2, 3]
    assert decide_exits(PatiencePolicy(1), all_logits).tolist() == [0, 0, 0, 0]


def constant_gate(p_right: float, p_later: float) -> ExitGate:
    """A gate whose outputs ignore the input: sigmoid^-1 of the given probabilities."""
    gate = ExitGate(feature_dim=0, hidden=4)
    last = gate.mlp[-1]
    nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([math.log(p_right / (1 - p_right)), math.log(p_later / (1 - p_later))]))
    return gate


def test_gate_policy_thresholds_and_pruner():
    logits = torch.randn(6, 10)
    gates = [constant_gate(0.7, 0.2), constant_gate(0.7, 0.6)]
    assert GatePolicy(gates, 0.8).exit_mask(logits, 0).sum() == 0
    assert GatePolicy(gates, 0.6).exit_mask(logits, 0).all()
    # the pruner stops inputs that no later exit is expected to get right (0.2 < 0.3), not the others
    pruner = GatePolicy(gates, 0.8, prune_threshold=0.3)
    assert pruner.exit_mask(logits, 0).all() and not pruner.exit_mask(logits, 1).any()
    assert pruner.decision_macs(0) == (3 + 2) * 4 + 4 * 2  # the MLP's two linear layers


def test_trained_gate_separates_right_from_wrong_answers():
    # exit 0 is right exactly when its top probability is high; exit 1 is always right
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (400,))
    sharp = torch.rand(400) > 0.5
    scale = torch.where(sharp, 6.0, 0.3)[:, None]
    wrong = (labels + 1) % 5
    target_class = torch.where(sharp, labels, wrong)
    exit0 = F.one_hot(target_class, 5).float() * scale + 0.1 * torch.randn(400, 5)
    exit1 = F.one_hot(labels, 5).float() * 6
    gates = train_gates([exit0, exit1], None, labels, epochs=150)
    p = torch.sigmoid(gates[0](exit0))
    assert p[sharp, 0].min() > 0.8 and p[~sharp, 0].max() < 0.2  # "right now" follows the confidence
    assert p[:, 1].min() > 0.8  # a later exit is always right


# ----------------------------------------------------------------------------------------------------------
# execution


@pytest.fixture(scope="module")
def trained_model():
    """A tiny 3-exit model trained for two epochs on 8x8 digits: its exits disagree often enough to be useful."""
    data = load_digits_splits(ExitDataConfig(image_size=8))
    model = tiny_resnet(num_stages=3, base_width=4)
    train_multi_exit(model.train(), data["train"].images, data["train"].labels, ExitTrainConfig(epochs=2, shift=0),
                     [0.3, 0.6, 1.0], log=None)
    return model.eval(), data["val"]


@torch.no_grad()
def median_thresholds(model, x, policy):
    """Per-exit thresholds halfway between two neighbouring confidences, so about half of the samples leave
    at every exit and no sample sits on a threshold (where float noise could flip it)."""
    all_logits, features = model.forward_with_features(x, features=True)
    thresholds = []
    for k in range(model.num_stages - 1):
        s = policy.confidence(all_logits[k], k, features[k]).sort().values
        mid = len(s) // 2
        thresholds.append(policy.to_score(float((s[mid - 1] + s[mid]) / 2)))  # back to the policy's units
    return policy.with_thresholds(thresholds + [0.0])


@pytest.mark.parametrize("policy_kind", ["max_prob", "entropy", "patience", "gate"])
def test_compact_gives_simulate_answers_in_input_order(trained_model, policy_kind):
    model, val = trained_model
    x = val.images[:64]
    if policy_kind == "max_prob":
        policy = median_thresholds(model, x, MaxProbPolicy(0.0))
    elif policy_kind == "entropy":
        policy = median_thresholds(model, x, EntropyPolicy(0.0))
    elif policy_kind == "patience":
        policy = PatiencePolicy(2)
    else:
        with torch.no_grad():
            logits, feats = model.forward_with_features(val.images[64:], features=True)
        gates = train_gates(logits, feats, val.labels[64:], epochs=30)
        policy = median_thresholds(model, x, GatePolicy(gates, 0.5, prune_threshold=0.1))
    reference = simulate(model, x, policy)
    result = compact(model, x, policy)
    counts = result.exit_counts()
    assert sum(counts) == 64 and counts[1] > 0 and counts[2] > 0  # samples really leave at different exits
    assert torch.equal(result.exit_stage, reference.exit_stage)
    assert torch.allclose(result.logits, reference.logits, atol=1e-5)
    # the answering exit's logits, in input order
    for i in range(len(x)):
        assert torch.allclose(result.logits[i], reference.all_logits[int(result.exit_stage[i])][i], atol=1e-5)
    assert result.stage_batch_sizes[0] == 64
    for k in range(1, len(result.stage_batch_sizes)):  # only the survivors go on
        assert result.stage_batch_sizes[k] == result.stage_batch_sizes[k - 1] - counts[k - 1]
    # batch size 1 gives the same answers, one at a time
    singles = [compact(model, x[i:i + 1], policy) for i in range(len(x))]
    assert torch.equal(torch.cat([r.exit_stage for r in singles]), reference.exit_stage)
    assert torch.allclose(torch.cat([r.logits for r in singles]), reference.logits, atol=1e-5)
    # and chunked batches too
    assert torch.equal(compact(model, x, policy, batch_size=10).exit_stage, reference.exit_stage)


def test_compact_without_early_exit_is_the_full_model():
    model = tiny_resnet()
    x = torch.randn(5, 1, 8, 8)
    result = compact(model, x, NoEarlyExit())
    assert torch.allclose(result.logits, run_full(model, x))
    assert result.exit_stage.tolist() == [2] * 5


class FakeClock:
    """Time that advances only when a stage runs: stage k takes `stage_ms[k]` milliseconds."""

    def __init__(self, model, stage_ms):
        self.now = 0.0
        for k, stage in enumerate(model.stages):
            stage.register_forward_hook(lambda *args, k=k: self.advance(stage_ms[k]))

    def advance(self, ms):
        self.now += ms / 1e3

    def __call__(self):
        return self.now


def test_anytime_stops_when_the_budget_runs_out():
    model = tiny_resnet(num_stages=4)
    x = torch.randn(8, 1, 8, 8)
    clock = FakeClock(model, [3.0, 3.0, 3.0, 3.0])
    # 3 ms per stage, budget 7 ms: after two stages (6 ms) a third would overrun (9 ms), so it stops
    assert anytime(model, x, 7.0, clock=clock).stages_run == 2
    # without the look-ahead it starts the third and stops only once 9 ms >= 7 ms have passed
    assert anytime(model, x, 7.0, clock=clock, stop_before_overrun=False).stages_run == 3
    assert anytime(model, x, 100.0, clock=clock).stages_run == 4
    assert anytime(model, x, 0.0, clock=clock).stages_run == 1  # there is always an answer


def test_anytime_answers_most_confident_ensemble_or_last():
    model = tiny_resnet(num_stages=4)
    x = torch.randn(16, 1, 8, 8)
    all_logits = model(x)
    clock = FakeClock(model, [1.0] * 4)
    confident = anytime(model, x, 3.5, answer="confident", clock=clock)  # three stages fit
    assert confident.stages_run == 3
    probs = torch.stack([F.softmax(z, -1) for z in all_logits[:3]])  # (3, N, C)
    best = probs.max(-1).values.argmax(0)
    assert torch.equal(confident.exit_stage, best)
    assert torch.allclose(confident.logits, torch.stack(all_logits[:3])[best, torch.arange(16)], atol=1e-5)
    ensemble = anytime(model, x, 3.5, answer="ensemble", clock=clock)
    assert torch.allclose(F.softmax(ensemble.logits, -1), probs.mean(0), atol=1e-5)
    last = anytime(model, x, 3.5, answer="last", clock=clock)
    assert torch.allclose(last.logits, all_logits[2], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# calibration


def constructed_case():
    """Four samples, three exits costing 1, 2, 4 MACs cumulatively (see the test for the hand analysis)."""
    scores = torch.tensor([[0.9, 0.8, 0.6, 0.3],
                           [0.9, 0.9, 0.7, 0.4],
                           [1.0, 1.0, 1.0, 1.0]])
    correct = torch.tensor([[1, 1, 0, 0],
                            [1, 1, 1, 0],
                            [1, 1, 1, 1]], dtype=torch.bool)
    return scores, correct, [1.0, 2.0, 4.0]


def test_calibration_picks_the_cheapest_thresholds_that_meet_the_target():
    scores, correct, costs = constructed_case()
    # accuracy 1.0: samples 0, 1 leave at exit 0 (t0 = 0.8, sample 2 would be wrong there), sample 2 at exit 1
    # (t1 = 0.7), sample 3 must reach exit 2: cost (1 + 1 + 2 + 4) / 4 = 2
    thresholds, summary, met = calibrate_for_accuracy(scores, correct, costs, 1.0)
    assert met and thresholds == pytest.approx([0.8, 0.7])
    assert summary["macs"] == pytest.approx(2.0) and summary["accuracy"] == 1.0
    assert summary["fractions"] == pytest.approx([0.5, 0.25, 0.25])
    # accuracy 0.75: cheapest is t0 = 0.8, t1 = 0.4 (sample 3 leaves wrong at exit 1): (1 + 1 + 2 + 2) / 4
    thresholds, summary, met = calibrate_for_accuracy(scores, correct, costs, 0.75)
    assert met and thresholds == pytest.approx([0.8, 0.4]) and summary["macs"] == pytest.approx(1.5)
    # an impossible target: the most accurate setting comes back, flagged
    _, summary, met = calibrate_for_accuracy(scores, correct, costs, 1.01)
    assert not met and summary["accuracy"] == 1.0 and summary["macs"] == pytest.approx(2.0)


def test_assign_exits_and_summary_by_hand():
    scores, correct, costs = constructed_case()
    exit_stage = assign_exits(scores, [0.85, 0.5])
    assert exit_stage.tolist() == [0, 1, 1, 2]
    summary = summarize_exits(exit_stage, correct, costs)
    assert summary == {"accuracy": 1.0, "macs": pytest.approx((1 + 2 + 2 + 4) / 4), "fractions": [0.25, 0.5, 0.25]}
    forced = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert assign_exits(scores, [0.85, 0.5], forced).tolist() == [0, 1, 1, 0]


def test_geometric_exit_distribution_by_hand():
    assert geometric_exit_distribution(0.5, 3).tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert geometric_exit_distribution(1.0, 4).tolist() == pytest.approx([0.25] * 4)
    assert geometric_exit_distribution(2.0, 2).tolist() == pytest.approx([1 / 3, 2 / 3])


def test_quantile_thresholds_follow_msdnet():
    # 7 samples, pi = (4/7, 2/7, 1/7): 4 leave at exit 0, 2 of the remaining 3 at exit 1, 1 at exit 2
    scores = torch.tensor([[0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.1],
                           [0.5, 0.9, 0.5, 0.5, 0.4, 0.5, 0.7],
                           [1.0] * 7])
    thresholds = quantile_thresholds(scores, geometric_exit_distribution(0.5, 3))
    assert thresholds == pytest.approx([0.6, 0.7])  # 4th best at exit 0; 2nd best of {0.9, 0.4, 0.7} at exit 1
    assert assign_exits(scores, thresholds).tolist() == [0, 1, 0, 0, 2, 0, 1]
    # a zero quota closes the exit
    assert quantile_thresholds(scores, [0.1, 0.5, 0.4])[0] == math.inf


def test_budget_calibration_takes_the_most_accurate_setting_within_budget():
    torch.manual_seed(0)
    scores = torch.rand(3, 200)
    correct = torch.rand(3, 200) < torch.stack([scores[0], scores[1] * 0.5 + 0.5, torch.full((200,), 0.95)])
    costs = [1.0, 2.0, 3.0]
    thresholds, summary, met = calibrate_for_budget(scores, correct, costs, budget_macs=1.8)
    points = budget_sweep(scores, correct, costs)
    fitting = [p for p in points if p["macs"] <= 1.8]
    assert met and summary["macs"] <= 1.8
    assert summary["accuracy"] == max(p["accuracy"] for p in fitting)
    assert summarize_exits(assign_exits(scores, thresholds), correct, costs)["macs"] == pytest.approx(summary["macs"])
    _, summary, met = calibrate_for_budget(scores, correct, costs, budget_macs=0.5)
    assert not met and summary["macs"] == min(p["macs"] for p in points)


def test_calibration_json_round_trip_keeps_closed_exits():
    cal = Calibration("max_prob", [0.9, math.inf], 0.98, 10.0, 20.0, [0.5, 0.0, 0.5], {"accuracy": 0.97})
    data = json.loads(json.dumps(cal.to_dict()))
    assert data["thresholds"] == [0.9, None] and data["compute_saved"] == 0.5
    assert Calibration.from_dict(data).thresholds == [0.9, math.inf]


# ----------------------------------------------------------------------------------------------------------
# training losses


def test_sdn_schedule_by_hand():
    fractions = [0.15, 0.30, 1.0]
    assert sdn_weights(5, 10, fractions) == pytest.approx([0.01 + 0.075, 0.01 + 0.15, 1.0])
    assert sdn_weights(10, 10, fractions) == pytest.approx([0.15, 0.30, 1.0])  # capped at C_k
    assert sdn_weights(0, 10, fractions) == pytest.approx([0.01, 0.01, 1.0])


def test_confidence_gated_weights_by_hand():
    labels = torch.tensor([0, 0])
    # true-class probabilities: sample 0 (0.95, 0.5, .), sample 1 (0.2, 0.6, .)
    all_logits = [probs_to_logits([0.95, 0.05], [0.2, 0.8]).float(),
                  probs_to_logits([0.5, 0.5], [0.6, 0.4]).float(),
                  probs_to_logits([0.5, 0.5], [0.5, 0.5]).float()]
    hard = confidence_gate_weights(all_logits, labels, "hard", threshold=0.9)
    assert hard.T.tolist() == [[1, 0, 0], [1, 1, 1]]  # exit 0 got sample 0 (0.95 >= 0.9): deeper exits skip it
    soft = confidence_gate_weights(all_logits, labels, "soft")
    assert soft.T.tolist() == [pytest.approx([1, 0.05, 0.025]), pytest.approx([1, 0.8, 0.32])]
    # the loss is (1/N) sum_i sum_k w_k lambda_k CE_k
    weights = [1.0, 0.5, 2.0]
    ce = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in all_logits])
    expected = sum(weights[k] * soft[k, i] * ce[k, i] for k in range(3) for i in range(2)) / 2
    got = multi_exit_loss(all_logits, labels, weights, gating="soft")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_subset_loss_equals_explicit_enumeration():
    torch.manual_seed(0)
    all_logits = [torch.randn(6, 4) for _ in range(4)]
    labels = torch.randint(0, 4, (6,))
    explicit = sum(F.cross_entropy(sum(all_logits[k] for k in subset), labels)
                   for r in range(1, 5) for subset in itertools.combinations(range(4), r))
    assert subset_loss(all_logits, labels).item() == pytest.approx(explicit.item(), rel=1e-5)
    assert len(list(itertools.chain.from_iterable(itertools.combinations(range(4), r) for r in range(1, 5)))) == 15


def test_fixed_weight_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    all_logits = [torch.randn(5, 3) for _ in range(2)]
    labels = torch.randint(0, 3, (5,))
    expected = F.cross_entropy(all_logits[0], labels) + 0.3 * F.cross_entropy(all_logits[1], labels)
    assert multi_exit_loss(all_logits, labels, [1.0, 0.3]).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss,gating", [("fixed", "hard"), ("fixed", "soft"), ("sdn", "none"), ("subsets", "none")])
def test_every_training_mode_runs_and_learns(trained_model, loss, gating):
    _, val = trained_model  # a small labelled set is enough here
    model = tiny_resnet(num_stages=3, base_width=4)
    cfg = ExitTrainConfig(epochs=3, batch_size=32, loss=loss, gating=gating, shift=1)
    history = train_multi_exit(model, val.images, val.labels, cfg, [0.3, 0.6, 1.0], log=None)
    assert history[-1]["train_accuracy"][-1] > history[0]["train_accuracy"][-1] + 0.1
    if loss == "sdn":  # the loss itself can rise while the internal exits' weights grow
        assert [h["weights"] for h in history] == [sdn_weights(e, 3, [0.3, 0.6, 1.0]) for e in range(3)]
    assert not model.training  # handed back in eval mode, ready for early exit


def test_subsets_and_gating_do_not_combine():
    with pytest.raises(ConfigError, match="subsets"):
        multi_exit_loss([torch.randn(2, 3)] * 2, torch.tensor([0, 1]), [1, 1], loss="subsets", gating="hard")


# ----------------------------------------------------------------------------------------------------------
# statistics


def test_statistics_arithmetic_by_hand(tmp_path):
    exit_stage = torch.tensor([0] * 6 + [1] * 3 + [2])
    correct = torch.tensor([1] * 6 + [1, 1, 0] + [1], dtype=torch.bool)
    stats = ExitStatistics.from_exits(exit_stage, [10, 25, 40], 36, correct, full_accuracy=0.95)
    assert stats.counts == [6, 3, 1] and stats.correct == [6, 2, 1]
    assert stats.fractions == pytest.approx([0.6, 0.3, 0.1])
    assert stats.stage_accuracy == pytest.approx([1.0, 2 / 3, 1.0])
    assert stats.accuracy == pytest.approx(0.9)
    assert stats.average_depth == pytest.approx((6 * 1 + 3 * 2 + 1 * 3) / 10)
    assert stats.average_macs == pytest.approx((6 * 10 + 3 * 25 + 40) / 10)
    assert stats.compute_saved == pytest.approx(1 - 17.5 / 36)
    table = stats.table()
    assert "| 2 | 3 | 30.0% | 66.67% | 0.000 |" in table and "compute saved 51.4%" in table
    assert "drop +5.00 pt" in table
    saved = json.loads(stats.save_json(tmp_path / "stats.json").read_text())
    assert saved["average_depth"] == pytest.approx(1.5) and saved["counts"] == [6, 3, 1]
    png = plot_accuracy_vs_compute(tmp_path / "curve.png", {"sweep": [(10, 0.8), (20, 0.9), (36, 0.95)]}, 36,
                                   operating_point=(17.5, 0.9), exit_points=[(10, 0.8)], full_accuracy=0.95)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_statistics_without_correctness_for_rois():
    stats = ExitStatistics(counts=[300, 100], cumulative_macs=[1e6, 3e6], full_macs=2.5e6)
    assert stats.accuracy is None and stats.stage_accuracy == [None, None]
    assert stats.average_macs == pytest.approx(1.5e6) and stats.compute_saved == pytest.approx(0.4)
    assert "| 1 | 300 | 75.0% | - |" in stats.table()


# ----------------------------------------------------------------------------------------------------------
# data and presets


def test_digit_splits_are_fixed_disjoint_and_stratified():
    clean = load_digits_splits(ExitDataConfig(image_size=8))
    assert sum(len(s) for s in clean.values()) == 1797
    ids = [set(s.indices.tolist()) for s in clean.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    for name in ("val", "test"):
        counts = torch.bincount(clean[name].labels, minlength=10)
        assert counts.min() >= 34 and counts.max() <= 38  # about 20 % of each class's ~180
    again = load_digits_splits(ExitDataConfig(image_size=8))
    assert torch.equal(again["test"].indices, clean["test"].indices)
    hard = load_digits_splits(ExitDataConfig(dataset="digits_hard", image_size=16))
    assert hard["train"].images.shape[1:] == (1, 16, 16)
    assert torch.equal(hard["test"].labels, clean["test"].labels)
    assert torch.equal(hard["test"].images, load_digits_splits(ExitDataConfig(dataset="digits_hard", image_size=16))
                       ["test"].images)


def test_presets_and_overrides():
    mobile = exits_config("mobile")
    assert mobile.model.num_stages == 2 and mobile.early_exit.threshold == 0.85
    cloud = exits_config("cloud")
    assert cloud.model.num_stages == 4 and cloud.early_exit.threshold == 0.95
    assert exits_config("batch").early_exit.policy == "none"
    assert exits_config("mobile", ["early_exit.threshold=0.9", "model.num_stages=3"]).model.num_stages == 3
    with pytest.raises(ConfigError, match="early_exit.treshold"):
        exits_config("mobile", ["early_exit.treshold=0.9"])
    with pytest.raises(ConfigError, match="unknown early-exit preset"):
        exits_config("laptop")
