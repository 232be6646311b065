"""Multi-exit models: a chain of stages, each followed by an exit head that turns the stage's output into logits.

Two shapes of cascade fit the same container:

- `MultiExitResNet`: one network, an exit after each residual stage (BranchyNet / SDN / MSDNet style);
- `ModelCascade`: independent classifiers of increasing size (small -> medium -> large). Its "stages" are
  identities that pass the input image on, and its "exits" are the whole member models.

What flows from one stage to the next (the *state*) is a tensor with the batch first, or a tuple of such tensors,
so the executor can keep only the samples that go on (`select(state, keep)`). The cost of each stage is counted
once, per sample, with `cascadevision.macs.count_macs` (convolutions and linear layers; BN and activations are
free, as in the papers).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..macs import count_macs
from .config import ExitModelConfig

State = Tensor | tuple[Tensor, ...]


@dataclass
class StageCosts:
    """Multiply-accumulates per sample of each stage's body and of each exit head (plus its exit decision)."""
    body: list[int]
    head: list[int]

    @property
    def cumulative(self) -> list[int]:
        """cumulative[k]: the cost of a sample that leaves at exit k (every body and head up to k)."""
        total, out = 0, []
        for body, head in zip(self.body, self.head):
            total += body + head
            out.append(total)
        return out

    @property
    def full(self) -> int:
        """The model without early exits: every body, and only the last head."""
        return sum(self.body) + self.head[-1]

    def with_decision_costs(self, extra: Sequence[int]) -> StageCosts:
        """Add the cost of deciding at each exit (e.g. a learned gate) to the heads that pay it."""
        head = [h + (extra[k] if k < len(extra) else 0) for k, h in enumerate(self.head)]
        return StageCosts(list(self.body), head)

    def to_dict(self) -> dict:
        return {"body": self.body, "head": self.head, "cumulative": self.cumulative, "full": self.full}


def select(state: State, keep: Tensor) -> State:
    """The rows `keep` (a bool mask or an index tensor) of a state: a tensor or a tuple of tensors."""
    if isinstance(state, Tensor):
        return state[keep]
    return tuple(select(s, keep) for s in state)


class MultiExitModel(nn.Module):
    """`stages[k]` maps the state to the next state; `exits[k]` maps stage k's state to (N, num_classes) logits."""

    def __init__(self, stages: Sequence[nn.Module], exits: Sequence[nn.Module]):
        super().__init__()
        if len(stages) != len(exits) or not stages:
            raise ValueError(f"need one exit per stage, got {len(stages)} stages and {len(exits)} exits")
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits: a list of num_stages tensors (N, num_classes). Used for training and `simulate`."""
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: Tensor, features: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """Every exit's logits and, when asked, the pooled state each exit saw (for learned gates)."""
        logits, pooled = [], []
        state = x
        for k in range(self.num_stages):
            state = self.stages[k](state)
            logits.append(self.exits[k](state))
            if features:
                pooled.append(self.exit_features(k, state))
        return logits, pooled

    def forward_final(self, x: Tensor) -> Tensor:
        """The model without early exits: every stage, and only the last exit head."""
        state = x
        for stage in self.stages:
            state = stage(state)
        return self.exits[-1](state)

    def exit_features(self, stage: int, state: State) -> Tensor:
        """A (N, D) summary of the state at an exit: the global average of a feature map."""
        if not isinstance(state, Tensor):
            state = state[0]
        return state.mean(dim=(2, 3)) if state.dim() == 4 else state.flatten(1)

    def stage_costs(self, example: Tensor) -> StageCosts:
        """MACs per sample of each stage body and each exit head, measured on `example` (1, C, H, W)."""
        if example.shape[0] != 1:
            example = example[:1]
        body, head = [], []
        state = example
        for k in range(self.num_stages):
            body.append(count_macs(self.stages[k], state))
            with torch.no_grad():
                state = self.stages[k](state)
            head.append(count_macs(self.exits[k], state))
        return StageCosts(body, head)


