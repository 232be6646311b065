"""Choosing per-exit thresholds on a held-out split.

Everything here works on precomputed numbers, so one pass of the model over the calibration split is enough:

- `scores` (K, N): each exit's confidence for each sample (higher = surer; `policy.confidence`);
- `correct` (K, N): whether each exit's answer is right;
- `cumulative_macs` (K,): the cost of a sample that leaves at exit k.

A sample leaves at the first exit k < K-1 with `scores[k] >= t_k` (or that a gate's pruner forces), else at
the last exit. Two ways to pick the t_k:

(a) `calibrate_for_accuracy`: the cheapest thresholds whose accuracy reaches a target (BranchyNet's screening,
    SDN's grid). Each exit's candidates are quantiles of its own scores plus +inf (exit closed), and every
    combination is evaluated exactly (the grid is thinned so at most `max_combinations` are tried).
(b) `calibrate_for_budget`: MSDNet's budgeted batch classification. A geometric exit distribution
    pi_k ~ p^k (k = 1..K) fixes how many samples leave at each exit; t_k is the confidence of the
    floor(n * pi_k)-th most confident sample still there (`quantile_thresholds`). Sweeping p over
    0.05, 0.10, ..., 1.95 traces the curve; the most accurate p whose cost fits the budget wins.

The planned numbers are the calibration split's; report the realised ones on the test split (`stats.py`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError
from .policies import ExitPolicy, ThresholdPolicy, decide_exits


# ----------------------------------------------------------------------------------------------------------
# exact accounting of one threshold setting


def assign_exits(scores: Tensor, score_thresholds: Sequence[float] | Tensor, forced: Tensor | None = None) -> Tensor:
    """Exit index (N,) of each sample: the first k < K-1 with scores[k] >= t_k (or forced[k]), else K-1."""
    num_stages, n = scores.shape
    thresholds = torch.as_tensor(score_thresholds, dtype=scores.dtype)[: num_stages - 1]
    leaves = scores[:-1] >= thresholds[:, None]  # (K-1, N)
    if forced is not None:
        leaves |= forced[:-1]
    leaves = torch.cat([leaves, torch.ones(1, n, dtype=torch.bool)])
    return leaves.int().argmax(0)  # first True


def summarize_exits(exit_stage: Tensor, correct: Tensor, cumulative_macs: Sequence[float]) -> dict:
    """Accuracy, average MACs and the fraction leaving at each exit, for a given assignment of exits."""
    num_stages, n = correct.shape
    counts = torch.bincount(exit_stage, minlength=num_stages).double()
    right = correct[exit_stage, torch.arange(n)].double().sum()
    costs = torch.as_tensor(cumulative_macs, dtype=torch.float64)
    return {"accuracy": float(right / n), "macs": float((counts * costs).sum() / n),
            "fractions": (counts / n).tolist()}


# ----------------------------------------------------------------------------------------------------------
# (a) target accuracy


def _candidates(stage_scores: Tensor, count: int) -> Tensor:
    """Up to `count` thresholds for one exit: scores at evenly spaced ranks (actual values, so a threshold
    separates samples exactly), plus +inf (nobody leaves here)."""
    values = stage_scores.unique()  # sorted
    if values.numel() > count - 1:
        ranks = torch.linspace(0, values.numel() - 1, max(count - 1, 1)).round().long()
        values = values[ranks.unique()]
    return torch.cat([values, values.new_tensor([math.inf])])


def search_thresholds(scores: Tensor, correct: Tensor, cumulative_macs: Sequence[float],
                      candidates: int = 24, forced: Tensor | None = None,
                      max_combinations: int = 50_000) -> tuple[Tensor, Tensor, Tensor]:
    """Every combination of per-exit candidate thresholds, evaluated exactly.

    Returns (thresholds (M, K-1), accuracy (M,), average MACs (M,)) over the M combinations.
    """
    num_stages, n = scores.shape
    if num_stages == 1:
        acc = correct[0].double().mean()
        return scores.new_zeros(1, 0), acc[None], torch.tensor([float(cumulative_macs[0])], dtype=torch.float64)
    per_stage = max(2, min(candidates, int(max_combinations ** (1.0 / (num_stages - 1)))))
    costs = torch.as_tensor(cumulative_macs, dtype=torch.float64)
    alive = torch.ones(1, n, dtype=torch.bool)  # (M, N): samples not yet decided, per partial combination
    right = torch.zeros(1, dtype=torch.float64)
    spent = torch.zeros(1, dtype=torch.float64)
    chosen = scores.new_zeros(1, 0)
    for k in range(num_stages - 1):
        cand = _candidates(scores[k], per_stage)  # (G,)
        leaves = scores[k][None, :] >= cand[:, None]  # (G, N)
        if forced is not None:
            leaves |= forced[k][None, :]
        leaving = alive[:, None, :] & leaves[None]  # (M, G, N)
        right = (right[:, None] + (leaving & correct[k]).sum(-1)).flatten()
        spent = (spent[:, None] + leaving.sum(-1) * costs[k]).flatten()
        alive = (alive[:, None, :] & ~leaves[None]).flatten(0, 1)
        m, g = chosen.shape[0], cand.numel()
        chosen = torch.cat([chosen.repeat_interleave(g, 0), cand.repeat(m)[:, None]], dim=1)
    right += (alive & correct[-1]).sum(-1)
    spent += alive.sum(-1) * costs[-1]
    return chosen, right / n, spent / n


@dataclass
class Calibration:
    """A calibrated threshold setting and what it promised on the calibration split."""
    policy: str  # e.g. "max_prob"
    thresholds: list[float]  # per exit except the last, in the policy's units; +-inf = exit closed
    accuracy: float  # planned (calibration split)
    macs: float  # planned average MACs per sample
    full_macs: float  # the model without early exits
    fractions: list[float]  # planned fraction leaving at each exit
    target: dict = field(default_factory=dict)  # {"accuracy": a} or {"macs": b}, and how it was set
    met: bool = True  # False when no setting reached the target (the closest one is returned)
    method: str = ""  # "search" (target accuracy) or "geometric p=..." (budget)
    params: dict = field(default_factory=dict)  # other policy settings chosen (e.g. {"patience": 3})

    @property
    def compute_saved(self) -> float:
        return 1.0 - self.macs / self.full_macs

    def to_dict(self) -> dict:
        out = asdict(self)
        out["thresholds"] = [None if math.isinf(t) else t for t in self.thresholds]  # JSON has no inf
        out["compute_saved"] = self.compute_saved
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        closed = -math.inf if data.get("policy") == "entropy" else math.inf
        values["thresholds"] = [closed if t is None else float(t) for t in data["thresholds"]]
        return cls(**values)


def calibrate_for_accuracy(scores: Tensor, correct: Tensor, cumulative_macs: Sequence[float],
                           target_accuracy: float, forced: Tensor | None = None, candidates: int = 24,
                           max_combinations: int = 50_000) -> tuple[list[float], dict, bool]:
    """The cheapest thresholds (score units) whose accuracy on this split is at least `target_accuracy`.

    Ties in cost go to the more accurate setting. If no setting reaches the target, the most accurate one is
    returned with met=False. Returns (thresholds for exits 0..K-2, summary dict, met).
    """
    chosen, acc, macs = search_thresholds(scores, correct, cumulative_macs, candidates, forced, max_combinations)
    ok = acc >= target_accuracy - 1e-12
    met = bool(ok.any())
    if met:
        cost = torch.where(ok, macs, torch.full_like(macs, math.inf))
        best_cost = cost.min()
        tied = (cost <= best_cost * (1 + 1e-12)) & ok
        i = int(torch.where(tied, acc, torch.full_like(acc, -1.0)).argmax())
    else:
        best_acc = acc.max()
        tied = acc >= best_acc - 1e-12
        i = int(torch.where(tied, macs, torch.full_like(macs, math.inf)).argmin())
    thresholds = chosen[i].tolist()
    summary = summarize_exits(assign_exits(scores, thresholds, forced), correct, cumulative_macs)
    return thresholds, summary, met


# ----------------------------------------------------------------------------------------------------------
# (b) compute budget (MSDNet)


def geometric_exit_distribution(p: float, num_stages: int) -> Tensor:
    """pi_k proportional to p**k for k = 1..K, normalised (MSDNet's budgeted-batch family)."""
    powers = torch.tensor([p ** k for k in range(1, num_stages + 1)], dtype=torch.float64)
    return powers / powers.sum()


def quantile_thresholds(scores: Tensor, distribution: Sequence[float] | Tensor,
                        forced: Tensor | None = None) -> list[float]:
    """Thresholds (score units, exits 0..K-2) that make floor(n * pi_k) samples leave at exit k.

    Exit by exit, among the samples not yet gone, t_k is the confidence of the floor(n * pi_k)-th most
    confident one (if fewer are left, the least confident of them); every sample still there with
    scores[k] >= t_k then leaves. floor(n * pi_k) = 0 closes the exit (t_k = +inf).
    """
    num_stages, n = scores.shape
    distribution = torch.as_tensor(distribution, dtype=torch.float64)
    gone = torch.zeros(n, dtype=torch.bool)
    thresholds = []
    for k in range(num_stages - 1):
        quota = int(math.floor(n * float(distribution[k]) + 1e-9))
        remaining = scores[k][~gone]
        if quota == 0 or remaining.numel() == 0:
            t = math.inf
        else:
            ordered = remaining.sort(descending=True).values
            t = float(ordered[min(quota, ordered.numel()) - 1])
        thresholds.append(t)
        gone |= scores[k] >= t
        if forced is not None:
            gone |= forced[k]
    return thresholds


DEFAULT_PS = tuple(round(0.05 * i, 2) for i in range(1, 40))  # 0.05 .. 1.95, MSDNet's sweep


def budget_sweep(scores: Tensor, correct: Tensor, cumulative_macs: Sequence[float],
                 ps: Sequence[float] = DEFAULT_PS, forced: Tensor | None = None) -> list[dict]:
    """One point per p: {'p', 'thresholds', 'accuracy', 'macs', 'fractions'} on this split."""
    points = []
    for p in ps:
        thresholds = quantile_thresholds(scores, geometric_exit_distribution(p, scores.shape[0]), forced)
        summary = summarize_exits(assign_exits(scores, thresholds, forced), correct, cumulative_macs)
        points.append({"p": p, "thresholds": thresholds, **summary})
    return points


def calibrate_for_budget(scores: Tensor, correct: Tensor, cumulative_macs: Sequence[float], budget_macs: float,
                         ps: Sequence[float] = DEFAULT_PS, forced: Tensor | None = None
                         ) -> tuple[list[float], dict, bool]:
    """The most accurate geometric setting whose average cost is within `budget_macs` (ties: the cheaper).

    If none fits, the cheapest is returned with met=False. Returns (thresholds, summary with 'p', met).
    """
    points = budget_sweep(scores, correct, cumulative_macs, ps, forced)
    fitting = [pt for pt in points if pt["macs"] <= budget_macs * (1 + 1e-12)]
    met = bool(fitting)
    if met:
        best = max(fitting, key=lambda pt: (pt["accuracy"], -pt["macs"]))
    else:
        best = min(points, key=lambda pt: pt["macs"])
    summary = {k: v for k, v in best.items() if k != "thresholds"}
    return best["thresholds"], summary, met


# ----------------------------------------------------------------------------------------------------------
# the policy-level entry point


def calibrate(policy: ThresholdPolicy, policy_name: str, scores: Tensor, correct: Tensor,
              cumulative_macs: Sequence[float], full_macs: float, *, target_accuracy: float | None = None,
              max_drop: float | None = None, budget_macs: float | None = None, forced: Tensor | None = None,
              candidates: int = 24) -> tuple[ThresholdPolicy, Calibration]:
    """Calibrate `policy` on precomputed scores; returns the policy with its new thresholds and the plan.

    Give exactly one of `target_accuracy` (e.g. 0.97), `max_drop` (accuracy points below the last exit's
    accuracy on this split, e.g. 0.5 for half a point) or `budget_macs` (average MACs per sample).
    """
    given = [v is not None for v in (target_accuracy, max_drop, budget_macs)]
    if sum(given) != 1:
        raise ConfigError("calibrate needs exactly one of a target accuracy, a maximum drop or a compute budget")
    if not isinstance(policy, ThresholdPolicy):
        raise ConfigError(f"only threshold policies can be calibrated, not {policy.describe()}")
    full_accuracy = float(correct[-1].double().mean())
    if budget_macs is not None:
        thresholds, summary, met = calibrate_for_budget(scores, correct, cumulative_macs, budget_macs, forced=forced)
        target = {"macs": float(budget_macs), "fraction_of_full": float(budget_macs) / full_macs}
        method = f"geometric p={summary['p']}"
    else:
        if max_drop is not None:
            target_accuracy = full_accuracy - max_drop / 100.0
        thresholds, summary, met = calibrate_for_accuracy(scores, correct, cumulative_macs, target_accuracy,
                                                          forced=forced, candidates=candidates)
        target = {"accuracy": float(target_accuracy)}
        if max_drop is not None:
            target["max_drop_points"] = float(max_drop)
        method = "search"
    target["full_accuracy"] = full_accuracy
    natural = [policy.to_score(t) for t in thresholds]  # score -> policy units (the map is its own inverse)
    calibration = Calibration(policy_name, natural, summary["accuracy"], summary["macs"], float(full_macs),
                              summary["fractions"], target, met, method)
    return policy.with_thresholds(natural if natural else float(policy.to_score(math.inf))), calibration


def choose_policy(candidates: Sequence[tuple[dict, ExitPolicy]], all_logits: Sequence[Tensor], correct: Tensor,
                  cumulative_macs: Sequence[float], *, target_accuracy: float | None = None,
                  budget_macs: float | None = None, all_features: Sequence[Tensor] | None = None
                  ) -> tuple[int, dict, bool]:
    """For policies without thresholds (e.g. patience 1..K): run each candidate (params, policy) on the
    precomputed exits and pick the cheapest reaching `target_accuracy`, or the most accurate within
    `budget_macs`. Returns (index of the winner, its summary, met)."""
    if (target_accuracy is None) == (budget_macs is None):
        raise ConfigError("choose_policy needs exactly one of a target accuracy or a compute budget")
    summaries = [summarize_exits(decide_exits(policy, all_logits, all_features), correct, cumulative_macs)
                 for _, policy in candidates]
    order = range(len(candidates))
    if target_accuracy is not None:
        ok = [i for i in order if summaries[i]["accuracy"] >= target_accuracy - 1e-12]
        met = bool(ok)
        best = (min(ok, key=lambda i: (summaries[i]["macs"], -summaries[i]["accuracy"])) if met
                else max(order, key=lambda i: (summaries[i]["accuracy"], -summaries[i]["macs"])))
    else:
        ok = [i for i in order if summaries[i]["macs"] <= budget_macs * (1 + 1e-12)]
        met = bool(ok)
        best = (max(ok, key=lambda i: (summaries[i]["accuracy"], -summaries[i]["macs"])) if met
                else min(order, key=lambda i: summaries[i]["macs"]))
    return best, summaries[best], met
