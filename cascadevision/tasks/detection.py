"""Detection (HTC, Cascade R-CNN, Mask/Faster R-CNN): the task description and the jobs the CLI runs (train,
evaluate, predict), as plain functions a script can call too.

Evaluation and prediction run either a checkpoint this library wrote, or a preset (or YAML config) with weights
from elsewhere (an MMDetection model-zoo file or URL): `load_model(source, weights=...)`, where `model_source`
says how `source` is read.

    run_prediction("htc_r50_fpn_1x", ["photos/"], "preds", weights="https://download.openmmlab.com/...pth")
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import torch

from ..config import PREDICT_SCORE_THR, Config, EarlyExitConfig, ModelConfig, update
from ..data import CocoDataset, check_dataset, match_classes
from ..data.transforms import train_transforms
from ..data.coco_classes import COCO_CLASSES, COCO_IDS
from ..engine import evaluate
from ..engine.amp import amp_dtype, autocast
from ..engine.evaluator import deferred_mask_pasting, results_to_coco
from ..engine.trainer import resolve_device
from ..export import export_model
from ..export.compile import compile_model
from ..export.runtime import load_exported
from ..errors import CheckpointError, ConfigError, DatasetError
from ..hub import is_url, resolve
from ..io.checkpoint import atomic_write, read_state_dict
from ..io.images import IMAGE_SUFFIXES, collect_images, unique_output_names
from ..io.weights import detect_format, load_state, weights_classes
from ..early_exit.detection import COUNTING, build_from_config, exit_policy_for_head  # the detector with its early-exit hook
from ..models.presets import COCO_PRESETS
from ..models.tta import TTADetector
from ..outputs import ensure_writable_dir
from ..presets import DETECTION_PRESETS, preset_config, preset_names
from ..visualize import draw_predictions
from .base import Task, Training, note, predict_images

__all__ = ["DETECTION", "TASK", "IMAGE_SUFFIXES", "checkpoint_classes", "collect_images", "format_exit_summary",
           "format_metrics", "load_model", "model_from_checkpoint", "model_from_weights", "model_source",
           "resolve_device", "run_evaluation", "run_prediction", "run_training", "train_datasets",
           "unique_output_names"]


def train_datasets(cfg: Config):
    """(train, val or None) CocoDatasets for a config's data section; an empty split is a DatasetError."""
    data = cfg.data
    if not data.train_ann or not data.train_images:
        raise ConfigError("training needs data.train_ann and data.train_images (--train-ann, --train-images)")
    semantic = cfg.model.roi_head.htc.with_semantic
    train = CocoDataset(data.train_ann, data.train_images, train=True, transforms=train_transforms(data),
                        semantic_dir=data.train_semantic or None,
                        derive_semantic=semantic and not data.train_semantic,
                        filter_empty=data.filter_empty, min_size=data.min_size)
    if len(train) == 0:
        if train.num_images_in_file == 0:
            raise DatasetError(f"{data.train_ann}: has no images")
        reasons = "; ".join(f"{count} for {why}" for why, count in train.dropped.items() if count)
        raise DatasetError(f"{data.train_ann}: all {train.num_images_in_file} images were dropped ({reasons}); "
                           "nothing to train on")
    val = None
    if data.val_ann:
        if not data.val_images:
            raise ConfigError("data.val_ann is set but data.val_images is not (--val-images)")
        val = CocoDataset(data.val_ann, data.val_images, train=False)
    return train, val


