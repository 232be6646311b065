"""What an early-exit run did: per-exit counts, accuracy and cost, the compute saved, the wall time.

`ExitStatistics` takes plain per-stage numbers (how many samples left at each exit, how many of them were right,
the cumulative cost of leaving there), so anything with stages can use it: an image classifier's exits or a
detector's RoI stages (where "samples" are RoIs and `correct` may be left out).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class ExitStatistics:
    counts: list[int]  # samples leaving at each exit
    cumulative_macs: list[float]  # cost per sample of leaving at each exit (every stage and head up to it)
    full_macs: float  # cost per sample of the model without early exits
    correct: list[int] | None = None  # of the samples leaving at each exit, how many were right
    wall_time_s: float | None = None  # measured time of the early-exit run
    full_wall_time_s: float | None = None  # measured time of the full model on the same inputs
    full_accuracy: float | None = None  # accuracy of the full model on the same inputs
    planned_macs: float | None = None  # what the calibration promised (average MACs per sample)
    planned_accuracy: float | None = None

    @classmethod
    def from_exits(cls, exit_stage: Tensor, cumulative_macs: Sequence[float], full_macs: float,
                   correct: Tensor | None = None, **extra) -> ExitStatistics:
        """From per-sample exit indices (N,) and, optionally, per-sample correctness (N,) bool."""
        num_stages = len(cumulative_macs)
        exit_stage = exit_stage.cpu()
        counts = torch.bincount(exit_stage, minlength=num_stages).tolist()
        right = None
        if correct is not None:
            right = torch.bincount(exit_stage, weights=correct.cpu().double(), minlength=num_stages)
            right = [int(round(v)) for v in right.tolist()]
        return cls(counts, [float(c) for c in cumulative_macs], float(full_macs), right, **extra)

    @property
    def num_stages(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def fractions(self) -> list[float]:
        return [c / self.total for c in self.counts]

    @property
    def stage_accuracy(self) -> list[float | None]:
        """Accuracy of the samples that left at each exit (None where none left, or correctness unknown)."""
        if self.correct is None:
            return [None] * self.num_stages
        return [r / c if c else None for r, c in zip(self.correct, self.counts)]

    @property
    def accuracy(self) -> float | None:
        return sum(self.correct) / self.total if self.correct is not None else None

    @property
    def average_depth(self) -> float:
        """Mean number of stages a sample ran (1 = everybody left at the first exit)."""
        return sum((k + 1) * c for k, c in enumerate(self.counts)) / self.total

    @property
    def average_macs(self) -> float:
        return sum(c * m for c, m in zip(self.counts, self.cumulative_macs)) / self.total

    @property
    def compute_saved(self) -> float:
        """1 - average cost / full model cost (negative if the exits cost more than they save)."""
        return 1.0 - self.average_macs / self.full_macs

    @property
    def wall_speedup(self) -> float | None:
        if self.wall_time_s and self.full_wall_time_s:
            return self.full_wall_time_s / self.wall_time_s
        return None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(total=self.total, fractions=self.fractions, stage_accuracy=self.stage_accuracy,
                   accuracy=self.accuracy, average_depth=self.average_depth, average_macs=self.average_macs,
                   compute_saved=self.compute_saved, wall_speedup=self.wall_speedup)
        return out

    def save_json(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")
        return path

    def table(self, title: str = "") -> str:
        """A markdown table, one row per exit, then the totals."""
        lines = [f"### {title}", ""] if title else []
        lines += ["| exit | samples | fraction | accuracy | cumulative MMACs | % of full |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for k, (count, frac, acc, macs) in enumerate(zip(self.counts, self.fractions, self.stage_accuracy,
                                                       self.cumulative_macs)):
            shown = "-" if acc is None else f"{100 * acc:.2f}%"
            lines.append(f"| {k + 1} | {count} | {100 * frac:.1f}% | {shown} | {macs / 1e6:.3f} | "
                         f"{100 * macs / self.full_macs:.1f}% |")
        lines.append("")
        if self.accuracy is not None:
            drop = ""
            if self.full_accuracy is not None:
                drop = f" (full model {100 * self.full_accuracy:.2f}%, drop {100 * (self.full_accuracy - self.accuracy):+.2f} pt)"
            lines.append(f"- accuracy: {100 * self.accuracy:.2f}%{drop}")
        lines.append(f"- average depth: {self.average_depth:.2f} of {self.num_stages} stages")
        lines.append(f"- average MMACs per sample: {self.average_macs / 1e6:.3f} "
                     f"(full model {self.full_macs / 1e6:.3f}); compute saved {100 * self.compute_saved:.1f}%")
        if self.planned_macs is not None:
            planned = f"- planned (calibration split): {self.planned_macs / 1e6:.3f} MMACs"
            if self.planned_accuracy is not None:
                planned += f", accuracy {100 * self.planned_accuracy:.2f}%"
            lines.append(planned + f"; realised: {self.average_macs / 1e6:.3f} MMACs")
        if self.wall_time_s is not None:
            wall = f"- wall time: {1e3 * self.wall_time_s:.1f} ms"
            if self.full_wall_time_s is not None:
                wall += f" (full model {1e3 * self.full_wall_time_s:.1f} ms, speed-up {self.wall_speedup:.2f}x)"
            lines.append(wall)
        return "\n".join(lines)


def plot_accuracy_vs_compute(path: str | Path, curves: Mapping[str, Sequence[tuple[float, float]]],
                             full_macs: float, *, operating_point: tuple[float, float] | None = None,
                             exit_points: Sequence[tuple[float, float]] = (),
                             full_accuracy: float | None = None, title: str = "") -> Path:
    """A PNG of accuracy against average MACs (as % of the full model), the operating point marked.

    `curves` maps a label to (average MACs, accuracy in [0, 1]) points; `exit_points` and `operating_point`
    are such pairs too.
    """
    import matplotlib  # lazy on purpose: matplotlib loads only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xy(points):
        points = sorted(points)
        return [100 * m / full_macs for m, _ in points], [100 * a for _, a in points]

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for (label, points), color in zip(curves.items(), ["tab:blue", "tab:orange", "tab:green", "tab:purple"]):
        if points:
            ax.plot(*xy(points), "-", color=color, lw=1.5, marker=".", ms=4, label=label)
    if exit_points:
        ax.plot(*xy(exit_points), "s", color="tab:gray", ms=6, label="single exit (no early exit)")
    if full_accuracy is not None:
        ax.plot([100], [100 * full_accuracy], "D", color="black", ms=7, label="full model")
        ax.axhline(100 * full_accuracy - 0.5, color="black", lw=0.8, ls=":", label="full model - 0.5 pt")
    if operating_point is not None:
        (x,), (y,) = xy([operating_point])
        ax.plot([x], [y], "*", color="tab:red", ms=15, label=f"operating point ({x:.0f}% compute, {y:.2f}%)")
    ax.set_xlabel("average compute per sample (% of the full model's MACs)")
    ax.set_ylabel("accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