# ----------------------------------------------------------------------------------------------------------
# ResNet-style building blocks


class BasicBlock(nn.Module):
    """The ResNet-18/34 block: two 3x3 convs with BN, and a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet_stages(in_channels: int, widths: Sequence[int], blocks_per_stage: int) -> list[nn.Sequential]:
    """Stage 0: a 3x3 stem and blocks at full resolution; stage k > 0 halves the resolution in its first block."""
    stages = []
    channels = in_channels
    for k, width in enumerate(widths):
        layers: list[nn.Module] = []
        if k == 0:
            layers += [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        for b in range(blocks_per_stage):
            layers.append(BasicBlock(channels, width, stride=2 if (k > 0 and b == 0) else 1))
            channels = width
        stages.append(nn.Sequential(*layers))
    return stages


class ExitHead(nn.Module):
    """SDN's internal classifier: mix max- and average-pooling down to pool x pool (alpha learned), then linear."""

    def __init__(self, channels: int, num_classes: int, pool: int = 4):
        super().__init__()
        self.pool = pool
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > self.pool or x.shape[-2] > self.pool:
            x = self.alpha * F.adaptive_max_pool2d(x, self.pool) + (1 - self.alpha) * F.adaptive_avg_pool2d(x, self.pool)
        elif x.shape[-1] < self.pool or x.shape[-2] < self.pool:
            x = F.interpolate(x, size=(self.pool, self.pool), mode="nearest")
        return self.fc(x.flatten(1))  # (N, num_classes)


class MultiExitResNet(MultiExitModel):
    """A ResNet with an exit after every stage; stage k has base_width * 2**k channels."""

    def __init__(self, cfg: ExitModelConfig | None = None):
        cfg = cfg or ExitModelConfig()
        widths = [cfg.base_width * 2 ** k for k in range(cfg.num_stages)]
        stages = resnet_stages(cfg.in_channels, widths, cfg.blocks_per_stage)
        exits = [ExitHead(w, cfg.num_classes, cfg.head_pool) for w in widths]
        super().__init__(stages, exits)
        self.cfg = cfg


class ResNetClassifier(nn.Module):
    """A plain single-exit classifier (two ResNet stages, width and 2x width, then an exit head)."""

    def __init__(self, in_channels: int, num_classes: int, width: int, blocks_per_stage: int = 1, pool: int = 4):
        super().__init__()
        self.body = nn.Sequential(*resnet_stages(in_channels, [width, 2 * width], blocks_per_stage))
        self.head = ExitHead(2 * width, num_classes, pool)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ModelCascade(MultiExitModel):
    """Independent models of increasing size run one after another on the same input.

    Each stage passes the input image on unchanged (zero cost); each exit is a whole member model, so the
    cost of leaving at member k is the sum of members 0..k, and the "full model" is the largest member alone.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__([nn.Identity() for _ in members], list(members))

    @classmethod
    def from_config(cls, cfg: ExitModelConfig | None = None) -> ModelCascade:
        cfg = cfg or ExitModelConfig(kind="cascade", num_stages=3)
        return cls([ResNetClassifier(cfg.in_channels, cfg.num_classes, cfg.base_width * 2 ** k,
                                     cfg.blocks_per_stage, cfg.head_pool) for k in range(cfg.num_stages)])

    def exit_features(self, stage: int, state: State) -> Tensor:
        """The members share no features; a learned gate here sees the logits only."""
        x = state if isinstance(state, Tensor) else state[0]
        return x.new_zeros(x.shape[0], 0)


def build_exit_model(cfg: ExitModelConfig) -> MultiExitModel:
    if cfg.num_stages < 1:
        raise ConfigError(f"model.num_stages must be at least 1, got {cfg.num_stages}")
    if cfg.kind == "resnet":
        return MultiExitResNet(cfg)
    if cfg.kind == "cascade":
        return ModelCascade.from_config(cfg)
    raise ConfigError(f"model.kind must be 'resnet' or 'cascade', got {cfg.kind!r}")