def prepare_training(cfg: Config) -> Training:
    """The datasets, every image's existence and size (`data.check_images`), the validation set's categories
    matched to the training set's, and the model config given the training set's classes."""
    train_set, val_set = train_datasets(cfg)
    if cfg.data.check_images:
        splits = [(cfg.data.train_ann, cfg.data.train_images, cfg.data.train_semantic or None)]
        if val_set is not None:
            splits.append((cfg.data.val_ann, cfg.data.val_images, None))
        for ann, images, semantic in splits:
            problems = check_dataset(ann, images, semantic_dir=semantic, deep=False)
            if problems:
                raise DatasetError(f"{len(problems)} problem(s) with the images of {ann}, the first: {problems[0]}; "
                                   f"`cascadevision check-data {ann} {images}` lists them all")
    val_cat_ids = None
    if val_set is not None:
        mapping = match_classes(train_set.class_names, train_set.cat_ids, val_set.class_names, val_set.cat_ids,
                                model_source=f"training set ({cfg.data.train_ann})",
                                dataset_source=f"validation set ({cfg.data.val_ann})")
        val_cat_ids = mapping.cat_ids
        if mapping.note:
            note(mapping.note)
        if cfg.train.eval_at_end and not any(not a.get("iscrowd", 0) for a in val_set.coco.dataset["annotations"]):
            raise DatasetError(f"{cfg.data.val_ann}: no annotations to evaluate against; give a validation set "
                               "with annotations, or train.eval_at_end=false")
    model_cfg = dataclasses.replace(cfg.model, num_classes=train_set.num_classes,
                                    class_names=tuple(train_set.class_names))
    semantic_classes = semantic_head_size(cfg, train_set) if cfg.model.roi_head.htc.with_semantic else None
    if semantic_classes is not None:
        head = model_cfg.roi_head
        model_cfg = dataclasses.replace(model_cfg, roi_head=dataclasses.replace(
            head, htc=dataclasses.replace(head.htc, semantic_num_classes=semantic_classes)))
    return Training(dataclasses.replace(cfg, model=model_cfg), train_set, val_set,
                    functools.partial(evaluate, cat_ids=val_cat_ids))


def semantic_head_size(cfg: Config, train_set: CocoDataset) -> int | None:
    """The HTC semantic head's class count for the training set, with a note saying how it was chosen: the label
    maps' largest label + 1 (`data.train_semantic`), or things + background when the labels are derived from the
    instance masks. None keeps the config's value when the user chose it (it differs from the preset's)."""
    chosen = cfg.model.roi_head.htc.semantic_num_classes
    preset = preset_config(cfg.model.preset) if cfg.model.preset else ModelConfig()
    if chosen != preset.roi_head.htc.semantic_num_classes:
        return None  # the user's; a label map beyond it stops training with the map's name
    key = "model.roi_head.htc.semantic_num_classes"
    if cfg.data.train_semantic:
        count, read = train_set.semantic_label_count()
        maps = f"all {read}" if read == len(train_set) else f"{read} (spread evenly) of the {len(train_set)}"
        note(f"HTC semantic head: {count} classes, the largest label + 1 in {maps} label maps of "
             f"{cfg.data.train_semantic} (255 = ignore); set {key} to choose another")
    else:
        count = train_set.num_classes + 1
        note(f"HTC semantic head: {count} classes ({train_set.num_classes} things + background), derived from the "
             f"instance masks of {cfg.data.train_ann}")
    return count


def format_metrics(metrics: dict, title: str = "") -> str:
    """An AP table: one row per IoU type, the first column as wide as the title. A note under it names the
    columns COCO left undefined (-1: the split has no ground truth of that size)."""
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    rows = [iou_type for iou_type in ("bbox", "segm") if iou_type in metrics]
    title = title or "metric"
    width = max(len(title), 10)
    lines = [f"| {title:<{width}} | " + " | ".join(f"{c:>5}" for c in cols) + " |",
             "|" + "-" * (width + 2) + "|" + "|".join("-" * 7 for _ in cols) + "|"]
    for iou_type in rows:
        row = metrics[iou_type]
        lines.append(f"| {iou_type:<{width}} | " + " | ".join(f"{row.get(c, float('nan')):5.1f}" for c in cols) + " |")
    sizes = {"APs": "small objects (area < 32²)", "APm": "medium objects (32² to 96²)", "APl": "large objects (> 96²)"}
    undefined = [c for c in sizes if any(metrics[r].get(c) == -1 for r in rows)]
    if undefined:
        lines.append(f"note: {', '.join(undefined)} = -1: the split has no {' or '.join(sizes[c] for c in undefined)} "
                     "in its ground truth, so COCO leaves that AP undefined")
    return "\n".join(lines)


