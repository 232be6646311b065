"""Region-level early exit in a detector's cascade: RoIs leave the cascade once their class is clear.

The cascade head (`models/cascade.py`) calls `exit_policy(stage, probs) -> (leave, drop)` after each stage,
with each RoI's class probabilities (softmax of the mean logits so far, background last). `RegionExitPolicy`
is that callable, configured by `model.roi_head.early_exit`:

- the policy (`max_prob`, `entropy`, `margin`: the classifier's `policies.py`, same names and measures):
  max_prob reads the best *foreground* class's probability; entropy and margin read the whole distribution
  and also require the best class to be foreground;
- the pruner: a RoI whose best class probability is below `prune_threshold` stops being refined, but is kept;
- background drop: a RoI with P(background) >= `background_threshold` is dropped (dropping wins over leaving);
- the time budget: past `time_budget_ms` since the detector's forward began, every RoI leaves where it is;
- the last stage lets every RoI still there leave.

It also counts what the cascade computed (`StageCounts`) and turns the counts into RoI-head compute
(`summary()`, the numbers `cascadevision eval` prints).

    model = build_model("htc_r18_fpn", roi_head={"early_exit": {"policy": "entropy", "threshold": 0.3}})
    model.eval()(images); print(model.roi_head.exit_policy.summary())
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import EarlyExitConfig, ModelConfig
from ..macs import count_macs
from ..models import build_model as _build_model
from ..models.build import build_from_config as _build_from_config
from .policies import THRESHOLD_POLICY_CLASSES, MaxProbPolicy


@dataclass
class StageCounts:
    """What the cascade computed: RoIs entering each stage, leaving after it (confident), dropped after it
    (background), and detections whose masks used stages 0..t."""
    num_stages: int
    rois: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("rois", "exits", "dropped", "masks"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_stages)

    def __add__(self, other: StageCounts) -> StageCounts:
        add = lambda a, b: [x + y for x, y in zip(a, b)]
        return StageCounts(self.num_stages, add(self.rois, other.rois), add(self.exits, other.exits),
                           add(self.dropped, other.dropped), add(self.masks, other.masks))


class RegionExitPolicy:
    """`(stage, probs) -> (leave, drop)` for a cascade head of `num_stages` stages; see the module docstring.

    `counts` is what the last forward computed, `totals` the sum since `reset()`. `per_roi_macs` is
    (box head MACs per stage, mask head MACs per stage) for one RoI, for `summary()`.
    """

    def __init__(self, cfg: EarlyExitConfig, num_stages: int, per_roi_macs: tuple[list[int], list[int]] = ([], [])):
        self.cfg = cfg
        self.num_stages = num_stages
        self.policy = THRESHOLD_POLICY_CLASSES[cfg.policy](cfg.threshold) if cfg.policy != "none" else None
        self.per_roi_macs = per_roi_macs
        self.mask_score_threshold = cfg.mask_score_threshold  # the head reads it: below, a box mask, no mask head
        self.deadline: float | None = None
        self.counts = StageCounts(num_stages)
        self.totals: StageCounts | None = None

    def start_clock(self) -> None:
        """The detector's forward begins: the time budget counts from now."""
        budget_ms = self.cfg.time_budget_ms
        self.deadline = time.perf_counter() + budget_ms / 1000 if budget_ms > 0 else None

    def __call__(self, stage: int, probs: Tensor) -> tuple[Tensor, Tensor]:
        n = len(probs)
        if stage == 0:  # a new pass through the cascade: the last one's counts go to the totals
            self.totals = self.total()
            self.counts = StageCounts(self.num_stages)
        self.counts.rois[stage] += n
        no = probs.new_zeros(n, dtype=torch.bool)
        if stage == self.num_stages - 1 or (self.deadline is not None and time.perf_counter() > self.deadline):
            self.counts.exits[stage] += n
            return ~no, no
        cfg = self.cfg
        drop = probs[:, -1] >= cfg.background_threshold if cfg.background_threshold > 0 else no
        foreground = probs[:, :-1]
        pruned = foreground.max(1).values < cfg.prune_threshold if cfg.prune_threshold > 0 else no
        if self.policy is None:
            leave = pruned & ~drop
        else:
            if isinstance(self.policy, MaxProbPolicy):
                confident = self.policy.passes(foreground, stage)
            else:
                confident = self.policy.passes(probs, stage) & (probs.argmax(1) < foreground.shape[1])
            leave = (confident | pruned) & ~drop
        self.counts.exits[stage] += int(leave.sum())
        self.counts.dropped[stage] += int(drop.sum())
        return leave, drop

    def count_masks(self, exit_stage: Tensor) -> None:
        """The head made masks for detections that left at `exit_stage` (N,) (each from stages 0..t)."""
        for stage, n in enumerate(torch.bincount(exit_stage, minlength=self.num_stages).tolist()):
            self.counts.masks[stage] += n

    def reset(self) -> None:
        self.counts, self.totals = StageCounts(self.num_stages), None

    def total(self) -> StageCounts:
        """Counts summed over every pass since `reset()`, the last one included."""
        return self.counts if self.totals is None else self.totals + self.counts

    def summary(self, counts: StageCounts | None = None, plain: StageCounts | None = None) -> dict:
        """RoIs per stage and the RoI-head compute spent; with `plain` (the counts of the plain model run on the
        same images, see `exit_summary`) the saving is against that run."""
        return exit_summary(counts or self.total(), *self.per_roi_macs, plain=plain)


