"""The `cascadevision` command line."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .commands import DETECTION, SEGMENTATION, add_set, model_overrides
from .errors import CascadeVisionError, CheckpointError
from .runtime import configure_cpu_runtime

configure_cpu_runtime()  # before anything imports torch: OpenMP reads OMP_WAIT_POLICY once, when torch loads

__all__ = ["build_parser", "main", "format_metrics", "format_exit_summary"]


def _add_set(p: argparse.ArgumentParser) -> None:
    add_set(p, DETECTION.set_example)


_model_overrides = model_overrides  # the old private name


def build_parser() -> argparse.ArgumentParser:
    # the exits and segment parsers load their task packages (torch): importing them here, not at the top,
    # keeps `import cascadevision.cli` light until a parser is built (configure_cpu_runtime must run first)
    from .early_exit.cli import add_parser as add_exits_parser
    from .segmentation.cli import add_parser as add_segment_parser

    parser = argparse.ArgumentParser(prog="cascadevision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # the defaults are generate_synthetic's (cascadevision.data.synth): a flag not given is not passed on
    p = sub.add_parser("synth", help="write a synthetic COCO-format instance segmentation dataset",
                       description="Flags left out take generate_synthetic's defaults.",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("out")
    p.add_argument("--num-images", type=int, help="images in both splits")
    p.add_argument("--size", type=int, help="side of the square images, in pixels")
    p.add_argument("--seed", type=int)
    p.add_argument("--val-fraction", type=float, help="share of the images in the val split")

    DETECTION.add_train(sub)
    DETECTION.add_eval(sub)
    DETECTION.add_predict(sub)

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

    DETECTION.add_presets(sub)

    p = sub.add_parser("check-data", help="check a COCO dataset: annotations, and every image's existence, "
                                          "readability and size; lists every problem at once")
    p.add_argument("ann", help="COCO annotation JSON")
    p.add_argument("images", help="image directory")
    p.add_argument("--semantic", default=None, help="directory of semantic label-map PNGs to check too")
    p.add_argument("--quick", action="store_true", help="read image headers only (what train runs at start)")

    add_exits_parser(sub)
    add_segment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # an old config key a person wrote (YAML, --set) is read, and said so: Python hides library deprecations
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"cascadevision\.config")
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
    # Each command imports what it needs when it runs, so that `cascadevision --help` and a typo answer
    # quickly (no pycocotools, trainer or models): the CLI start-up stays light on purpose.
    if args.command in ("train", "eval", "predict", "presets"):
        return DETECTION.run(args.command, args)
    if args.command == "synth":
        from .data.synth import generate_synthetic  # CLI start-up stays light (see above)

        options = {k: getattr(args, k) for k in ("num_images", "size", "seed", "val_fraction") if hasattr(args, k)}
        paths = generate_synthetic(args.out, **options)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    if args.command == "weights":
        from .io.weights import convert_to_safetensors, inspect_weights  # CLI start-up stays light (see above)

        if args.weights_command == "inspect":
            print(json.dumps(inspect_weights(args.file), indent=2))
        else:
            if not args.dst.endswith(".safetensors"):
                raise CheckpointError(f"{args.dst}: the output of convert must end in .safetensors")
            count = convert_to_safetensors(args.src, args.dst)
            print(f"wrote {count} tensors to {args.dst}")
        return 0
    if args.command == "check-data":
        from .data.check import check_dataset, format_problems  # CLI start-up stays light (see above)

        problems = check_dataset(args.ann, args.images, semantic_dir=args.semantic, deep=not args.quick,
                                 progress=True)
        if problems:
            print(format_problems(problems, limit=200))
            return 1
        print(f"{args.ann}: no problems found")
        return 0
    if args.command == "demo":
        from .demo import run_demo  # CLI start-up stays light (see above)

        run_demo(args.out, num_images=args.num_images, max_iters=args.max_iters, progress=not args.no_progress,
                 seed=args.seed)
        return 0
    if args.command == "exits":
        from .early_exit.cli import run as run_exits  # CLI start-up stays light (see above)

        return run_exits(args)
    if args.command == "segment":
        return SEGMENTATION.run(args.segment_command, args)
    raise AssertionError(args.command)


def __getattr__(name: str):
    # `format_metrics` and `format_exit_summary` moved to `cascadevision.tasks.detection` (the task's metric
    # tables); loaded on first use so that importing the CLI stays light.
    if name in ("format_metrics", "format_exit_summary"):
        from .tasks import detection
        return getattr(detection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