def format_exit_summary(summary: dict) -> str:
    """Per-stage RoI counts of a cascade and the RoI-head compute it spent."""
    lines = ["| stage | RoIs in | left (confident) | dropped (background) | masks from stages 1..t |",
             "|---|---|---|---|---|"]
    for t, (rois, exits, dropped, masks) in enumerate(zip(summary["rois"], summary["exits"], summary["dropped"],
                                                           summary["masks"])):
        lines.append(f"| {t + 1} | {rois} | {exits} | {dropped} | {masks} |")
    if "plain_model_gmacs" in summary:
        lines.append(f"RoI-head compute: {summary['roi_head_gmacs']:.2f} GMAC vs {summary['plain_model_gmacs']:.2f} "
                     f"for {summary['baseline']} ({100 * summary['saved_fraction']:.1f}% saved; "
                     f"{summary['full_cascade_gmacs']:.2f} for the full cascade on the same proposals)")
    else:
        lines.append(f"RoI-head compute: {summary['roi_head_gmacs']:.2f} GMAC vs {summary['full_cascade_gmacs']:.2f} "
                     f"for the full cascade on the same proposals ({100 * summary['saved_fraction']:.1f}% saved)")
    lines.append(f"counted: {summary.get('counting', COUNTING)}")
    for iou_type, plain in summary.get("plain_model", {}).items():
        lines.append(f"plain model {iou_type} AP on the same images: {plain['AP']:.1f}")
    return "\n".join(lines)


def export_detector(model, path: Path, fmt: str, meta: dict) -> dict:
    """The detection task's exporter (`Task.export`): the checkpoint's classes and preset travel with the file."""
    names, ids = checkpoint_classes(model, meta)
    return export_model(model, path, fmt, class_names=names or model.class_names, cat_ids=ids,
                        preset=model.cfg.preset)


DETECTION = Task(
    name="detection", presets=DETECTION_PRESETS, model_config=ModelConfig, build_model=build_from_config,
    prepare_training=prepare_training, format_metrics=format_metrics, export_model=export_detector,
    no_config_hint="if it holds a detector's weights (an MMDetection file, say), name the preset they belong to: "
                   "`cascadevision predict PRESET --weights {path} IMAGES`")
TASK = DETECTION  # what `cascadevision.commands` runs


def run_training(cfg: Config, out_dir: str | Path, *, resume: bool | str = False, weights: str = "",
                 progress: bool = True, overwrite: bool = False, compile: bool = False) -> dict:
    """Build datasets and the model for `cfg`, load initial weights, train, evaluate at the end.

    Everything that can be checked before training is: the run directory (see `engine.rundir`), the
    annotation files, every image's existence and size (`data.check_images`), and that the validation set's
    categories are the training set's.
    """
    return DETECTION.run_training(cfg, out_dir, resume=resume, weights=weights, progress=progress,
                                  overwrite=overwrite, compile=compile)


def model_from_checkpoint(path: str | Path, **overrides):
    """Rebuild the model a checkpoint of ours was trained with and load its weights (on the CPU, as built)."""
    return DETECTION.model_from_checkpoint(path, overrides or None, device=None)


