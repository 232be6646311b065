"""Dataclass configs for early-exit classifiers: data, model, exit policy, training, execution.

The exit policy is `cascadevision.config.EarlyExitConfig`, the one a detector's cascade reads too (same policy
names, same thresholds); its section here is `early_exit` (formerly `policy`, with `kind` for `policy`: both old
spellings are still read).

Defaults are the reference values where a paper gives one (BranchyNet's Adam lr 1e-3, MSDNet's unweighted sum
of exit losses, SDN's 0.01 start for the linear schedule). Named presets (`presets.py`) change only what differs;
`--set section.key=value` overrides any field, and an unknown key is a `ConfigError` naming the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import RENAMED, EarlyExitConfig


@dataclass
class ExitDataConfig:
    dataset: str = "digits"  # "digits" (scikit-learn's bundled 8x8 digits) or "digits_hard" (blur + noise)
    image_size: int = 32  # the 8x8 digits are upsampled (bilinear) to this size so a stage's compute is real work
    val_fraction: float = 0.2  # held out for calibration and gate training; never used to fit the classifier
    test_fraction: float = 0.2
    seed: int = 0  # fixes the split and the corruption of the hard variant


@dataclass
class ExitModelConfig:
    kind: str = "resnet"  # "resnet": one network with an exit after each stage; "cascade": small -> large models
    num_stages: int = 4
    base_width: int = 32  # stage k has base_width * 2**k channels (cascade: member k is that wide)
    blocks_per_stage: int = 1  # residual blocks per stage (cascade: per stage of each member)
    head_pool: int = 4  # exit heads pool the stage's map to head_pool x head_pool (SDN-style) before a linear layer
    num_classes: int = 10
    in_channels: int = 1


@dataclass
class ExitTrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3  # Adam, as BranchyNet
    weight_decay: float = 1e-4
    loss: str = "fixed"  # "fixed" (sum_k w_k CE_k), "sdn" (SDN's linear schedule), "subsets" (all-subset sums)
    exit_weights: tuple[float, ...] = ()  # "fixed": one weight per exit; empty = all 1 (MSDNet)
    gating: str = "none"  # confidence-gated training: "none", "hard" or "soft"
    gating_threshold: float = 0.9  # "hard": an exit 'fails' a sample when its probability of the true class < this
    shift: int = 1  # random translation of up to this many source (8x8) pixels while training; 0 disables
    gate_epochs: int = 200
    gate_lr: float = 1e-2
    seed: int = 0
    threads: int = 1  # torch.set_num_threads for train/evaluate/bench; 0 leaves torch's default


@dataclass
class ExitRunConfig:
    mode: str = "compact"  # "compact"/"simulate": `exits evaluate` runs both and checks they agree; "anytime": a budget
    batch_size: int = 256
    budget_ms: float = 0.0  # "anytime": the time budget per batch
    anytime_answer: str = "confident"  # "confident" (most confident exit so far), "ensemble" (mean of probs), "last"


@dataclass
class ExitsConfig:
    preset: str = ""
    data: ExitDataConfig = field(default_factory=ExitDataConfig)
    model: ExitModelConfig = field(default_factory=ExitModelConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    train: ExitTrainConfig = field(default_factory=ExitTrainConfig)
    run: ExitRunConfig = field(default_factory=ExitRunConfig)


RENAMED[ExitsConfig] = {"policy": "early_exit"}  # old spelling (checkpoints and --set), see config.update
ExitPolicyConfig = EarlyExitConfig  # the old name of the section's class
