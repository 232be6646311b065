"""The one CLI factory: every task gets the same `train / eval / predict / presets` verbs with the same shared
flags (`--set`, `--device`, `--out`, `--resume`, `--overwrite`, `--no-progress`); a `TaskCommands` says only what
differs (its data flags, its extra options, how it reports).

Building the parser imports no task: a verb imports its task when it runs, so `cascadevision --help` stays quick.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import (EXPORTED_SUFFIXES, PREDICT_SCORE_THR, REGION_POLICIES, SERVE_AUTO_BATCH, ServeConfig,
                     parse_overrides, to_dict, update)
from .errors import ConfigError

AddArgs = Callable[[argparse.ArgumentParser], None]


def add_set(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {example} (repeatable)")


def _nothing(p: argparse.ArgumentParser) -> None:
    pass


EXPORT_FORMATS = ("onnx", "exported-program")  # cascadevision.export.FORMATS (not imported: it loads torch)


def add_export_flags(p: argparse.ArgumentParser, onnx_help: str = "runs in onnxruntime") -> None:
    """--format and --out of every `export` verb."""
    p.add_argument("--format", default="onnx", choices=EXPORT_FORMATS,
                   help=f"onnx ({onnx_help}) or exported-program (torch.export.save; metadata in FILE.json next "
                        "to it)")
    p.add_argument("--out", required=True, help="the file to write (.onnx, or .pt2 for an exported program)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines); a flag's help ends with its default
    when it has one worth saying (not None, False, '' or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None or default is False
                or default is argparse.SUPPRESS or default == "" or default == [] or text is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


@dataclass(frozen=True)
class TaskCommands:
    """The command line of one task. `module` is the `cascadevision.tasks` module holding the task's jobs."""
    module: str
    set_example: str
    config_help: str
    train_help: str
    eval_help: str
    predict_help: str
    presets_help: str
    weights_help: str
    train_data: tuple[tuple[str, str | None], ...]  # (flag, help): values of the config's data section
    eval_inputs: tuple[tuple[str, str | None], ...]  # required flags naming the evaluation data
    eval_out_help: str
    eval_options: AddArgs = _nothing  # between --out and --device
    predict_options: AddArgs = _nothing  # between --out and --device
    model_options: AddArgs | None = None  # eval/predict: --set (model.* only) and these, after --no-progress
    checkpoint_help: str | None = None  # eval/predict: what their first argument may be
    report_training: Callable[[object, dict, object], None] | None = None  # (jobs module, metrics, cfg)
    evaluate: Callable[[object, argparse.Namespace], int] | None = None
    predict: Callable[[object, argparse.Namespace], int] | None = None
    presets: Callable[[], list[str]] | None = None
    load_config: Callable[..., object] | None = None  # (name or path, overrides) -> config, without the task
    export_help: str = ""  # the `export` verb's description (empty: the task has no `export` verb here)

    def jobs(self):
        return importlib.import_module(self.module)

    # -- parsers --------------------------------------------------------------------------------------------

    def add_train(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser("train", help=self.train_help, formatter_class=HelpFormatter,
                           description=f"{self.train_help[0].upper()}{self.train_help[1:]}. The data flags set data.*; "
                                       "--set wins over them and over the config.")
        p.add_argument("config", help=self.config_help)
        for flag, help_ in self.train_data:
            p.add_argument(flag, help=help_)
        p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plots)")
        p.add_argument("--weights", default="", help=self.weights_help)
        p.add_argument("--resume", nargs="?", const=True, default=False,
                       help="continue from the run directory's latest checkpoint (or the given one)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its checkpoints, config and logs are removed)")
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bar: a log line every train.log_interval iterations instead (what a "
                            "run whose stderr is not a terminal prints anyway)")
        _compile_flag(p)
        add_set(p, self.set_example)
        return p

    def add_eval(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser("eval", help=self.eval_help, formatter_class=HelpFormatter)
        p.add_argument("checkpoint", help=self.checkpoint_help)
        for flag, help_ in self.eval_inputs:
            p.add_argument(flag, required=True, help=help_)
        p.add_argument("--out", default=None, help=self.eval_out_help)
        self.eval_options(p)
        self._device_and_model_options(p)
        return p

    def add_predict(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser("predict", help=self.predict_help, formatter_class=HelpFormatter)
        p.add_argument("checkpoint", help=self.checkpoint_help)
        p.add_argument("inputs", nargs="+", help="image files or directories")
        p.add_argument("--out", required=True, help="directory for the overlay PNGs and results.json")
        self.predict_options(p)
        self._device_and_model_options(p)
        return p

    def add_presets(self, sub) -> argparse.ArgumentParser:
        return sub.add_parser("presets", help=self.presets_help)

    def add_config(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser("config", help="print the full resolved config (YAML) of a preset, recipe or YAML file",
                           formatter_class=HelpFormatter,
                           description="Print every value a run would use (the preset, then the file, then --set), "
                                       "as YAML that `train` reads back.")
        p.add_argument("config", help=self.config_help)
        add_set(p, self.set_example)
        return p

    def add_export(self, sub) -> argparse.ArgumentParser:
        p = sub.add_parser("export", help="write a trained model as ONNX or a torch.export program",
                           formatter_class=HelpFormatter, description=self.export_help)
        p.add_argument("checkpoint", help="a checkpoint written by `train`")
        add_export_flags(p)
        return p

    def add_all(self, sub) -> None:
        for add in (self.add_train, self.add_eval, self.add_predict, self.add_presets, self.add_config):
            add(sub)
        if self.export_help:
            self.add_export(sub)

    def _device_and_model_options(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if self.model_options is not None:
            add_set(p, self.set_example)
            self.model_options(p)

    # -- running --------------------------------------------------------------------------------------------

    def run(self, verb: str, args: argparse.Namespace) -> int:
        if verb == "config":
            load = self.load_config or self.jobs().TASK.load_config
            print(yaml.safe_dump(to_dict(load(args.config, args.overrides)), sort_keys=False), end="")
            return 0
        if verb == "presets":
            print("\n".join(self.presets() if self.presets else self.jobs().TASK.presets.names()))
            return 0
        jobs = self.jobs()
        if verb == "train":
            task = jobs.TASK
            cfg = task.load_config(args.config, args.overrides)
            data = {k: getattr(args, k) for k in _dests(self.train_data) if getattr(args, k)}
            cfg = update(cfg, {"data": data})
            cfg = update(cfg, parse_overrides(args.overrides))  # command-line --set wins over the flags
            metrics = task.run_training(cfg, args.out, resume=args.resume, weights=args.weights,
                                        progress=not args.no_progress, overwrite=args.overwrite,
                                        compile=args.compile)
            if self.report_training is not None:
                self.report_training(jobs, metrics, cfg)
            return 0
        if verb == "eval":
            return self.evaluate(jobs, args)
        if verb == "predict":
            return self.predict(jobs, args)
        if verb == "export":
            meta = jobs.TASK.export(args.checkpoint, args.out, args.format)
            print(f"wrote {args.out} ({args.format}; {meta['task']}, {len(meta['class_names'])} classes, outputs "
                  f"{', '.join(meta['outputs'])})")
            return 0
        raise AssertionError(verb)


def _compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's dense parts (backbone, neck, heads) with dynamic shapes: a slow "
                        "first iteration, then faster ones on CPU and GPU")


def _dests(flags: tuple[tuple[str, str | None], ...]) -> list[str]:
    return [flag.lstrip("-").replace("-", "_") for flag, _ in flags]


def report_failures(summary: list[dict], wrote: str) -> int:
    """Print what predict wrote, and the files it skipped (exit status 1 when there were some)."""
    failed = [entry for entry in summary if "error" in entry]
    print(wrote.format(count=len(summary) - len(failed)))
    if failed:
        print(f"skipped {len(failed)} unreadable file(s):", file=sys.stderr)
        for entry in failed:
            print(f"  {entry['error']}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------
# detection


def _add_early_exit(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early exit (cascade models)")
    g.add_argument("--early-exit", choices=REGION_POLICIES,
                   help="region-level exit policy: confident RoIs stop being refined")
    g.add_argument("--exit-threshold", type=float, help="confidence to leave (entropy: at most this)")
    g.add_argument("--exit-background", type=float, help="drop RoIs once P(background) >= this")
    g.add_argument("--exit-prune", type=float,
                   help="stop refining (but keep) RoIs whose best class probability is below this")
    g.add_argument("--time-budget-ms", type=float, help="anytime inference: stop the cascade past this budget")
    g.add_argument("--exit-config", metavar="FILE.yaml",
                   help="exit settings chosen by `cascadevision exits calibrate-detector` (the flags above win); "
                        "eval prints the realised AP and compute beside the planned ones")


def _detection_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="", metavar="FILE_OR_URL",
                   help="run the preset named first with these weights (an MMDetection v2/v3 .pth or one of "
                        "ours; a URL is downloaded once into ~/.cache/cascadevision); same as --set model.weights=")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="run the model under autocast in this precision (bf16: CPU or CUDA, fp16: CUDA); the box, "
                        "NMS, RoIAlign and mask ops stay float32 (default %(default)s)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: flip (and the scales of model.tta.scales), boxes merged by NMS, "
                        "masks averaged; same as --set model.tta.enabled=true")
    _add_early_exit(p)


def model_overrides(args) -> dict:
    """--set values and early-exit options for eval/predict: only model.* keys make sense there."""
    nested = parse_overrides(args.overrides)
    extra = set(nested) - {"model"}
    if extra:
        raise ConfigError(f"only model.* keys can be overridden here, got {', '.join(sorted(extra))}")
    model = nested.get("model", {})
    args.plain_overrides = json.loads(json.dumps(model))  # what the early exit is measured against (eval)
    if getattr(args, "exit_config", None):
        from .early_exit.detector_calibration import read_exit_config  # function-local: CLI start-up stays light
        from_file, args.exit_plan = read_exit_config(args.exit_config)
        model = update_nested(from_file, model)  # --set wins over the file
    options = {"policy": args.early_exit, "threshold": args.exit_threshold,
               "background_threshold": args.exit_background, "prune_threshold": args.exit_prune,
               "time_budget_ms": args.time_budget_ms}
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        model.setdefault("roi_head", {}).setdefault("early_exit", {}).update(options)
    if getattr(args, "tta", False):
        model.setdefault("tta", {})["enabled"] = True
    return model


def update_nested(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, nested dicts key by key (neither is modified)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = update_nested(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _detection_report(jobs, metrics: dict, cfg) -> None:
    scored = "bbox" in metrics or "segm" in metrics  # nothing to tabulate after train.eval_at_end=false
    if scored and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(jobs.format_metrics(metrics, title=cfg.model.preset or "model"))


def _detection_eval(jobs, args) -> int:
    overrides = model_overrides(args)
    metrics = jobs.run_evaluation(args.checkpoint, args.ann, args.images, args.out, overrides=overrides,
                                  weights=args.weights, dtype=args.dtype, plain_overrides=args.plain_overrides,
                                  compile=args.compile,
                                  device=args.device, progress=not args.no_progress, class_map=args.class_map)
    print(jobs.format_metrics(metrics))
    if "early_exit" in metrics:
        print(jobs.format_exit_summary(metrics["early_exit"]))
        plan = getattr(args, "exit_plan", None)
        if plan:
            print(format_plan(plan, metrics))
    return 0


def format_plan(plan: dict, metrics: dict) -> str:
    """The calibration's planned AP and compute (from --exit-config) beside this eval's realised ones."""
    summary = metrics["early_exit"]
    images = max(summary.get("num_images", 1), 1)
    lines = ["| | planned (calibration split) | realised (this split) |", "|---|---|---|"]
    for m in ("bbox", "segm"):
        if f"{m}_ap" in plan and m in metrics:
            plain = summary.get("plain_model", {}).get(m, {}).get("AP")
            drop = f", drop {plain - metrics[m]['AP']:.1f}" if plain is not None else ""
            lines.append(f"| {m} AP | {plan[f'{m}_ap']:.1f} (plain {plan[f'plain_{m}_ap']:.1f}, drop "
                         f"{plan[f'plain_{m}_ap'] - plan[f'{m}_ap']:.1f}) | {metrics[m]['AP']:.1f}"
                         + (f" (plain {plain:.1f}{drop})" if plain is not None else "") + " |")
    if "roi_head_gmacs" in plan:
        realised = summary["roi_head_gmacs"] / images
        line = f"| RoI-head GMAC/image | {plan['roi_head_gmacs']:.2f} ({100 * plan['compute_fraction']:.1f}% of plain) | "
        if "plain_model_gmacs" in summary:
            line += f"{realised:.2f} ({100 * (1 - summary['saved_fraction']):.1f}% of plain) |"
        else:
            line += f"{realised:.2f} |"
        lines.append(line)
    target = ", ".join(f"{k} {v}" for k, v in (plan.get("target") or {}).items())
    lines.append(f"(planned for {target} on {plan.get('split', 'the calibration split')}; AP target metric "
                 f"{plan.get('metric', '?')})")
    return "\n".join(lines)


def _detection_predict(jobs, args) -> int:
    if not args.onnx and Path(args.checkpoint).suffix.lower() in EXPORTED_SUFFIXES:
        args.onnx = args.checkpoint  # `predict FILE.onnx IMAGES`, as `serve FILE.onnx`
    if args.onnx and (args.weights or args.overrides or args.compile or args.dtype != "fp32"):
        raise ConfigError("predict --onnx runs the exported file as it is: --weights, --set, --compile and --dtype go "
                          "with a checkpoint or preset")
    summary = jobs.run_prediction(args.checkpoint, args.inputs, args.out, score_thr=args.score_thr,
                                  onnx=args.onnx, threads=args.threads, compile=args.compile,
                                  weights=args.weights, dtype=args.dtype,
                                  overrides=model_overrides(args), device=args.device, progress=not args.no_progress)
    return report_failures(summary, f"wrote {{count}} overlays and results.json to {Path(args.out)}")


def _eval_options(p: argparse.ArgumentParser) -> None:
    _class_map(p)
    _compile_flag(p)


def _predict_options(p: argparse.ArgumentParser) -> None:
    _score_thr(p)
    p.add_argument("--onnx", default="", metavar="FILE",
                   help="predict with an exported model instead (`cascadevision export`: .onnx through "
                        "onnxruntime on the CPU, or a torch.export .pt2); then every positional argument is an input. "
                        "Same as giving the .onnx/.pt2 file in the checkpoint's place")
    p.add_argument("--threads", type=int, default=None, help="--onnx: onnxruntime's threads (default: its own)")
    _compile_flag(p)


def _class_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-map", default=None, metavar="MODEL=DATASET,...|FILE",
                   help="how the checkpoint's classes relate to the annotation file's categories when they differ: "
                        "model class name or id = dataset category name or id (or a JSON/YAML file of such pairs); "
                        "unmapped model classes are not scored")


def _score_thr(p: argparse.ArgumentParser) -> None:
    p.add_argument("--score-thr", type=float, default=PREDICT_SCORE_THR,
                   help="draw the detections scoring at least this (default %(default)s)")


DETECTION = TaskCommands(
    module="cascadevision.tasks.detection", set_example="model.rpn.nms_iou=0.6",
    config_help="a preset or recipe name (see `cascadevision presets`) or a YAML config file",
    train_help="train a detector (works under torchrun for DDP)",
    eval_help="COCO bbox/segm evaluation of a checkpoint",
    predict_help="draw predictions on images and write COCO-style results",
    presets_help="list the model presets (what each is, its parameters) and the YAML recipes",
    weights_help="initial weights: checkpoint, MMDetection .pth or ImageNet ResNet",
    train_data=(("--train-ann", "COCO instance annotations (JSON) of the training split"),
                ("--train-images", "directory of the training images"),
                ("--train-semantic", "directory of semantic label-map PNGs (HTC; without it HTC derives "
                                     "things-only labels from the instance masks)"),
                ("--val-ann", "COCO annotations of the validation split (scored at the end, train.eval_at_end)"),
                ("--val-images", "directory of the validation images")),
    eval_inputs=(("--ann", "COCO annotation JSON to score against"), ("--images", "directory of its images")),
    eval_out_help="directory for results.json and metrics.json",
    eval_options=_eval_options, predict_options=_predict_options, model_options=_detection_model_options,
    checkpoint_help="a checkpoint written by `train`, or a preset name (or YAML config) to run with --weights; "
                    "an existing file is read as a checkpoint",
    report_training=_detection_report, evaluate=_detection_eval, predict=_detection_predict,
    presets=lambda: _presets_module().preset_table().splitlines(),
    load_config=lambda name, overrides: _presets_module().load_config(name, overrides))


def _presets_module():
    # function-local: cascadevision.presets imports the models package (torch); the CLI start-up stays light
    from . import presets
    return presets


# ----------------------------------------------------------------------------------------------------------
# segmentation


def _segmentation_report(jobs, metrics: dict, cfg) -> None:
    if "mIoU" in metrics:
        print(jobs.format_scores(metrics, title=cfg.model.preset or "class"))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("IoU", "Dice")}, indent=2))


def _segmentation_eval(jobs, args) -> int:
    scores = jobs.run_evaluation(args.checkpoint, args.images, args.labels, args.out, device=args.device,
                                 progress=not args.no_progress)
    print(jobs.format_scores(scores))
    return 0


def _segmentation_predict(jobs, args) -> int:
    summary = jobs.run_prediction(args.checkpoint, args.inputs, args.out, device=args.device,
                                  progress=not args.no_progress, alpha=args.alpha)
    out = Path(args.out)
    return report_failures(summary, f"wrote {{count}} overlays to {out / 'overlays'} and label maps to "
                                    f"{out / 'labels'}")


def _alpha(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours")


SEGMENTATION = TaskCommands(
    module="cascadevision.tasks.segmentation", set_example="model.loss.mutation=true",
    config_help="a preset name (see `cascadevision segment presets`) or a YAML config file",
    train_help="train a segmentation model (works under torchrun for DDP)",
    eval_help="per-class IoU and Dice, mIoU and mDice of a checkpoint",
    predict_help="colour overlays and label PNGs for images or directories",
    presets_help="list the segmentation presets",
    weights_help="initial weights: a checkpoint or an ImageNet ResNet state dict",
    train_data=(("--train-images", "directory of training images"),
                ("--train-labels", "directory of label-map PNGs named like the images (255 = ignore)"),
                ("--val-images", "directory of validation images (scored at the end)"),
                ("--val-labels", "directory of the validation label-map PNGs"),
                ("--classes", "JSON list of class names (default: semantic_classes.json near the labels)")),
    eval_inputs=(("--images", "directory of the images"), ("--labels", "directory of their label-map PNGs")),
    eval_out_help="directory for metrics.json and metrics.md",
    predict_options=_alpha, report_training=_segmentation_report, evaluate=_segmentation_eval,
    predict=_segmentation_predict,
    export_help="Export a checkpoint's segmentation model: a batch of resized, normalised images in (float32 NCHW, "
                "batch, height and width dynamic; height and width multiples of the size divisor), the sum of the "
                "heads' logits (B, K, H, W) out; classes, input contract, preset and version travel with the file. "
                "See cascadevision.export.dense for the contract; export.runtime.load_dense runs the file.")


# ----------------------------------------------------------------------------------------------------------
# serve


def add_serve(sub) -> argparse.ArgumentParser:
    defaults = ServeConfig()
    p = sub.add_parser("serve", help="an HTTP server for a detector: POST /predict, GET /healthz, and a web page",
                       formatter_class=HelpFormatter,
                       description="Load the model once and answer image uploads with COCO-style JSON "
                                   "(POST /predict, multipart field 'image'; POST /overlay answers a PNG); "
                                   "GET / is a page to drop an image on, GET /healthz describes the model. "
                                   "Requests that arrive together share a forward pass.",
                       epilog="examples:\n"
                              "  cascadevision serve runs/demo/checkpoints/final.pth\n"
                              "  curl -F image=@photo.jpg 'http://127.0.0.1:8000/predict?score_thr=0.5'\n"
                              "  cascadevision serve model.onnx --port 8080   # a file `cascadevision export` wrote")
    p.add_argument("checkpoint", help=DETECTION.checkpoint_help + "; or an exported .onnx / .pt2 file")
    p.add_argument("--host", default=defaults.host,
                   help="address to listen on (0.0.0.0: every interface, reachable from other machines)")
    p.add_argument("--port", type=int, default=defaults.port, help="port to listen on (0: any free one)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="requests of one image size stacked into one forward pass, at most (0: "
                        f"{SERVE_AUTO_BATCH['cuda']} on a GPU, {SERVE_AUTO_BATCH['cpu']} on the CPU, where "
                        "stacking was measured slower)")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                   help="how long a request waits for others to share its forward pass")
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20,
                   help="the largest upload taken, in MiB")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="the largest image taken (width x height), read from its header before decoding")
    p.add_argument("--score-thr", type=float, default=defaults.score_thr,
                   help="/predict's default score threshold (a request's ?score_thr= wins)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    add_set(p, DETECTION.set_example)
    _detection_model_options(p)
    return p


def run_serve(args) -> int:
    try:  # function-local: FastAPI, uvicorn and the model load when the server starts; the CLI start-up stays light
        from .serve import run_server
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette", "multipart", "python_multipart"):
            raise
        raise ConfigError(f"serve needs {exc.name}, which is not installed: "
                          "pip install 'cascadevision[serve]'") from None

    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_upload_bytes=max(1, round(args.max_upload_mb * 2**20)), max_pixels=args.max_pixels,
                         score_thr=args.score_thr)
    run_server(args.checkpoint, config, weights=args.weights, overrides=model_overrides(args), device=args.device)
    return 0