#: how `exit_summary` counts, printed beside its numbers
COUNTING = ("box heads: RoIs entering each stage x that stage's MACs per RoI; mask heads: detections given a mask x "
            "the heads their mask ran (stages 1..t); RoIAlign, NMS, the backbone, RPN and mask pasting not counted")


def roi_head_macs(counts: StageCounts, box: list[int], mask: list[int]) -> int:
    """RoI-head MACs `counts` cost (`box`/`mask`: MACs per RoI of each stage's box and mask head; see COUNTING)."""
    spent = sum(r * c for r, c in zip(counts.rois, box))
    return spent + (sum(m * sum(mask[: t + 1]) for t, m in enumerate(counts.masks)) if mask else 0)


def exit_summary(counts: StageCounts, box: list[int], mask: list[int], plain: StageCounts | None = None) -> dict:
    """`counts` with the RoI-head MACs they cost (`box`/`mask`: per RoI per stage; see COUNTING).

    The honest baseline is `plain`, the counts of the plain model (no early exit) run on the same images: its own
    detections get masks from every stage. Then `saved_fraction` is against it (`baseline` and `counting` say so,
    `saved_vs_full_cascade` keeps the old figure); without it, against "the full cascade on the same proposals" (`full_cascade_gmacs`: every RoI through every
    stage, and the early-exit run's own detections given every stage's mask), which over-states the saving when
    the exits keep more detections than the plain model (pruned RoIs keep low scores)."""
    spent = roi_head_macs(counts, box, mask)
    full = counts.rois[0] * sum(box) + (sum(counts.masks) * sum(mask) if mask else 0)
    out = {"rois": counts.rois, "exits": counts.exits, "dropped": counts.dropped, "masks": counts.masks,
           "roi_head_gmacs": spent / 1e9, "full_cascade_gmacs": full / 1e9,
           "saved_fraction": 1 - spent / full if full else 0.0}
    if plain is not None:
        base = roi_head_macs(plain, box, mask)
        out.update(plain_model_gmacs=base / 1e9, plain_rois=plain.rois, plain_masks=plain.masks,
                   saved_vs_full_cascade=out["saved_fraction"], saved_fraction=1 - spent / base if base else 0.0,
                   baseline="the plain model (no early exit) run on the same images", counting=COUNTING)
    return out


def per_roi_macs(head) -> tuple[list[int], list[int]]:
    """Multiply-accumulates one RoI costs in each stage's box head and mask head of a cascade head."""
    cfg, param, channels = head.cfg, head.bbox_head[0].fc_cls.weight, head.in_channels
    box_size, mask_size = cfg.box_head.roi_size, cfg.mask_head.roi_size
    box_in = param.new_zeros((1, channels, box_size, box_size))
    box = [count_macs(h, box_in) for h in head.bbox_head]
    mask = []
    if head.with_mask:
        mask_in = param.new_zeros((1, channels, mask_size, mask_size))
        res = param.new_zeros((1, cfg.mask_head.conv_channels, mask_size, mask_size))
        mask = [count_macs(h, mask_in, res if h.conv_res is not None else None) for h in head.mask_head]
    return box, mask


def exit_policy_for_head(head, cfg: EarlyExitConfig | None = None) -> RegionExitPolicy:
    """A `RegionExitPolicy` for a cascade head (its own `cfg.early_exit` unless `cfg` is given)."""
    return RegionExitPolicy(cfg or head.cfg.early_exit, head.num_stages, per_roi_macs(head))


def exit_policy_factory(model) -> RegionExitPolicy:
    """For `models.build_from_config(cfg, exit_policy_factory=...)`: the policy `model.cfg` describes, its
    clock started by every forward of `model`."""
    policy = exit_policy_for_head(model.roi_head, model.cfg.roi_head.early_exit)
    model.register_forward_pre_hook(lambda module, args: policy.start_clock())
    return policy


def attach_exit_policy(model):
    """Give an already built cascade detector the exit policy its config describes (no-op for other heads)."""
    if hasattr(model.roi_head, "exit_policy") and model.roi_head.exit_policy is None:
        model.roi_head.exit_policy = exit_policy_factory(model)
    return model


def build_from_config(cfg: ModelConfig):
    """`models.build_from_config` with the early-exit hook: the model honours `cfg.roi_head.early_exit`."""
    return _build_from_config(cfg, exit_policy_factory)


def build_model(name_or_config, num_classes: int | None = None, class_names: list[str] | None = None, **overrides):
    """`models.build_model` with the early-exit hook (see `build_from_config`)."""
    return _build_model(name_or_config, num_classes, class_names, exit_policy_factory=exit_policy_factory,
                        **overrides)