def model_source(source: str | Path, with_weights: bool) -> str:
    """How eval and predict read their first argument: 'checkpoint' (a file this library wrote, which brings its
    own config and weights) or 'config' (a preset name, or a YAML config, to be run with `--weights`).

    An existing file is a checkpoint, unless it ends in .yaml/.yml; otherwise a name the config loader knows (a
    preset; a YAML file) is a config; anything else is a one-line error naming both possibilities. A config
    without weights, and a checkpoint with other weights, are errors too."""
    text = str(source)
    path = Path(text)
    is_config = path.suffix.lower() in (".yaml", ".yml")
    if path.is_file() and not is_config:
        if with_weights:
            raise ConfigError(f"{text} is a checkpoint and brings its own weights; --weights (model.weights) goes with "
                              f"a preset name: `cascadevision predict PRESET --weights FILE_OR_URL IMAGES`")
        return "checkpoint"
    if path.is_file() or _names_a_config(text):
        if not with_weights:
            what = "config file" if is_config else "model preset" if text in preset_names() else "config recipe"
            raise ConfigError(f"{text} is a {what}: give the weights to run it with, --weights FILE_OR_URL (e.g. an "
                              "MMDetection COCO checkpoint)")
        return "config"
    if is_url(text):
        name = Path(text).name
        preset = max((p for p in preset_names() if name.startswith(p)), key=len, default="PRESET")
        raise ConfigError(f"{text}: a URL names weights, not a model: pass the preset they belong to and the URL as "
                          f"--weights, e.g. `cascadevision predict {preset} --weights {text} IMAGES`")
    problem = "a directory" if path.is_dir() else "there is no such file"
    raise ConfigError(f"{text}: neither a checkpoint file ({problem}) nor a model preset; give a "
                      "checkpoint written by `cascadevision train`, or a preset (`cascadevision presets`) with "
                      "--weights FILE_OR_URL")


def _names_a_config(text: str) -> bool:
    try:
        DETECTION.load_config(text)
    except ConfigError:
        return False
    return True


def model_from_weights(config: str | Path, weights: str | Path, overrides: dict | None = None,
                       device: str | None = "auto", progress: bool = True):
    """(model, meta) for inference with weights trained elsewhere: the model `config` (a preset name or a YAML
    file) describes, with as many classes as the weights file's class layers have (and its semantic head's
    size), then `overrides` of the model section; every tensor of the file must fit (nothing is
    re-initialised). `weights` is a file or a URL (downloaded once, see `hub.resolve`).

    meta['class_names'] are the file's (its meta: ours, or MMDetection's CLASSES / dataset_meta) or, for an
    80-class file that names none and a COCO preset, COCO's; meta['cat_ids'] are COCO's 1..90 ids when the
    names are COCO's, else the file's own ids if it stores them, else []."""
    model_cfg = DETECTION.load_config(config).model
    path = resolve(weights, progress=progress)
    state, file_meta = read_state_dict(path)
    fmt = detect_format(state)
    if fmt != "detector":
        raise CheckpointError(f"{weights}: holds {fmt} weights, not a whole detector's; eval and predict need a "
                              "detector checkpoint (ours, or MMDetection's v2/v3)")
    count, names = weights_classes(state, file_meta)
    if names and count is not None and len(names) != count:
        raise CheckpointError(f"{weights}: its meta names {len(names)} classes but its class layers have {count}")
    count = count if count is not None else len(names) or model_cfg.num_classes
    ids = [int(i) for i in file_meta.get("cat_ids") or []]
    if not names and count == len(COCO_CLASSES) and model_cfg.preset in COCO_PRESETS:
        note(f"{weights} names no classes: taking them to be COCO's 80, as for {model_cfg.preset}'s published weights")
        names = list(COCO_CLASSES)
    if tuple(names) == COCO_CLASSES and not ids:
        ids = list(COCO_IDS)
    if len(ids) != count:
        ids = []
    sizes: dict = {"num_classes": count, "class_names": names}
    semantic = state.get("roi_head.semantic_head.conv_logits.weight")
    if semantic is not None and model_cfg.roi_head.htc.with_semantic:
        sizes["roi_head"] = {"htc": {"semantic_num_classes": int(semantic.shape[0])}}
    model_cfg = update(model_cfg, sizes, prefix="model.")
    if overrides:
        model_cfg = update(model_cfg, overrides, prefix="model.")
    model = DETECTION.build_model(model_cfg)
    load_state(model, state, file_meta, source=path, strict_classes=True)
    meta = {"class_names": names, "cat_ids": ids, "weights": str(weights)}
    if device is None:
        return model, meta
    return model.to(resolve_device(device)).eval(), meta


