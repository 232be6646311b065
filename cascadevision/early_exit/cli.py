"""`cascadevision exits train|calibrate|evaluate|bench`: early-exit classifiers on the bundled digits;
`cascadevision exits calibrate-detector`: a cascade detector's region-level exit settings for a target.

    cascadevision exits train --preset mobile                       # -> runs/exits-mobile/model.pth
    cascadevision exits calibrate runs/exits-mobile --max-drop 0.5  # -> runs/exits-mobile/thresholds.json
    cascadevision exits evaluate runs/exits-mobile                  # with those thresholds -> runs/exits-mobile/eval/
    cascadevision exits bench runs/exits-mobile --batch-sizes 1 256 # wall clock, with those thresholds
    cascadevision exits train --preset cloud --dataset digits_hard --out runs/hard
    cascadevision exits calibrate runs/hard --budget 0.5 --policy entropy --out runs/hard/budget.json
    cascadevision exits evaluate runs/hard --thresholds runs/hard/budget.json --out runs/hard/eval-budget
    cascadevision exits evaluate runs/hard --set run.mode=anytime --set run.budget_ms=20   # time budget
    cascadevision exits calibrate-detector CKPT --ann VAL.json --images VAL/ --max-ap-drop 0.5 --out exit.yaml
    cascadevision eval CKPT --ann TEST.json --images TEST/ --exit-config exit.yaml   # realised beside planned
    cascadevision exits export runs/exits-mobile --format onnx --out exits.onnx    # every exit's logits

A run is a directory (or its model.pth). `exits train` refuses a directory that already holds something unless
given --overwrite. `exits evaluate` and `exits bench` use the run's thresholds.json when `exits calibrate`
wrote one (and say so); --thresholds FILE or --policy NAME choose otherwise. `exits evaluate` runs `compact`
(real early exit) and checks it against `simulate`; with run.mode=anytime it runs every batch under the time
budget instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..commands import add_export_flags, add_set
from ..config import parse_overrides, update
from ..engine.rundir import RunLock, prepare_run_dir, remove_leftovers
from ..errors import ConfigError
from .policies import POLICY_KINDS
from .pipeline import (EVAL_DIR, MODEL_FILE, RUN_FILES, THRESHOLDS_FILE, bench_run, calibrate_run, evaluate_anytime,
                       evaluate_run, format_bench, load_calibration, load_run, policy_from_calibration, run_checkpoint,
                       run_thresholds, set_threads, train_run)
from .presets import DEFAULT_PRESET, exits_config, preset_names


def _add_set(p: argparse.ArgumentParser) -> None:
    add_set(p, "early_exit.threshold=0.9")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `exits` command (with its own sub-commands) to the main CLI's subparsers."""
    parser = subparsers.add_parser("exits", help="early-exit classifiers (train, calibrate, evaluate, bench); a cascade "
                                            "detector's exit settings (calibrate-detector)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="exits_command", required=True)

    p = sub.add_parser("train", help="train a multi-exit model (and its exit gates) on the digits")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=preset_names())
    p.add_argument("--dataset", choices=["digits", "digits_hard"], help="shorthand for --set data.dataset=...")
    p.add_argument("--out", help="run directory: model.pth is written there (default: runs/exits-PRESET)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its model.pth, thresholds.json and eval/ are removed)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    _add_set(p)

    p = sub.add_parser("calibrate", help="choose per-exit thresholds on the val split")
    p.add_argument("checkpoint", metavar="RUN", help="a run directory (of `exits train`) or its model.pth")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--max-drop", type=float, help="accuracy points allowed below the full model, e.g. 0.5")
    goal.add_argument("--target-accuracy", type=float, help="accuracy to reach, in [0, 1]")
    goal.add_argument("--budget", type=float, help="average compute as a fraction of the full model, e.g. 0.5")
    p.add_argument("--policy", choices=[k for k in POLICY_KINDS if k != "none"], help="default: the checkpoint's")
    p.add_argument("--out", help="thresholds JSON (default: the run's thresholds.json)")
    _add_set(p)

    p = sub.add_parser("calibrate-detector",
                       help="choose a cascade detector's region-exit settings on a validation split (YAML for eval)",
                       description="One pass of the plain model over the split, then every exit setting of the grid "
                                   "(pruner, background drop, max_prob confident exit, box-only masks below a score, "
                                   "fewer RPN proposals) "
                                   "is replayed from the recorded stage outputs, and the cheapest meeting "
                                   "--max-ap-drop (or the best within --budget) is written as a YAML for "
                                   "`cascadevision eval/predict --exit-config FILE`. The AP is segm AP for mask "
                                   "models, else bbox AP; compute is the RoI heads' MACs against the plain model's "
                                   "on the same images.")
    p.add_argument("checkpoint", metavar="CKPT", help="a detector checkpoint written by `cascadevision train`")
    p.add_argument("--ann", required=True, help="COCO annotations of the validation split")
    p.add_argument("--images", required=True, help="directory of its images")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--max-ap-drop", type=float, help="AP points allowed below the plain model, e.g. 0.5")
    goal.add_argument("--budget", type=float,
                      help="RoI-head compute as a fraction of the plain model's, e.g. 0.5: the best AP within it")
    p.add_argument("--out", default="exit_config.yaml", help="the YAML to write (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default %(default)s)")
    p.add_argument("--show", action="store_true", help="print every setting scored")

    p = sub.add_parser("evaluate", help="exit table, stats.json and the accuracy-vs-compute PNG on the test split")
    p.add_argument("checkpoint", metavar="RUN", help="a run directory (of `exits train`) or its model.pth")
    _add_policy_choice(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", help="output directory (default: the run's eval/)")
    _add_set(p)

    p = sub.add_parser("bench", help="wall clock: full model vs compact early exit vs simulate")
    p.add_argument("checkpoint", metavar="RUN", help="a run directory (of `exits train`) or its model.pth")
    _add_policy_choice(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the rows as JSON here")
    _add_set(p)

    p = sub.add_parser("export", help="write the full multi-exit model as ONNX or a torch.export program",
                       description="The whole model (no early exit in the graph): a batch of images in (float32 NCHW, "
                                   "batch dynamic, the run's data.image_size fixed), every exit's logits out "
                                   "(logits_exit1 .. logits_exitN, the last is the full model's); apply the "
                                   "calibrated thresholds to them outside the graph. "
                                   "export.runtime.load_dense runs the file.")
    p.add_argument("checkpoint", metavar="RUN", help="a run directory (of `exits train`) or its model.pth")
    add_export_flags(p)
    return parser


def _add_policy_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thresholds", help="a JSON from `exits calibrate` (default: the run's thresholds.json if "
                                        "there is one, else the checkpoint's policy)")
    p.add_argument("--policy", choices=POLICY_KINDS,
                   help="use this policy with its configured thresholds (not the run's thresholds.json)")


def _policy(run, checkpoint: Path, args):
    """The policy of a command and its calibration: --thresholds FILE, else --policy NAME (its configured
    thresholds), else the run's thresholds.json (said so), else the checkpoint's policy."""
    if args.thresholds and args.policy:
        raise ConfigError("give --thresholds (a calibrated policy) or --policy (a configured one), not both")
    thresholds = args.thresholds
    if not thresholds and not args.policy:
        thresholds = run_thresholds(checkpoint)
        if thresholds:
            print(f"thresholds: {thresholds} (from `exits calibrate`; --thresholds FILE or --policy NAME to use "
                  "others)")
    if thresholds:
        calibration = load_calibration(thresholds)
        return policy_from_calibration(run, calibration), calibration
    cfg = run.cfg.early_exit if not args.policy else update(run.cfg.early_exit, {"policy": args.policy})
    return run.policy(cfg), None


def _train(args) -> int:
    overrides = parse_overrides(args.overrides)
    if args.dataset:
        overrides.setdefault("data", {}).setdefault("dataset", args.dataset)
    cfg = exits_config(args.preset, overrides)  # a config error comes before anything is written
    out = Path(args.out or f"runs/exits-{args.preset}")
    prepare_run_dir(out, overwrite=args.overwrite, run_files=RUN_FILES, resumable=False)
    with RunLock(out):
        remove_leftovers(out)
        train_run(cfg, out, log=None if args.quiet else print)
    print(f"wrote {out / MODEL_FILE}")
    return 0


def run(args) -> int:
    """Dispatch `cascadevision exits <command>`; returns the exit status."""
    command = args.exits_command
    if command == "train":
        return _train(args)

    if command == "calibrate-detector":
        return _calibrate_detector(args)
    if command == "export":
        from ..tasks.exits import EXITS  # lazy: the export machinery loads for this command only

        meta = EXITS.export(run_checkpoint(args.checkpoint), args.out, args.format)
        print(f"wrote {args.out} ({args.format}; outputs {', '.join(meta['outputs'])})")
        return 0

    checkpoint = run_checkpoint(args.checkpoint)
    run_ = load_run(checkpoint, parse_overrides(args.overrides))
    set_threads(run_.cfg.train.threads)
    if command == "calibrate":
        policy_cfg = (run_.cfg.early_exit if not args.policy
                      else update(run_.cfg.early_exit, {"policy": args.policy}))
        _, calibration = calibrate_run(run_, policy_cfg, target_accuracy=args.target_accuracy,
                                       max_drop=args.max_drop, budget_fraction=args.budget)
        out = Path(args.out) if args.out else checkpoint.parent / THRESHOLDS_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
        shown = ", ".join("closed" if t in (float("inf"), float("-inf")) else f"{t:.4g}"
                          for t in calibration.thresholds) or json.dumps(calibration.params)
        print(f"{calibration.policy} thresholds: {shown}{'' if calibration.met else '  (target NOT met)'}")
        print(f"planned on val: accuracy {100 * calibration.accuracy:.2f}% "
              f"(full model {100 * calibration.target['full_accuracy']:.2f}%), "
              f"{calibration.macs / 1e6:.3f} MMACs per sample, compute saved {100 * calibration.compute_saved:.1f}%, "
              f"exits " + " / ".join(f"{100 * f:.1f}%" for f in calibration.fractions))
        print(f"wrote {out}")
        return 0
    if command == "evaluate":
        out = Path(args.out) if args.out else checkpoint.parent / EVAL_DIR
        if run_.cfg.run.mode not in ("compact", "simulate", "anytime"):
            raise ConfigError(f"run.mode must be compact, simulate or anytime, got {run_.cfg.run.mode!r}")
        if run_.cfg.run.mode == "anytime":  # no exit policy: every batch runs until the budget is spent
            report = evaluate_anytime(run_, run_.cfg.run.budget_ms, run_.cfg.run.anytime_answer, args.split, out)
            print(report["table"])
            print(f"wrote {out / 'table.md'}, {out / 'stats.json'}")
            return 0
        policy, calibration = _policy(run_, checkpoint, args)
        report = evaluate_run(run_, policy, calibration, out, split=args.split)
        print(report["table"])
        print(f"compact == simulate: {report['compact_matches_simulate']}")
        print(f"wrote {out / 'table.md'}, {out / 'stats.json'}, {out / 'curve.png'}")
        return 0
    if command == "bench":
        policy, _ = _policy(run_, checkpoint, args)
        rows = bench_run(run_, policy, args.batch_sizes, args.repeats)
        print(format_bench(rows, f"{run_.cfg.data.dataset}: {policy.describe()}"))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    raise AssertionError(command)


def _calibrate_detector(args) -> int:
    # function-local: the detection task (datasets, evaluator, models) loads only for this command, so the CLI
    # start-up stays light
    from .detector_calibration import calibrate_detector, format_candidates, load_replay, write_calibration

    if not str(args.out).endswith((".yaml", ".yml")):
        raise ConfigError(f"--out {args.out}: the exit config is YAML; name it .yaml or .yml")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise ConfigError(f"--budget {args.budget}: a fraction of the plain model's RoI-head compute, in (0, 1]")
    if args.max_ap_drop is not None and args.max_ap_drop < 0:
        raise ConfigError(f"--max-ap-drop {args.max_ap_drop}: AP points, at least 0")
    replay = load_replay(args.checkpoint, args.ann, args.images, device=args.device)
    print(f"recorded {len(replay.images)} images in {replay.seconds:.1f} s; searching", flush=True)
    log = None
    if args.show:
        def log(c):
            shown = ", ".join(f"{k}={v}" for k, v in c.exit.items())
            print(f"  scored {shown}: bbox AP {c.bbox_ap}, segm AP {c.segm_ap}, {100 * c.fraction:.1f}% compute",
                  flush=True)
    calibration, scored = calibrate_detector(replay, max_ap_drop=args.max_ap_drop, budget=args.budget, log=log)
    if args.show:
        print(format_candidates(scored, calibration.metric))
    out = write_calibration(calibration, args.out, source=args.ann)
    shown = ", ".join(f"{k}={v:g}" if not isinstance(v, str) else f"{k}={v}" for k, v in calibration.exit.items())
    print(f"chosen: {shown}{'' if calibration.met else '  (target NOT met)'}")
    planned, plain = calibration.planned, calibration.plain
    aps = "; ".join(f"{m} AP {planned[f'{m}_ap']:.1f} (plain {plain[f'{m}_ap']:.1f})"
                    for m in ("bbox", "segm") if f"{m}_ap" in planned)
    print(f"planned on {len(replay.images)} validation images: {aps}; target metric {calibration.metric} AP")
    print(f"planned RoI-head compute: {planned['roi_head_gmacs']:.2f} GMAC/image vs {plain['roi_head_gmacs']:.2f} for "
          f"the plain model ({100 * planned['compute_fraction']:.1f}%, {100 * (1 - planned['compute_fraction']):.1f}% "
          f"saved); {calibration.settings_scored} settings scored in {calibration.seconds:.0f} s")
    print(f"wrote {out}: pass it to `cascadevision eval CKPT --exit-config {out} ...` (or predict)")
    return 0
