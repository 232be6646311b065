"""Exit policies: from one exit's logits (N, C), decide which samples stop there.

A policy is called once per exit with that exit's logits and returns a bool mask (N,) of the samples that
leave. It does not know where the cascade ends: `exit_decision` makes the last exit accept everything, so
the same policy object serves an image classifier's exits and a detector's RoI stages alike.

Threshold policies compare a *confidence* (higher = surer) with a per-exit threshold, `confidence >= t_k`:

- `MaxProbPolicy`: the largest softmax probability (MSDNet, SDN);
- `EntropyPolicy`: exit when the entropy divided by log C is at most T (BranchyNet, with the positive entropy);
  its confidence is -H/log C, so its thresholds are stored as given and compared exactly;
- `MarginPolicy`: top-1 minus top-2 probability;
- `GatePolicy`: a small learned network's probability that the current answer is already right; optionally a
  *pruner* that also stops samples the gate thinks no later exit would get right.

`PatiencePolicy` is not a threshold policy: it exits once the same class has been predicted at k exits in a
row (PABEE's patience t corresponds to k = t + 1).

Stateful policies keep per-sample tensors in a `memory` dict; the executor drops the rows of samples that
have left, exactly as it does for the features.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EXIT_THRESHOLD, POLICY_NAMES, THRESHOLD_POLICIES
from ..errors import ConfigError

# One implementation of each confidence measure, on probabilities (..., C): the classifier's policies apply
# them to the softmax of an exit's logits, a detector's cascade (`detection.py`) to a RoI's class probabilities.


def probability_max(probs: Tensor) -> Tensor:
    """The largest probability along the last dim."""
    return probs.max(-1).values


def probability_entropy(probs: Tensor, normalized: bool = True) -> Tensor:
    """H(p) = -sum_c p_c log p_c along the last dim (0 log 0 = 0); divided by log C when `normalized`."""
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return entropy / math.log(probs.shape[-1]) if normalized else entropy


def probability_margin(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability along the last dim."""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def softmax_entropy(logits: Tensor, normalized: bool = True) -> Tensor:
    """The entropy of softmax(logits) along the last dim; divided by log C when `normalized`."""
    return probability_entropy(F.softmax(logits.float(), dim=-1), normalized)


