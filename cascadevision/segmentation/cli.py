"""`cascadevision segment train|eval|predict|presets`: semantic segmentation from the command line.

    cascadevision segment train cascade_r18 --train-images D/images/train --train-labels D/semantic/train \\
        --val-images D/images/val --val-labels D/semantic/val --out runs/seg [--set train.max_iters=500] [--resume]
    cascadevision segment eval runs/seg/checkpoints/final.pth --images D/images/val --labels D/semantic/val
    cascadevision segment predict runs/seg/checkpoints/final.pth D/images/val --out preds
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `segment` command (with its own sub-commands) to a `add_subparsers()` object."""
    parser = subparsers.add_parser("segment", help="semantic segmentation: CASCADE decoder (train, eval, predict)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="segment_command", required=True)

    p = sub.add_parser("train", help="train a segmentation model (works under torchrun for DDP)")
    p.add_argument("config", help="a preset name (see `cascadevision segment presets`) or a YAML config file")
    p.add_argument("--train-images", help="directory of training images")
    p.add_argument("--train-labels", help="directory of label-map PNGs named like the images (255 = ignore)")
    p.add_argument("--val-images")
    p.add_argument("--val-labels")
    p.add_argument("--classes", help="JSON list of class names (default: semantic_classes.json near the labels)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plots)")
    p.add_argument("--weights", default="", help="initial weights: a checkpoint or an ImageNet ResNet state dict")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the run directory's latest checkpoint (or the given one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints, config and logs are removed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.loss.mutation=true (repeatable)")

    p = sub.add_parser("eval", help="per-class IoU and Dice, mIoU and mDice of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--images", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--out", default=None, help="directory for metrics.json and metrics.md")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("predict", help="colour overlays and label PNGs for images or directories")
    p.add_argument("checkpoint")
    p.add_argument("inputs", nargs="+", help="image files or directories")
    p.add_argument("--out", required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")

    sub.add_parser("presets", help="list the segmentation presets")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.segment_command == "presets":
        from .config import seg_preset_names
        print("\n".join(seg_preset_names()))
        return 0
    if args.segment_command == "train":
        from ..config import parse_overrides, update
        from .config import load_seg_config
        from .engine import run_training

        cfg = load_seg_config(args.config, args.overrides)
        flags = {"train_images": args.train_images, "train_labels": args.train_labels,
                 "val_images": args.val_images, "val_labels": args.val_labels, "classes": args.classes}
        cfg = update(cfg, {"data": {k: v for k, v in flags.items() if v}})
        cfg = update(cfg, parse_overrides(args.overrides))  # command-line --set wins over the flags
        metrics = run_training(cfg, args.out, resume=args.resume, weights=args.weights,
                               progress=not args.no_progress, overwrite=args.overwrite)
        if "mIoU" in metrics:
            from .metrics import format_scores
            print(format_scores(metrics, title=cfg.model.preset or "class"))
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("IoU", "Dice")}, indent=2))
        return 0
    if args.segment_command == "eval":
        from .engine import run_evaluation
        from .metrics import format_scores

        scores = run_evaluation(args.checkpoint, args.images, args.labels, args.out, device=args.device,
                                progress=not args.no_progress)
        print(format_scores(scores))
        return 0
    if args.segment_command == "predict":
        from pathlib import Path

        from .engine import run_prediction

        summary = run_prediction(args.checkpoint, args.inputs, args.out, device=args.device,
                                 progress=not args.no_progress, alpha=args.alpha)
        print(f"wrote {len(summary)} overlays to {Path(args.out) / 'overlays'} and label maps to "
              f"{Path(args.out) / 'labels'}")
        return 0
    raise AssertionError(args.segment_command)
