"""The early-exit workflow on the digits: train -> calibrate (val) -> evaluate (test) -> bench (wall clock).

The CLI (`cascadevision exits ...`) and `benchmarks/bench_early_exit.py` are thin layers over these functions.
A checkpoint holds the model, the learned gates (always trained: they are cheap) and, in `meta`, the config,
the per-stage costs and the per-exit accuracies.

A run directory holds `model.pth` (`exits train`), `thresholds.json` (`exits calibrate`) and `eval/`
(`exits evaluate`); the commands take the directory or the checkpoint file.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import EarlyExitConfig, to_dict, update
from ..engine.rundir import LOCK_NAME
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..errors import CheckpointError, ConfigError
from .calibration import Calibration, assign_exits, budget_sweep, calibrate, choose_policy, summarize_exits
from .config import ExitsConfig
from .data import SOURCE_SIZE, DigitsSplit, load_digits_splits
from .execution import anytime, compact, run_full, simulate
from .models import MultiExitModel, StageCosts, build_exit_model
from .policies import ExitGate, ExitPolicy, GatePolicy, PatiencePolicy, ThresholdPolicy, build_policy, decide_exits
from .stats import ExitStatistics, plot_accuracy_vs_compute
from .training import train_gates, train_multi_exit

Log = Callable[[str], None] | None

MODEL_FILE = "model.pth"
THRESHOLDS_FILE = "thresholds.json"
EVAL_DIR = "eval"
# what the commands write into a run directory: `exits train --overwrite` removes these and nothing else
RUN_FILES = (MODEL_FILE, THRESHOLDS_FILE, EVAL_DIR, LOCK_NAME)


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint a command was given: a run directory's `model.pth`, or the file itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path}: no {MODEL_FILE} in this run directory; make one with "
                              f"`cascadevision exits train --out {path}`")
    return path / MODEL_FILE


def run_thresholds(checkpoint: str | Path) -> Path | None:
    """The `thresholds.json` that `exits calibrate` wrote next to `checkpoint`, if there is one."""
    path = Path(checkpoint).parent / THRESHOLDS_FILE
    return path if path.is_file() else None


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


@dataclass
class ExitRun:
    """A trained multi-exit model with everything needed to run and account for it."""
    cfg: ExitsConfig
    model: MultiExitModel
    costs: StageCosts
    gates: list[ExitGate] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    _splits: dict[str, DigitsSplit] | None = None

    def split(self, name: str) -> DigitsSplit:
        if self._splits is None:
            self._splits = load_digits_splits(self.cfg.data)
        return self._splits[name]

    def policy(self, policy_cfg: EarlyExitConfig | None = None) -> ExitPolicy:
        return build_policy(policy_cfg or self.cfg.early_exit, self.gates or None)

    def costs_for(self, policy: ExitPolicy) -> StageCosts:
        """Stage costs including what the policy spends deciding (a learned gate's MLP)."""
        return self.costs.with_decision_costs([policy.decision_macs(k) for k in range(self.model.num_stages - 1)])


def example_input(cfg: ExitsConfig) -> Tensor:
    return torch.zeros(1, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)


@torch.no_grad()
def exit_outputs(model: MultiExitModel, images: Tensor, features: bool = False, batch_size: int = 256
                 ) -> tuple[list[Tensor], list[Tensor] | None]:
    """Every exit's logits (and pooled features) for `images`, model in eval mode."""
    model.eval()
    logits: list[list[Tensor]] = [[] for _ in range(model.num_stages)]
    feats: list[list[Tensor]] = [[] for _ in range(model.num_stages)]
    for chunk in images.split(batch_size):
        out, pooled = model.forward_with_features(chunk, features=features)
        for k in range(model.num_stages):
            logits[k].append(out[k])
            if features:
                feats[k].append(pooled[k])
    return [torch.cat(p) for p in logits], ([torch.cat(p) for p in feats] if features else None)


def correctness(all_logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    return torch.stack([z.argmax(-1) == labels for z in all_logits])  # (K, N)


# ----------------------------------------------------------------------------------------------------------
# train


def train_run(cfg: ExitsConfig, out_dir: str | Path | None = None, log: Log = print) -> ExitRun:
    """Train the multi-exit model on the train split, then the gates on the val split; save `model.pth`."""
    set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    splits = load_digits_splits(cfg.data)
    model = build_exit_model(cfg.model)
    costs = model.stage_costs(example_input(cfg))
    cost_fractions = [c / costs.full for c in costs.cumulative]
    start = time.perf_counter()
    history = train_multi_exit(model, splits["train"].images, splits["train"].labels, cfg.train, cost_fractions,
                               pixels_per_source_pixel=max(1, cfg.data.image_size // SOURCE_SIZE), log=log)
    train_seconds = time.perf_counter() - start
    val_logits, val_features = exit_outputs(model, splits["val"].images, features=True)
    gates = train_gates(val_logits, val_features if cfg.early_exit.gate_use_features else None, splits["val"].labels,
                        cfg.early_exit.gate_hidden, cfg.train.gate_epochs, cfg.train.gate_lr, cfg.train.seed)
    accuracy = {name: correctness(exit_outputs(model, splits[name].images)[0], splits[name].labels)
                .float().mean(1).tolist() for name in ("val", "test")}
    meta = {"config": to_dict(cfg), "costs": costs.to_dict(), "exit_accuracy": accuracy,
            "train_seconds": train_seconds, "history": history}
    run = ExitRun(cfg, model, costs, gates, meta, splits)
    if log:
        for name, accs in accuracy.items():
            log(f"{name} accuracy per exit: " + " ".join(f"{100 * a:.2f}%" for a in accs))
        log("MMACs per sample at each exit: " + " ".join(f"{c / 1e6:.3f}" for c in costs.cumulative)
            + f" (full model {costs.full / 1e6:.3f})")
    if out_dir is not None:
        save_run(run, Path(out_dir) / MODEL_FILE)
    return run


def save_run(run: ExitRun, path: str | Path) -> Path:
    gate_state = {f"{k}.{name}": t for k, g in enumerate(run.gates) for name, t in g.state_dict().items()}
    meta = {**run.meta, "config": to_dict(run.cfg), "gate_feature_dims": [g.feature_dim for g in run.gates]}
    return save_checkpoint(path, {"state_dict": run.model.state_dict(), "gates": gate_state, "meta": meta})


def load_run(path: str | Path, overrides: dict | None = None) -> ExitRun:
    """A run from its directory or its `model.pth`; `overrides` (nested dict) may change data/policy/run/train
    settings, not the model."""
    path = run_checkpoint(path)
    state = load_checkpoint(path)
    meta = state.get("meta") or {}
    if "config" not in meta or "state_dict" not in state:
        raise CheckpointError(f"{path}: not an early-exit checkpoint (no meta.config); make one with `exits train`")
    cfg = update(ExitsConfig(), meta["config"], stored=True)
    if overrides:
        if "model" in overrides:
            raise ConfigError("model.* cannot be overridden for a trained checkpoint")
        cfg = update(cfg, overrides)
    model = build_exit_model(cfg.model)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({str(exc).splitlines()[0]})") from None
    model.eval()
    gates = []
    for k, dim in enumerate(meta.get("gate_feature_dims", [])):
        gate = ExitGate(dim, cfg.early_exit.gate_hidden)
        prefix = f"{k}."
        gate.load_state_dict({n[len(prefix):]: t for n, t in state.get("gates", {}).items() if n.startswith(prefix)})
        gates.append(gate.eval())
    costs = StageCosts(list(meta["costs"]["body"]), list(meta["costs"]["head"]))
    return ExitRun(cfg, model, costs, gates, meta)


# ----------------------------------------------------------------------------------------------------------
# calibrate


def _scores(policy: ThresholdPolicy, logits: Sequence[Tensor], features: Sequence[Tensor] | None
            ) -> tuple[Tensor, Tensor | None]:
    """(K, N) confidences and (K, N) forced exits (None when the policy never forces)."""
    feats = features if features is not None else [None] * len(logits)
    scores = torch.stack([policy.confidence(z, k, f) for k, (z, f) in enumerate(zip(logits, feats))])
    forced = [policy.forced_exits(z, k, f) for k, (z, f) in enumerate(zip(logits, feats))]
    if all(f is None for f in forced):
        return scores, None
    return scores, torch.stack([f if f is not None else torch.zeros_like(scores[0], dtype=torch.bool) for f in forced])


def calibrate_run(run: ExitRun, policy_cfg: EarlyExitConfig | None = None, *, target_accuracy: float | None = None,
                  max_drop: float | None = None, budget_fraction: float | None = None, split: str = "val"
                  ) -> tuple[ExitPolicy, Calibration]:
    """Thresholds for `policy_cfg` (default: the run's) on the `split` (default val) of the run's dataset.

    `max_drop` is in accuracy points below the full model (last exit) on that split; `budget_fraction` is the
    average compute as a fraction of the full model's.
    """
    policy_cfg = policy_cfg or run.cfg.early_exit
    policy = run.policy(policy_cfg)
    data = run.split(split)
    logits, features = exit_outputs(run.model, data.images, features=policy.needs_features)
    correct = correctness(logits, data.labels)
    costs = run.costs_for(policy)
    budget = None if budget_fraction is None else budget_fraction * costs.full
    if isinstance(policy, GatePolicy) and split == "val":
        # the gates were fitted on val: score val with gates that did not see the sample (cross-fitting)
        scores, forced = _out_of_fold_gate_scores(run, policy, logits, features, data.labels)
        return calibrate(policy, policy_cfg.policy, scores, correct, costs.cumulative, costs.full,
                         target_accuracy=target_accuracy, max_drop=max_drop, budget_macs=budget, forced=forced)
    if isinstance(policy, ThresholdPolicy):
        scores, forced = _scores(policy, logits, features)
        return calibrate(policy, policy_cfg.policy, scores, correct, costs.cumulative, costs.full,
                         target_accuracy=target_accuracy, max_drop=max_drop, budget_macs=budget, forced=forced)
    if isinstance(policy, PatiencePolicy):
        full_accuracy = float(correct[-1].double().mean())
        if max_drop is not None:
            target_accuracy = full_accuracy - max_drop / 100.0
        candidates = [({"patience": k}, PatiencePolicy(k)) for k in range(1, run.model.num_stages + 1)]
        best, summary, met = choose_policy(candidates, logits, correct, costs.cumulative,
                                           target_accuracy=target_accuracy, budget_macs=budget)
        target = {"accuracy": target_accuracy} if budget is None else {"macs": budget}
        target["full_accuracy"] = full_accuracy
        params, chosen = candidates[best]
        return chosen, Calibration("patience", [], summary["accuracy"], summary["macs"], float(costs.full),
                                   summary["fractions"], target, met, "sweep", params)
    raise ConfigError(f"policy '{policy_cfg.policy}' has nothing to calibrate")


def _out_of_fold_gate_scores(run: ExitRun, policy: GatePolicy, logits: Sequence[Tensor],
                             features: Sequence[Tensor] | None, labels: Tensor, folds: int = 5
                             ) -> tuple[Tensor, Tensor | None]:
    """Gate confidences (K, N) and pruner decisions for the val split, each sample scored by gates trained on
    the other folds with the run's settings. Calibrating on the gates' own training data would promise far
    more than the test split delivers."""
    n = len(labels)
    uses_features = any(g.feature_dim for g in run.gates)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(run.cfg.train.seed))
    scores = torch.ones(len(logits), n)
    forced = torch.zeros(len(logits), n, dtype=torch.bool) if policy.prune_threshold > 0 else None
    for held_out in order.chunk(folds):
        fit = torch.ones(n, dtype=torch.bool)
        fit[held_out] = False
        gates = train_gates([z[fit] for z in logits], [f[fit] for f in features] if uses_features else None,
                            labels[fit], run.cfg.early_exit.gate_hidden, run.cfg.train.gate_epochs, run.cfg.train.gate_lr,
                            run.cfg.train.seed)
        fold_policy = GatePolicy(gates, policy.thresholds, policy.prune_threshold)
        fold_scores, fold_forced = _scores(fold_policy, [z[held_out] for z in logits],
                                           [f[held_out] for f in features] if uses_features else None)
        scores[:, held_out] = fold_scores
        if forced is not None and fold_forced is not None:
            forced[:, held_out] = fold_forced
    return scores, forced


def policy_from_calibration(run: ExitRun, calibration: Calibration) -> ExitPolicy:
    changes: dict = {"policy": calibration.policy}
    if calibration.thresholds:
        changes["thresholds"] = list(calibration.thresholds)
    changes.update(calibration.params)
    return run.policy(update(run.cfg.early_exit, changes))


def load_calibration(path: str | Path) -> Calibration:
    try:
        return Calibration.from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a thresholds file written by `exits calibrate` ({exc})") from None


# ----------------------------------------------------------------------------------------------------------
# evaluate


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def evaluate_run(run: ExitRun, policy: ExitPolicy, calibration: Calibration | None = None,
                 out_dir: str | Path | None = None, split: str = "test", title: str = "") -> dict:
    """Exits, accuracy and cost on `split` (default test); writes table.md, stats.json, curve.png to out_dir."""
    set_threads(run.cfg.train.threads)
    data = run.split(split)
    model, batch = run.model.eval(), run.cfg.run.batch_size
    logits, features = exit_outputs(model, data.images, features=True)
    correct = correctness(logits, data.labels)
    costs = run.costs_for(policy)
    exit_stage = decide_exits(policy, logits, features if policy.needs_features else None)
    n = len(data)

    # realised wall time on this split (one timed pass each after a warm-up; `bench` measures properly)
    run_full(model, data.images[:batch], batch)
    compact(model, data.images[:batch], policy, batch)
    full_seconds = _timed(lambda: run_full(model, data.images, batch))
    result = compact(model, data.images, policy, batch)
    sim = simulate(model, data.images, policy, batch)
    matches = bool(torch.equal(result.exit_stage, sim.exit_stage)
                   and torch.equal(result.predictions, sim.predictions))

    stats = ExitStatistics.from_exits(
        exit_stage, costs.cumulative, costs.full, correct[exit_stage, torch.arange(n)],
        wall_time_s=result.wall_time_s, full_wall_time_s=full_seconds, full_accuracy=float(correct[-1].float().mean()),
        planned_macs=calibration.macs if calibration else None,
        planned_accuracy=calibration.accuracy if calibration else None)

    curves: dict[str, list[tuple[float, float]]] = {}
    exit_points = [(float(sum(costs.body[:k + 1]) + run.costs.head[k]), float(correct[k].float().mean()))
                   for k in range(model.num_stages)]
    best_within = None
    if isinstance(policy, ThresholdPolicy):
        scores, forced = _scores(policy, logits, features if policy.needs_features else None)
        curves["shared threshold sweep (test)"] = shared_threshold_curve(scores, correct, costs.cumulative, forced)
        val = run.split("val")
        val_logits, val_features = exit_outputs(model, val.images, features=policy.needs_features)
        if isinstance(policy, GatePolicy):
            val_scores, val_forced = _out_of_fold_gate_scores(run, policy, val_logits, val_features, val.labels)
        else:
            val_scores, val_forced = _scores(policy, val_logits, val_features)
        points = []
        for p in budget_sweep(val_scores, correctness(val_logits, val.labels), costs.cumulative, forced=val_forced):
            s = summarize_exits(assign_exits(scores, p["thresholds"], forced), correct, costs.cumulative)
            points.append((s["macs"], s["accuracy"]))
        curves["MSDNet budget sweep, thresholds from val"] = points
        floor = stats.full_accuracy - 0.005 - 1e-12
        within = [pt for pts in curves.values() for pt in pts if pt[1] >= floor]
        if within:
            m, a = min(within)
            best_within = {"macs": m, "accuracy": a, "compute_saved": 1 - m / costs.full}

    report = {
        "split": split, "samples": n, "policy": policy.describe(), "statistics": stats.to_dict(),
        "exit_accuracy": correct.float().mean(1).tolist(), "costs": costs.to_dict(),
        "compact_matches_simulate": matches, "compact_stage_batch_sizes": result.stage_batch_sizes,
        "calibration": calibration.to_dict() if calibration else None,
        "curves": {k: [list(p) for p in v] for k, v in curves.items()},
        "best_on_test_within_0.5pt (selected on test, optimistic)": best_within,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(stats.table(title or f"{run.cfg.data.dataset} {split}: {policy.describe()}") + "\n")
        (out / "stats.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_accuracy_vs_compute(out / "curve.png", curves, costs.full,
                                 operating_point=(stats.average_macs, stats.accuracy), exit_points=exit_points,
                                 full_accuracy=stats.full_accuracy,
                                 title=title or f"{run.cfg.data.dataset} ({split}), {policy.describe()}")
    report["table"] = stats.table(title)
    return report


def evaluate_anytime(run: ExitRun, budget_ms: float, answer: str = "confident", split: str = "test",
                     out_dir: str | Path | None = None) -> dict:
    """Anytime prediction with a time budget per batch of `run.batch_size`: how deep each batch got, and the
    accuracy of the best-so-far answers. Costs count the stages each batch ran, not the answering exit."""
    set_threads(run.cfg.train.threads)
    data = run.split(split)
    model, batch = run.model.eval(), run.cfg.run.batch_size
    anytime(model, data.images[:batch], budget_ms, answer)  # warm-up
    depth, correct, wall = [], [], 0.0
    for images, labels in zip(data.images.split(batch), data.labels.split(batch)):
        result = anytime(model, images, budget_ms, answer)
        depth.append(torch.full((len(labels),), result.stages_run - 1, dtype=torch.long))
        correct.append(result.predictions == labels)
        wall += result.wall_time_s
    full_correct = correctness(exit_outputs(model, data.images)[0][-1:], data.labels)[0]
    stats = ExitStatistics.from_exits(torch.cat(depth), run.costs.cumulative, run.costs.full, torch.cat(correct),
                                      wall_time_s=wall, full_accuracy=float(full_correct.float().mean()))
    title = f"{run.cfg.data.dataset} {split}: anytime, {budget_ms:g} ms per batch of {batch}, answer '{answer}'"
    report = {"split": split, "budget_ms": budget_ms, "answer": answer, "statistics": stats.to_dict(),
              "table": stats.table(title)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(report["table"] + "\n")
        (out / "stats.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def shared_threshold_curve(scores: Tensor, correct: Tensor, cumulative_macs: Sequence[float],
                           forced: Tensor | None = None, points: int = 60) -> list[tuple[float, float]]:
    """(average MACs, accuracy) for one threshold shared by all exits, swept over the scores' quantiles."""
    values = scores[:-1].flatten().unique()
    if values.numel() > points:
        values = values[torch.linspace(0, values.numel() - 1, points).round().long()]
    out = []
    for t in values.tolist() + [math.inf]:
        s = summarize_exits(assign_exits(scores, [t] * (scores.shape[0] - 1), forced), correct, cumulative_macs)
        out.append((s["macs"], s["accuracy"]))
    return out


# ----------------------------------------------------------------------------------------------------------
# bench


def bench_run(run: ExitRun, policy: ExitPolicy, batch_sizes: Sequence[int] = (1, 256), repeats: int = 5,
              split: str = "test", pool_size: int = 1024, log: Log = None) -> list[dict]:
    """Wall clock of the full model, `compact` and `simulate` on the split's images.

    Batch size 1: every image of the split, one at a time (latency = mean ms per image). Larger batches: the
    split repeated to `pool_size` images, in batches (throughput = images/s). Each repeat times the three
    modes back to back, in rotating order, and the median over repeats is reported, so that load from other
    processes hits all of them alike.
    """
    set_threads(run.cfg.train.threads)
    model = run.model.eval()
    images = run.split(split).images
    costs = run.costs_for(policy)
    rows = []
    for bs in batch_sizes:
        if bs == 1:
            batches = list(images.split(1))
        else:
            reps = math.ceil(pool_size / len(images))
            batches = list(images.repeat(reps, 1, 1, 1)[:pool_size].split(bs))
        count = sum(len(b) for b in batches)
        modes = {"full": lambda b: run_full(model, b),
                 "compact": lambda b: compact(model, b, policy),
                 "simulate": lambda b: simulate(model, b, policy)}
        for fn in modes.values():  # warm-up
            fn(batches[0])
        times: dict[str, list[float]] = {m: [] for m in modes}
        names = list(modes)
        for r in range(repeats):
            for name in names[r % 3:] + names[:r % 3]:
                times[name].append(_timed(lambda: [modes[name](b) for b in batches]))
        exit_stage = torch.cat([compact(model, b, policy).exit_stage for b in batches])
        avg_macs = float(torch.as_tensor(costs.cumulative, dtype=torch.float64)[exit_stage].mean())
        full = statistics.median(times["full"])
        for name in names:
            t = statistics.median(times[name])
            macs = costs.full if name == "full" else (avg_macs if name == "compact" else costs.cumulative[-1])
            rows.append({"batch_size": bs, "mode": name, "images": count, "seconds": t,
                         "ms_per_image": 1e3 * t / count, "images_per_s": count / t, "speedup_vs_full": full / t,
                         "counted_macs_fraction": macs / costs.full,
                         "min_seconds": min(times[name]), "max_seconds": max(times[name])})
            if log:
                log(f"batch {bs:>4} {name:>8}: {1e3 * t / count:8.3f} ms/image  {count / t:9.1f} images/s  "
                    f"x{full / t:.2f} vs full")
    return rows


def format_bench(rows: Sequence[dict], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| batch | mode | ms / image | images / s | speed-up vs full (wall) | counted MACs vs full |"
              , "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['mode']} | {r['ms_per_image']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['speedup_vs_full']:.2f}x | {100 * r['counted_macs_fraction']:.1f}% |")
    return "\n".join(lines)
