"""The `cascadevision` command line: HTC, Cascade R-CNN and Mask R-CNN in PyTorch.

examples:
  cascadevision synth data --num-images 200 --size 256        # a synthetic COCO-format dataset to try things on
  cascadevision presets                                       # the models (parameters, what) and the YAML recipes
  cascadevision config demo_htc_r18 --set train.max_iters=100 # every value a run would use, as YAML
  cascadevision train demo_htc_r18 --out runs/demo \\
      --train-ann data/annotations/instances_train.json --train-images data/images/train \\
      --val-ann data/annotations/instances_val.json --val-images data/images/val
  cascadevision train configs/htc_r50_fpn_1x.yaml ...         # a YAML file (copy a recipe and edit it)
  cascadevision eval runs/demo/checkpoints/final.pth \\
      --ann data/annotations/instances_val.json --images data/images/val
  cascadevision predict runs/demo/checkpoints/final.pth data/images/val --out preds
  cascadevision serve runs/demo/checkpoints/final.pth         # HTTP: POST /predict, a web page at /
  cascadevision demo                                          # synthetic data -> train -> evaluate -> pictures

`cascadevision COMMAND --help` lists a command's flags and their defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .commands import (DETECTION, SEGMENTATION, HelpFormatter, add_export_flags, add_serve, add_set, model_overrides,
                       run_serve)
from .config import parse_overrides
from .errors import CascadeVisionError, CheckpointError, ConfigError
from .runtime import configure_cpu_runtime

configure_cpu_runtime()  # before anything imports torch: OpenMP reads OMP_WAIT_POLICY once, when torch loads

__all__ = ["build_parser", "main", "format_metrics", "format_exit_summary"]


def _add_set(p: argparse.ArgumentParser) -> None:
    add_set(p, DETECTION.set_example)


_model_overrides = model_overrides  # the old private name


def model_overrides_only(overrides: list[str] | None) -> dict:
    """--set values of a command that takes model.* keys only, as the model section's dict."""
    nested = parse_overrides(overrides)
    extra = set(nested) - {"model"}
    if extra:
        raise ConfigError(f"only model.* keys can be overridden here, got {', '.join(sorted(extra))}")
    return nested.get("model", {})