def load_model(source: str | Path, overrides: dict | None = None, device: str = "auto", *, weights: str = "",
               progress: bool = True):
    """(model, meta) for eval and predict: a checkpoint of ours, or a preset/config with `weights` (see
    `model_source`). `overrides` are model-section values; their `weights` key is the same as `weights`."""
    overrides = dict(overrides or {})
    set_weights = str(overrides.pop("weights", "") or "")
    if weights and set_weights and str(weights) != set_weights:
        raise ConfigError(f"--weights {weights} and --set model.weights={set_weights} disagree; give one of them")
    weights = str(weights or set_weights)
    if model_source(source, bool(weights)) == "checkpoint":
        model, meta = DETECTION.model_from_checkpoint(source, overrides or None, device)
    else:
        model, meta = model_from_weights(source, weights, overrides or None, device, progress=progress)
    if model.cfg.tta.enabled:  # model.tta / --tta: the detector wrapped, same interface
        model = TTADetector.from_config(model).eval()
    return model, meta


def checkpoint_classes(model, meta: dict) -> tuple[list[str], list[int]]:
    """(class names, category ids) a checkpoint was trained with; empty lists when it does not say."""
    names = list(meta.get("class_names") or [])
    ids = [int(i) for i in meta.get("cat_ids") or []]
    if not names and getattr(model, "class_names", None) and len(model.class_names) == model.cfg.num_classes:
        names = list(model.class_names)
    return names, ids