def softmax_margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability, (N,)."""
    return probability_margin(F.softmax(logits.float(), dim=-1))


def max_probability(logits: Tensor) -> Tensor:
    return probability_max(F.softmax(logits.float(), dim=-1))


class ExitPolicy:
    """Base class. `exit_mask(logits, stage, memory, features)` -> bool (N,)."""

    #: the executor passes each exit's pooled features (N, D) when True (learned gates)
    needs_features = False
    #: True for the "no early exit" policy: executors then skip the intermediate exit heads entirely
    never_exits = False

    def init_memory(self, n: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Per-sample state carried from exit to exit (rows are dropped with the samples that leave)."""
        return {}

    def exit_mask(self, logits: Tensor, stage: int, memory: dict[str, Tensor] | None = None,
                  features: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def decision_macs(self, stage: int) -> int:
        """Multiply-accumulates per sample spent deciding at `stage` (a learned gate's network)."""
        return 0

    def describe(self) -> str:
        return type(self).__name__


def exit_decision(policy: ExitPolicy, logits: Tensor, stage: int, num_stages: int,
                  memory: dict[str, Tensor] | None = None, features: Tensor | None = None) -> Tensor:
    """The policy's mask, except that the last exit accepts every sample still there."""
    if stage == num_stages - 1:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return policy.exit_mask(logits, stage, memory, features)


def decide_exits(policy: ExitPolicy, all_logits: Sequence[Tensor], all_features: Sequence[Tensor] | None = None
                 ) -> Tensor:
    """Exit index (N,) of every sample, given every exit's logits computed in full (simulation, analysis).

    Runs the policy exit by exit on all samples (so stateful policies see each sample's whole history) and
    records the first exit that accepts.
    """
    num_stages = len(all_logits)
    n = all_logits[0].shape[0]
    device = all_logits[0].device
    exit_stage = torch.full((n,), num_stages - 1, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    memory = policy.init_memory(n, device)
    for k, logits in enumerate(all_logits):
        features = all_features[k] if all_features is not None else None
        leaving = exit_decision(policy, logits, k, num_stages, memory, features) & ~done
        exit_stage[leaving] = k
        done |= leaving
    return exit_stage


class NoEarlyExit(ExitPolicy):
    """Every sample runs every stage (the "batch" preset); executors skip the intermediate heads."""
    never_exits = True

    def exit_mask(self, logits, stage, memory=None, features=None):
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)


class ThresholdPolicy(ExitPolicy):
    """Exit at stage k when `confidence(logits) >= thresholds[k]`.

    `thresholds` is one number for every exit or one per exit (the last exit's value, if given, is ignored).
    They are in the policy's own units (`metric`); +inf for a confidence (-inf for the entropy) closes an exit.
    """
    #: False when a *small* metric means confident (entropy): the confidence is then -metric
    higher_is_confident = True

    def __init__(self, thresholds: float | Sequence[float]):
        if isinstance(thresholds, (int, float)):
            self.thresholds: float | list[float] = float(thresholds)
        else:
            self.thresholds = [float(t) for t in thresholds]

    #: the measure on class probabilities (N, C) -> (N,), for the policies that read only the softmax
    probability_metric = None  # a staticmethod in the subclasses

    def metric(self, logits: Tensor, stage: int = 0, features: Tensor | None = None) -> Tensor:
        """(N,) the policy's own measure (probability, entropy, margin, gate output) at exit `stage`."""
        if self.probability_metric is None:
            raise NotImplementedError
        return self.probability_metric(F.softmax(logits.float(), dim=-1))

    def passes(self, probs: Tensor, stage: int = 0) -> Tensor:
        """(N,) bool: the measure of class probabilities `probs` (N, C) passes exit `stage`'s threshold."""
        m = self.probability_metric(probs)
        return m >= self.threshold(stage) if self.higher_is_confident else m <= self.threshold(stage)

    def confidence(self, logits: Tensor, stage: int = 0, features: Tensor | None = None) -> Tensor:
        """(N,) score where higher means surer; `exit iff confidence >= score_threshold(stage)`."""
        m = self.metric(logits, stage, features)
        return m if self.higher_is_confident else -m

    def threshold(self, stage: int) -> float:
        if isinstance(self.thresholds, float):
            return self.thresholds
        if stage >= len(self.thresholds):
            raise ConfigError(f"{type(self).__name__} has {len(self.thresholds)} thresholds, none for exit {stage}")
        return self.thresholds[stage]

    def score_threshold(self, stage: int) -> float:
        return self.to_score(self.threshold(stage))

    def to_score(self, threshold: float) -> float:
        """A threshold in the policy's units -> one on the confidence scale (and back: the map is its own inverse)."""
        return threshold if self.higher_is_confident else -threshold

    def forced_exits(self, logits: Tensor, stage: int, features: Tensor | None = None) -> Tensor | None:
        """Samples that leave whatever their confidence (the gate's pruner); None when there are none."""
        return None

    def exit_mask(self, logits, stage, memory=None, features=None):
        mask = self.confidence(logits, stage, features) >= self.score_threshold(stage)
        forced = self.forced_exits(logits, stage, features)
        return mask if forced is None else mask | forced

    def with_thresholds(self, thresholds: float | Sequence[float]) -> ThresholdPolicy:
        """A copy of this policy with other thresholds (same units), e.g. the result of a calibration."""
        other = copy.copy(self)
        ThresholdPolicy.__init__(other, thresholds)
        return other

    def describe(self) -> str:
        t = self.thresholds
        shown = f"{t:g}" if isinstance(t, float) else "[" + ", ".join(f"{v:.4g}" for v in t) + "]"
        return f"{type(self).__name__}({shown})"


class MaxProbPolicy(ThresholdPolicy):
    """Exit when the largest softmax probability reaches the threshold."""
    probability_metric = staticmethod(probability_max)


class EntropyPolicy(ThresholdPolicy):
    """Exit when the softmax entropy divided by log C is at most the threshold."""
    higher_is_confident = False
    probability_metric = staticmethod(probability_entropy)


class MarginPolicy(ThresholdPolicy):
    """Exit when top-1 minus top-2 probability reaches the threshold."""
    probability_metric = staticmethod(probability_margin)


class PatiencePolicy(ExitPolicy):
    """Exit once `patience` consecutive exits (this one included) predict the same class."""

    def __init__(self, patience: int = 2):
        if patience < 1:
            raise ConfigError(f"patience must be at least 1, got {patience}")
        self.patience = patience

    def init_memory(self, n, device="cpu"):
        return {"previous": torch.full((n,), -1, dtype=torch.long, device=device),
                "streak": torch.zeros(n, dtype=torch.long, device=device)}

    def exit_mask(self, logits, stage, memory=None, features=None):
        if memory is None:
            raise ValueError("PatiencePolicy needs the memory from init_memory()")
        prediction = logits.argmax(-1)
        streak = torch.where(prediction == memory["previous"], memory["streak"] + 1, torch.ones_like(prediction))
        memory["previous"], memory["streak"] = prediction, streak
        return streak >= self.patience

    def describe(self) -> str:
        return f"PatiencePolicy({self.patience})"


# ----------------------------------------------------------------------------------------------------------
# learned gate


def gate_inputs(logits: Tensor, top_k: int = 3) -> Tensor:
    """What a gate reads from the logits: the top-k softmax probabilities (sorted), margin, normalised entropy."""
    probs = F.softmax(logits.float(), dim=-1)
    k = min(top_k, probs.shape[-1])
    top = probs.topk(k, dim=-1).values
    if k < top_k:
        top = F.pad(top, (0, top_k - k))
    margin = top[:, :1] - top[:, 1:2] if top_k > 1 else top[:, :1]
    return torch.cat([top, margin, softmax_entropy(logits, normalized=True)[:, None]], dim=1)  # (N, top_k + 2)


class ExitGate(nn.Module):
    """A small MLP that, at one exit, predicts two things from the logits (and optionally the stage's pooled
    features): output 0, that the exit's current answer is right; output 1, that some later exit will be right
    (used by the pruner: if not, refining is wasted compute)."""

    top_k = 3

    def __init__(self, feature_dim: int = 0, hidden: int = 32):
        super().__init__()
        self.feature_dim = feature_dim
        self.norm = nn.LayerNorm(feature_dim) if feature_dim else None
        self.mlp = nn.Sequential(nn.Linear(self.top_k + 2 + feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        x = gate_inputs(logits, self.top_k)
        if self.feature_dim:
            if features is None:
                raise ValueError("this gate was built to read the stage's features; pass them")
            x = torch.cat([x, self.norm(features.float())], dim=1)
        return self.mlp(x)  # (N, 2) logits: [answer right now, a later exit right]


class GatePolicy(ThresholdPolicy):
    """Exit when the gate's P(current answer right) >= threshold; with the pruner, also when
    P(a later exit right) < prune_threshold (the input is not worth refining)."""

    def __init__(self, gates: Sequence[ExitGate], thresholds: float | Sequence[float] = EXIT_THRESHOLD,
                 prune_threshold: float = 0.0):
        super().__init__(thresholds)
        self.gates = nn.ModuleList(gates).eval()
        self.prune_threshold = float(prune_threshold)
        self.needs_features = any(g.feature_dim for g in self.gates)

    def _gate(self, logits: Tensor, stage: int, features: Tensor | None) -> Tensor:
        if stage == len(self.gates):  # the last exit has no gate: it accepts every sample anyway
            return logits.new_ones(logits.shape[0], 2, dtype=torch.float32)
        if stage > len(self.gates):
            raise ConfigError(f"GatePolicy has {len(self.gates)} gates, none for exit {stage}")
        with torch.no_grad():
            return torch.sigmoid(self.gates[stage](logits, features))

    def exit_mask(self, logits, stage, memory=None, features=None):
        p = self._gate(logits, stage, features)
        mask = p[:, 0] >= self.score_threshold(stage)
        if self.prune_threshold > 0:
            mask |= p[:, 1] < self.prune_threshold
        return mask

    def metric(self, logits, stage=0, features=None):
        return self._gate(logits, stage, features)[:, 0]

    def forced_exits(self, logits, stage, features=None):
        if self.prune_threshold <= 0:
            return None
        return self._gate(logits, stage, features)[:, 1] < self.prune_threshold

    def decision_macs(self, stage: int) -> int:
        if stage >= len(self.gates):
            return 0
        gate = self.gates[stage]
        return sum(m.in_features * m.out_features for m in gate.modules() if isinstance(m, nn.Linear))


POLICY_KINDS = POLICY_NAMES  # the one vocabulary, defined with the config (cascadevision.config)
THRESHOLD_POLICY_CLASSES = {"max_prob": MaxProbPolicy, "entropy": EntropyPolicy, "margin": MarginPolicy}
assert tuple(THRESHOLD_POLICY_CLASSES) == THRESHOLD_POLICIES


def build_policy(cfg, gates: Sequence[ExitGate] | None = None) -> ExitPolicy:
    """An `ExitPolicy` from an `EarlyExitConfig` (gates come from `train_gates` for policy 'gate')."""
    thresholds = tuple(cfg.thresholds) if cfg.thresholds else cfg.threshold
    if cfg.policy in THRESHOLD_POLICY_CLASSES:
        return THRESHOLD_POLICY_CLASSES[cfg.policy](thresholds)
    if cfg.policy == "patience":
        return PatiencePolicy(cfg.patience)
    if cfg.policy == "none":
        return NoEarlyExit()
    if cfg.policy == "gate":
        if gates is None:
            raise ConfigError("early_exit.policy 'gate' needs trained gates (train them with `cascadevision exits "
                              "train`)")
        return GatePolicy(gates, thresholds, cfg.prune_threshold)
    raise ConfigError(f"early_exit.policy must be one of {', '.join(POLICY_NAMES)}, got {cfg.policy!r}")