# Commands whose parsers are built from their packages, which load torch (a second of start-up): they are
# built only when they run; the other commands' help lists them with these lines (tests/test_cli_help.py
# checks that they are the packages' own).
_HEAVY_COMMANDS = {
    "exits": "early-exit classifiers (train, calibrate, evaluate, bench); a cascade detector's exit settings "
             "(calibrate-detector)",
    "segment": "semantic segmentation: CASCADE decoder (train, eval, predict)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command. `command`: the one about to run, when known; the `exits` and `segment`
    parsers are then built only if it is theirs, and stand as a line of help otherwise."""
    parser = argparse.ArgumentParser(prog="cascadevision", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # the defaults are generate_synthetic's (cascadevision.data.synth): a flag not given is not passed on
    p = sub.add_parser("synth", help="write a synthetic COCO-format instance segmentation dataset",
                       description="Write a synthetic COCO-format dataset (images/, annotations/ and semantic/ "
                                   "label maps) of coloured shapes. Flags left out take generate_synthetic's "
                                   "defaults (cascadevision.data.synth).",
                       argument_default=argparse.SUPPRESS, formatter_class=HelpFormatter)
    p.add_argument("out", help="directory to write the dataset into")
    p.add_argument("--num-images", type=int, help="images in both splits")
    p.add_argument("--size", type=int, help="side of the square images, in pixels")
    p.add_argument("--seed", type=int, help="random seed of the shapes, colours and positions")
    p.add_argument("--val-fraction", type=float, help="share of the images in the val split")

    DETECTION.add_train(sub)
    DETECTION.add_eval(sub)
    DETECTION.add_predict(sub)

    p = sub.add_parser("demo", help="synthetic data -> train a small model -> evaluate -> pictures",
                       description="Generate a synthetic dataset, train the demo recipe (configs/demo_htc_r18.yaml) "
                                   "for HTC and, on the same budget, Mask R-CNN, print their COCO AP and draw "
                                   "predictions. Run again, it continues its runs.",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo_out", help="directory for the data, the runs and the pictures")
    p.add_argument("--num-images", type=int, default=None, help="synthetic images (default: 400)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="training iterations per model (default: the recipe's train.max_iters)")
    p.add_argument("--seed", type=int, default=0, help="training seed (initial weights, data order, augmentation)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")

    p = sub.add_parser("weights", help="inspect or convert weight files")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    w = wsub.add_parser("inspect", help="format, keys summary and classes of a weights file")
    w.add_argument("file", help="a checkpoint, MMDetection .pth, torchvision ResNet or .safetensors file")
    w = wsub.add_parser("convert", help="convert a checkpoint to safetensors")
    w.add_argument("src", help="a checkpoint or weights file")
    w.add_argument("dst", help="the .safetensors file to write")

    p = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="write a trained detector as ONNX or a torch.export program",
                       description="Export a checkpoint's detector: one resized, normalised image in (dynamic height "
                                   "and width, batch 1), boxes, scores, labels and 28x28 mask probabilities out; "
                                   "classes, input contract, preset and version travel with the file. See "
                                   "cascadevision.export for the contract; `predict --onnx FILE` runs the file.")
    p.add_argument("checkpoint", help="a checkpoint written by `train`")
    add_export_flags(p, "RoiAlign/NonMaxSuppression, opset 18; runs in onnxruntime")
    add_set(p, "model.roi_head.test.score_thr=0.3")

    DETECTION.add_presets(sub)
    DETECTION.add_config(sub)
    add_serve(sub)

    p = sub.add_parser("check-data", formatter_class=HelpFormatter,
                       help="check a COCO dataset: annotations, and every image's existence, "
                                          "readability and size; lists every problem at once")
    p.add_argument("ann", help="COCO annotation JSON")
    p.add_argument("images", help="image directory")
    p.add_argument("--semantic", default=None, help="directory of semantic label-map PNGs to check too")
    p.add_argument("--quick", action="store_true", help="read image headers only (what train runs at start)")

    for name, help_ in _HEAVY_COMMANDS.items():
        if command is None or command == name:
            _add_heavy_parser(name, sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return parser


def _add_heavy_parser(name: str, sub) -> None:
    # function-local: these packages load torch; the CLI start-up stays light for `--help` and the other commands
    if name == "exits":
        from .early_exit.cli import add_parser
    else:
        from .segmentation.cli import add_parser
    add_parser(sub)


def _command(argv: list[str]) -> str:
    """The command `argv` names ('' when none: `--help` or a mistake, which argparse answers)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def _exported_file_first(argv: list[str]) -> list[str]:
    """`predict --onnx FILE INPUTS...`: FILE also takes the checkpoint's place, so INPUTS parse as after one."""
    if argv[:1] != ["predict"]:
        return argv
    for i, arg in enumerate(argv):
        if arg == "--onnx" and i + 1 < len(argv):
            return ["predict", argv[i + 1], *argv[1:]]
        if arg.startswith("--onnx="):
            return ["predict", arg.partition("=")[2], *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    # an old config key a person wrote (YAML, --set) is read, and said so: Python hides library deprecations
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"cascadevision\.config")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(_exported_file_first(argv))
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
    if args.command in ("train", "eval", "predict", "presets", "config"):
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
    if args.command == "export":
        from .tasks.detection import DETECTION as task  # CLI start-up stays light (see above)

        meta = task.export(args.checkpoint, args.out, args.format, model_overrides_only(args.overrides))
        print(f"wrote {args.out} ({args.format}; {len(meta['class_names'])} classes, outputs "
              f"{', '.join(meta['outputs'])})")
        return 0
    if args.command == "demo":
        from .demo import run_demo  # CLI start-up stays light (see above)

        run_demo(args.out, num_images=args.num_images, max_iters=args.max_iters, progress=not args.no_progress,
                 seed=args.seed)
        return 0
    if args.command == "serve":
        return run_serve(args)
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
