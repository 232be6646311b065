"""The `cascadevision` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import CascadeVisionError
from .runtime import configure_cpu_runtime

configure_cpu_runtime()  # before anything imports torch: OpenMP reads OMP_WAIT_POLICY once, when torch loads


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.rpn.nms_iou=0.6 (repeatable)")


def _add_early_exit(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early exit (cascade models)")
    g.add_argument("--early-exit", choices=["none", "max_prob", "entropy", "margin"],
                   help="region-level exit policy: confident RoIs stop being refined")
    g.add_argument("--exit-threshold", type=float, help="confidence to leave (entropy: at most this)")
    g.add_argument("--exit-background", type=float, help="drop RoIs once P(background) >= this")
    g.add_argument("--exit-prune", type=float,
                   help="stop refining (but keep) RoIs whose best class probability is below this")
    g.add_argument("--time-budget-ms", type=float, help="anytime inference: stop the cascade past this budget")


def _model_overrides(args) -> dict:
    """--set values and early-exit options for eval/predict: only model.* keys make sense there."""
    from .config import parse_overrides
    from .errors import ConfigError

    nested = parse_overrides(args.overrides)
    extra = set(nested) - {"model"}
    if extra:
        raise ConfigError(f"only model.* keys can be overridden here, got {', '.join(sorted(extra))}")
    model = nested.get("model", {})
    options = {"policy": args.early_exit, "threshold": args.exit_threshold,
               "background_threshold": args.exit_background, "prune_threshold": args.exit_prune,
               "time_budget_ms": args.time_budget_ms}
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        model.setdefault("roi_head", {}).setdefault("early_exit", {}).update(options)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascadevision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic COCO-format instance segmentation dataset")
    p.add_argument("out")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)

    p = sub.add_parser("train", help="train a detector (works under torchrun for DDP)")
    p.add_argument("config", help="a preset name (see `cascadevision presets`) or a YAML config file")
    p.add_argument("--train-ann")
    p.add_argument("--train-images")
    p.add_argument("--train-semantic", help="directory of semantic label-map PNGs (HTC)")
    p.add_argument("--val-ann")
    p.add_argument("--val-images")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plots)")
    p.add_argument("--weights", default="", help="initial weights: checkpoint, MMDetection .pth or ImageNet ResNet")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the run directory's latest checkpoint (or the given one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints, config and logs are removed)")
    p.add_argument("--no-progress", action="store_true")
    _add_set(p)

    p = sub.add_parser("eval", help="COCO bbox/segm evaluation of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--ann", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", default=None, help="directory for results.json and metrics.json")
    p.add_argument("--class-map", default=None, metavar="MODEL=DATASET,...|FILE",
                   help="how the checkpoint's classes relate to the annotation file's categories when they differ: "
                        "model class name or id = dataset category name or id (or a JSON/YAML file of such pairs); "
                        "unmapped model classes are not scored")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _add_set(p)
    _add_early_exit(p)

    p = sub.add_parser("predict", help="draw predictions on images and write COCO-style results")
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+", help="image files or directories")
    p.add_argument("--out", required=True)
    p.add_argument("--score-thr", type=float, default=0.3)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _add_set(p)
    _add_early_exit(p)

    p = sub.add_parser("demo", help="synthetic data -> train a small model -> evaluate -> pictures")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="training seed (initial weights, data order, augmentation)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("weights", help="inspect or convert weight files")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    w = wsub.add_parser("inspect", help="format, keys summary and classes of a weights file")
    w.add_argument("file")
    w = wsub.add_parser("convert", help="convert a checkpoint to safetensors")
    w.add_argument("src")
    w.add_argument("dst")

    sub.add_parser("presets", help="list the model presets")

    p = sub.add_parser("check-data", help="check a COCO dataset: annotations, and every image's existence, "
                                          "readability and size; lists every problem at once")
    p.add_argument("ann", help="COCO annotation JSON")
    p.add_argument("images", help="image directory")
    p.add_argument("--semantic", default=None, help="directory of semantic label-map PNGs to check too")
    p.add_argument("--quick", action="store_true", help="read image headers only (what train runs at start)")

    from .early_exit.cli import add_parser as add_exits_parser
    from .segmentation.cli import add_parser as add_segment_parser

    add_exits_parser(sub)
    add_segment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CascadeVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PermissionError as exc:  # a location the early checks could not foresee
        print(f"error: {exc.filename or ''}: permission denied", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "synth":
        from .data import generate_synthetic

        paths = generate_synthetic(args.out, num_images=args.num_images, size=args.size, seed=args.seed,
                                   val_fraction=args.val_fraction)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    if args.command == "weights":
        from .weights import convert_to_safetensors, inspect_weights

        if args.weights_command == "inspect":
            print(json.dumps(inspect_weights(args.file), indent=2))
        else:
            if not args.dst.endswith(".safetensors"):
                from .errors import CheckpointError
                raise CheckpointError(f"{args.dst}: the output of convert must end in .safetensors")
            count = convert_to_safetensors(args.src, args.dst)
            print(f"wrote {count} tensors to {args.dst}")
        return 0
    if args.command == "check-data":
        from .data import check_dataset, format_problems

        problems = check_dataset(args.ann, args.images, semantic_dir=args.semantic, deep=not args.quick,
                                 progress=True)
        if problems:
            print(format_problems(problems, limit=200))
            return 1
        print(f"{args.ann}: no problems found")
        return 0
    if args.command == "presets":
        from .models import preset_names

        print("\n".join(preset_names()))
        return 0
    if args.command == "train":
        from .config import load_config, parse_overrides, update
        from .pipeline import run_training

        cfg = load_config(args.config, args.overrides)
        data = {k: v for k, v in {
            "train_ann": args.train_ann, "train_images": args.train_images, "train_semantic": args.train_semantic,
            "val_ann": args.val_ann, "val_images": args.val_images}.items() if v}
        cfg = update(cfg, {"data": data})
        cfg = update(cfg, parse_overrides(args.overrides))  # command-line --set wins over the flags
        metrics = run_training(cfg, args.out, resume=args.resume, weights=args.weights,
                               progress=not args.no_progress, overwrite=args.overwrite)
        if metrics and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
            print(format_metrics(metrics, title=cfg.model.preset or "model"))
        return 0
    if args.command == "eval":
        from .pipeline import run_evaluation

        metrics = run_evaluation(args.checkpoint, args.ann, args.images, args.out,
                                 overrides=_model_overrides(args), device=args.device,
                                 progress=not args.no_progress, class_map=args.class_map)
        print(format_metrics(metrics))
        if "early_exit" in metrics:
            print(format_exit_summary(metrics["early_exit"]))
        return 0
    if args.command == "predict":
        from .pipeline import run_prediction

        summary = run_prediction(args.checkpoint, args.inputs, args.out, score_thr=args.score_thr,
                                 overrides=_model_overrides(args), device=args.device,
                                 progress=not args.no_progress)
        failed = [entry for entry in summary if "error" in entry]
        print(f"wrote {len(summary) - len(failed)} overlays and results.json to {Path(args.out)}")
        if failed:
            print(f"skipped {len(failed)} unreadable file(s):", file=sys.stderr)
            for entry in failed:
                print(f"  {entry['error']}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, num_images=args.num_images, max_iters=args.max_iters, progress=not args.no_progress,
                 seed=args.seed)
        return 0
    if args.command == "exits":
        from .early_exit.cli import run as run_exits

        return run_exits(args)
    if args.command == "segment":
        from .segmentation.cli import run as run_segment

        return run_segment(args)
    raise AssertionError(args.command)


def format_metrics(metrics: dict, title: str = "") -> str:
    """An AP table: one row per IoU type."""
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = [f"| {title or 'metric':<10} | " + " | ".join(f"{c:>5}" for c in cols) + " |",
             "|" + "-" * 12 + "|" + "|".join("-" * 7 for _ in cols) + "|"]
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            row = metrics[iou_type]
            lines.append(f"| {iou_type:<10} | " + " | ".join(f"{row.get(c, float('nan')):5.1f}" for c in cols) + " |")
    return "\n".join(lines)


def format_exit_summary(summary: dict) -> str:
    """Per-stage RoI counts of a cascade and the RoI-head compute it spent."""
    lines = ["| stage | RoIs in | left (confident) | dropped (background) | masks from stages 1..t |",
             "|---|---|---|---|---|"]
    for t, (rois, exits, dropped, masks) in enumerate(zip(summary["rois"], summary["exits"], summary["dropped"],
                                                           summary["masks"])):
        lines.append(f"| {t + 1} | {rois} | {exits} | {dropped} | {masks} |")
    lines.append(f"RoI-head compute: {summary['roi_head_gmacs']:.2f} GMAC vs {summary['full_cascade_gmacs']:.2f} "
                 f"for the full cascade on the same proposals ({100 * summary['saved_fraction']:.1f}% saved)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