def run_evaluation(checkpoint: str | Path, ann: str, images: str, out_dir: str | Path,
                   overrides: dict | None = None, device: str = "auto", progress: bool = True,
                   class_map: str | dict | None = None, weights: str = "", dtype: str = "fp32",
                   plain_overrides: dict | None = None, compile: bool = False) -> dict:
    """COCO AP of a checkpoint (or of a preset with `weights`, see `load_model`) on an annotation file, its
    classes matched to the file's categories by id and name (`class_map` says how they relate when they differ;
    see `data.match_classes`). `dtype` "bf16" or "fp16" runs the model under autocast (`engine.amp`).

    With early exit on, the plain model (no early exit) runs on the same images too, and `metrics['early_exit']`
    holds its AP and RoI-head compute beside the early-exit run's. The plain model is the same model with the exits
    off, or, when `plain_overrides` are given and differ from `overrides` beyond the exits (an exit config that
    also sets `rpn.test_post_nms`), the model built with `plain_overrides`."""
    precision = amp_dtype(dtype, resolve_device(device), "--dtype")
    if out_dir:
        ensure_writable_dir(out_dir, "evaluation output directory")
    dataset = CocoDataset(ann, images, train=False)  # before the model: a wrong path fails before any download
    model, meta = load_model(checkpoint, overrides, device, weights=weights, progress=progress)
    if compile:
        compile_model(model)
    names, ids = checkpoint_classes(model, meta)
    source = f"weights ({meta['weights']})" if meta.get("weights") else f"checkpoint ({checkpoint})"
    mapping = match_classes(names, ids, dataset.class_names, dataset.cat_ids, class_map=class_map,
                            model_source=source, dataset_source=f"annotation file ({ann})",
                            num_model_classes=model.cfg.num_classes)
    if mapping.note:
        note(mapping.note)
    head = model.roi_head
    if hasattr(head, "reset_exit_stats"):
        head.reset_exit_stats()
    metrics = evaluate(model, dataset, out_dir=out_dir, progress=progress, cat_ids=mapping.cat_ids, dtype=precision)
    if hasattr(head, "exit_summary") and model.cfg.roi_head.early_exit.enabled:  # the table only when asked for
        # the honest baseline: the plain model (same weights, no early exit) on the same images, counted alike
        policy = head.exit_policy
        plain_model = model
        if plain_overrides is not None and _without_exit(plain_overrides) != _without_exit(overrides or {}):
            plain_model, _ = load_model(checkpoint, _without_exit(plain_overrides), device, weights=weights,
                                        progress=progress)
        plain_head = plain_model.roi_head
        plain_head.exit_policy = exit_policy_for_head(plain_head, EarlyExitConfig())
        try:
            plain = evaluate(plain_model, dataset, out_dir=None, progress=progress, cat_ids=mapping.cat_ids,
                             dtype=precision)
            plain_counts = plain_head.exit_policy.total()
        finally:
            head.exit_policy = policy
        metrics["early_exit"] = policy.summary(plain=plain_counts)
        metrics["early_exit"]["plain_model"] = {k: plain[k] for k in ("bbox", "segm") if k in plain}
        metrics["early_exit"]["num_images"] = len(dataset)
        if out_dir:
            (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _without_exit(overrides: dict) -> dict:
    """Model overrides without `roi_head.early_exit`."""
    out = {k: v for k, v in overrides.items() if k != "roi_head"}
    roi_head = {k: v for k, v in (overrides.get("roi_head") or {}).items() if k != "early_exit"}
    return {**out, "roi_head": roi_head} if roi_head else out


def run_prediction(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, *, score_thr: float = PREDICT_SCORE_THR,
                   overrides: dict | None = None, device: str = "auto", progress: bool = True,
                   weights: str = "", dtype: str = "fp32", onnx: str = "", threads: int | None = None,
                   compile: bool = False) -> list[dict]:
    """Overlay PNGs (masks, boxes, class names, scores) and a COCO-style results JSON for images or folders, from
    a checkpoint of ours or a preset with `weights` (see `load_model`).

    Returns one entry per input file: {'file_name', 'overlay', 'detections'}, or {'file_name', 'error'} for a
    file that could not be read (it is skipped; the others are still predicted). results.json is written
    even when the run stops early. `dtype` "bf16" or "fp16" runs the model under autocast (`engine.amp`).

    `onnx`: instead of `checkpoint`, an exported file (`cascadevision export`: .onnx, run by onnxruntime with
    `threads` threads, or a torch.export program) gives the predictions; the outputs are written the same way.
    `compile`: the PyTorch model's dense parts run through `torch.compile` (`export.compile.compile_model`).
    """
    precision = amp_dtype(dtype, resolve_device(device), "--dtype")
    out_dir = ensure_writable_dir(out_dir, "prediction output directory")
    files = collect_images(inputs)
    if onnx:
        model = load_exported(onnx, threads=threads)
        meta, context = {"cat_ids": model.cat_ids}, type(model).deferred_mask_pasting
    else:
        model, meta = load_model(checkpoint, overrides, device, weights=weights, progress=progress)
        context = functools.partial(_inference_context, dtype=precision)
        if compile:
            compile_model(model)
    cat_ids = list(meta.get("cat_ids") or range(1, len(model.class_names) + 1))
    results = []

    def write(image_id: int, path: Path, name: str, image: torch.Tensor, pred: dict) -> dict:
        draw_predictions(image, pred, model.class_names, score_thr=score_thr).save(out_dir / name)
        for r in results_to_coco([pred], [image_id], cat_ids):
            r["file_name"] = str(path)
            results.append(r)
        return {"file_name": str(path), "overlay": name, "detections": int((pred["scores"] >= score_thr).sum())}

    try:  # memory O(H x W) on big photos: masks are pasted one chunk at a time
        return predict_images(model, files, unique_output_names(files), write, progress=progress, context=context)
    finally:
        atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(results).encode()))


@contextlib.contextmanager
def _inference_context(model, dtype):
    """Masks pasted a chunk at a time (see `run_prediction`), the model under autocast in `dtype` (None: off)."""
    with deferred_mask_pasting(model), autocast(next(model.parameters()).device, dtype):
        yield
