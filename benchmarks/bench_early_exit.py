"""Early exit on the bundled digits: accuracy vs compute, compute saved at <= 0.5 point accuracy drop, planned
(val) vs realised (test) cost, and wall clock (batch-1 latency, batch-256 throughput) of real batch compaction
against the full model.

    python benchmarks/bench_early_exit.py                          # digits + digits_hard (+ a model cascade)
    python benchmarks/bench_early_exit.py --datasets digits --repeats 3 --no-cascade

Models are trained once into --out (default runs/bench_early_exit/<dataset>/model.pth) and reused; --retrain
trains them again. Thresholds are always chosen on the val split and reported on the test split. Wall-clock
numbers use one thread (--threads) and are as noisy as the machine is busy: each repeat times the full model,
compact and simulate back to back and the median is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascadevision.config import update  # noqa: E402
from cascadevision.early_exit.pipeline import (bench_run, calibrate_run, evaluate_run, format_bench,  # noqa: E402
                                               load_run, set_threads, train_run)
from cascadevision.early_exit.presets import exits_config  # noqa: E402

POLICIES = [  # (name, policy overrides)
    ("max_prob", {"policy": "max_prob"}),
    ("entropy", {"policy": "entropy"}),
    ("margin", {"policy": "margin"}),
    ("patience", {"policy": "patience"}),
    ("gate", {"policy": "gate"}),
    ("gate+pruner", {"policy": "gate", "prune_threshold": 0.05}),
]


def get_run(out: Path, name: str, overrides: list[str], retrain: bool):
    path = out / name / "model.pth"
    if path.exists() and not retrain:
        print(f"[{name}] reusing {path}", flush=True)
        return load_run(path)
    cfg = exits_config("cloud", overrides)
    print(f"[{name}] training ({' '.join(overrides)})", flush=True)
    return train_run(cfg, out / name, log=lambda s: print(f"  {s}", flush=True))


def evaluate_policies(run, out: Path, name: str) -> list[dict]:
    rows = []
    for label, changes in POLICIES:
        policy_cfg = update(run.cfg.early_exit, changes)
        policy, plan = calibrate_run(run, policy_cfg, max_drop=0.5)
        report = evaluate_run(run, policy, plan, out / name / f"eval_{label}",
                              title=f"{name}: {label} at <= 0.5 pt (thresholds from val)")
        rows.append(summary_row(label, "<= 0.5 pt below full (val)", plan, report))
    policy, plan = calibrate_run(run, update(run.cfg.early_exit, {"policy": "max_prob"}), budget_fraction=0.5)
    report = evaluate_run(run, policy, plan, out / name / "eval_max_prob_budget50",
                          title=f"{name}: max_prob, budget 50% of the full model (MSDNet calibration on val)")
    rows.append(summary_row("max_prob", "budget 50% (val)", plan, report))
    return rows


def summary_row(label: str, target: str, plan, report: dict) -> dict:
    s = report["statistics"]
    return {"policy": label, "target": target, "planned_accuracy": plan.accuracy, "planned_saved": plan.compute_saved,
            "planned_full_accuracy": plan.target["full_accuracy"], "test_accuracy": s["accuracy"],
            "test_full_accuracy": s["full_accuracy"], "drop_points": 100 * (s["full_accuracy"] - s["accuracy"]),
            "realised_saved": s["compute_saved"], "planned_macs": plan.macs, "realised_macs": s["average_macs"],
            "fractions": s["fractions"], "average_depth": s["average_depth"], "met_on_val": plan.met,
            "compact_matches_simulate": report["compact_matches_simulate"],
            "thresholds": plan.thresholds, "params": plan.params, "curves": report["curves"],
            "best_on_test_within_0.5pt": report["best_on_test_within_0.5pt (selected on test, optimistic)"],
            "exit_accuracy": report["exit_accuracy"], "costs": report["costs"]}


def policy_table(name: str, rows: list[dict]) -> str:
    lines = [f"### {name}: thresholds from val, numbers on test", "",
             "| policy | target | val acc (full) | planned saved | test acc (full) | drop pt (+ = below full) | realised saved "
             "| exits % | depth |", "|---|---|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        exits = "/".join(f"{100 * f:.0f}" for f in r["fractions"])
        lines.append(f"| {r['policy']} | {r['target']} | {100 * r['planned_accuracy']:.2f} "
                     f"({100 * r['planned_full_accuracy']:.2f}) | {100 * r['planned_saved']:.1f}% | "
                     f"{100 * r['test_accuracy']:.2f} ({100 * r['test_full_accuracy']:.2f}) | {r['drop_points']:+.2f} | "
                     f"{100 * r['realised_saved']:.1f}% | {exits} | {r['average_depth']:.2f} |")
    return "\n".join(lines)


def curve_table(name: str, row: dict, count: int = 8) -> str:
    full = row["costs"]["full"]
    lines = [f"### {name}: accuracy vs average compute on test ({row['policy']})", "",
             "| curve | compute % of full -> test accuracy % |", "|---|---|"]
    for label, points in row["curves"].items():
        points = sorted(points)
        step = max(1, len(points) // count)
        shown = points[::step] + ([points[-1]] if (len(points) - 1) % step else [])
        lines.append(f"| {label} | " + ", ".join(f"{100 * m / full:.0f}->{100 * a:.2f}" for m, a in shown) + " |")
    exits = ", ".join(f"exit {k + 1}: {100 * a:.2f}%" for k, a in enumerate(row["exit_accuracy"]))
    lines.append(f"\nsingle exits on test: {exits}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_early_exit")
    parser.add_argument("--datasets", nargs="+", default=["digits", "digits_hard"])
    parser.add_argument("--no-cascade", action="store_true", help="skip the small -> medium -> large cascade")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    runs = [(ds, [f"data.dataset={ds}", f"train.threads={args.threads}"]) for ds in args.datasets]
    if not args.no_cascade:  # three independent ResNets of widths 8, 16, 32 (x4 MACs each)
        runs.append(("digits_model_cascade", ["data.dataset=digits", "model.kind=cascade", "model.num_stages=3",
                                              "model.base_width=8", f"train.threads={args.threads}"]))
    results, texts = {}, []
    for name, overrides in runs:
        run = get_run(out, name, overrides, args.retrain)
        rows = evaluate_policies(run, out, name)
        main_row = rows[0]
        policy, _ = calibrate_run(run, update(run.cfg.early_exit, {"policy": "max_prob"}), max_drop=0.5)
        print(f"[{name}] wall clock ({policy.describe()})", flush=True)
        bench = bench_run(run, policy, (1, 256), args.repeats)
        texts += [policy_table(name, rows), curve_table(name, main_row),
                  format_bench(bench, f"{name}: wall clock, max_prob at <= 0.5 pt, {args.threads} thread(s)")]
        print("\n\n".join(texts[-3:]) + "\n", flush=True)
        results[name] = {"policies": rows, "bench": bench, "costs": run.costs.to_dict(),
                         "train_seconds": run.meta.get("train_seconds")}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text("\n\n".join(texts) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out / 'results.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
