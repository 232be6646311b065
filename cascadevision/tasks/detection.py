"""Detection (HTC, Cascade R-CNN, Mask/Faster R-CNN): the task description and the jobs the CLI runs (train,
evaluate, predict), as plain functions a script can call too."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from ..config import PREDICT_SCORE_THR, Config, ModelConfig
from ..data import CocoDataset, RandomHorizontalFlip, check_dataset, match_classes
from ..engine import evaluate
from ..engine.evaluator import deferred_mask_pasting, results_to_coco
from ..engine.trainer import resolve_device
from ..errors import ConfigError, DatasetError
from ..io.checkpoint import atomic_write
from ..io.images import IMAGE_SUFFIXES, collect_images, unique_output_names
from ..early_exit.detection import build_from_config  # the detector with its early-exit hook
from ..outputs import ensure_writable_dir
from ..presets import DETECTION_PRESETS
from ..visualize import draw_predictions
from .base import Task, Training, note, predict_images

__all__ = ["DETECTION", "TASK", "IMAGE_SUFFIXES", "checkpoint_classes", "collect_images", "format_exit_summary",
           "format_metrics", "load_model", "model_from_checkpoint", "resolve_device", "run_evaluation",
           "run_prediction", "run_training", "train_datasets", "unique_output_names"]


def train_datasets(cfg: Config):
    """(train, val or None) CocoDatasets for a config's data section; an empty split is a DatasetError."""
    data = cfg.data
    if not data.train_ann or not data.train_images:
        raise ConfigError("training needs data.train_ann and data.train_images (--train-ann, --train-images)")
    semantic = cfg.model.roi_head.htc.with_semantic
    train = CocoDataset(data.train_ann, data.train_images, train=True, transforms=RandomHorizontalFlip(data.flip_prob),
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
    if cfg.model.roi_head.htc.with_semantic and not cfg.data.train_semantic:
        # things-only labels derived from the instance masks: one class per thing plus background
        head = model_cfg.roi_head
        model_cfg = dataclasses.replace(model_cfg, roi_head=dataclasses.replace(
            head, htc=dataclasses.replace(head.htc, semantic_num_classes=train_set.num_classes + 1)))
    return Training(dataclasses.replace(cfg, model=model_cfg), train_set, val_set,
                    functools.partial(evaluate, cat_ids=val_cat_ids))


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


DETECTION = Task(
    name="detection", presets=DETECTION_PRESETS, model_config=ModelConfig, build_model=build_from_config,
    prepare_training=prepare_training, format_metrics=format_metrics,
    no_config_hint="build the model with build_model(...) and use load_weights instead")
TASK = DETECTION  # what `cascadevision.commands` runs


def run_training(cfg: Config, out_dir: str | Path, *, resume: bool | str = False, weights: str = "",
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Build datasets and the model for `cfg`, load initial weights, train, evaluate at the end.

    Everything that can be checked before training is: the run directory (see `engine.rundir`), the
    annotation files, every image's existence and size (`data.check_images`), and that the validation set's
    categories are the training set's.
    """
    return DETECTION.run_training(cfg, out_dir, resume=resume, weights=weights, progress=progress,
                                  overwrite=overwrite)


def model_from_checkpoint(path: str | Path, **overrides):
    """Rebuild the model a checkpoint of ours was trained with and load its weights (on the CPU, as built)."""
    return DETECTION.model_from_checkpoint(path, overrides or None, device=None)


def load_model(checkpoint: str | Path, overrides: dict | None = None, device: str = "auto"):
    return DETECTION.model_from_checkpoint(checkpoint, overrides, device)


def checkpoint_classes(model, meta: dict) -> tuple[list[str], list[int]]:
    """(class names, category ids) a checkpoint was trained with; empty lists when it does not say."""
    names = list(meta.get("class_names") or [])
    ids = [int(i) for i in meta.get("cat_ids") or []]
    if not names and getattr(model, "class_names", None) and len(model.class_names) == model.cfg.num_classes:
        names = list(model.class_names)
    return names, ids


def run_evaluation(checkpoint: str | Path, ann: str, images: str, out_dir: str | Path,
                   overrides: dict | None = None, device: str = "auto", progress: bool = True,
                   class_map: str | dict | None = None) -> dict:
    """COCO AP of a checkpoint on an annotation file, its classes matched to the file's categories by id and
    name (`class_map` says how they relate when they differ; see `data.match_classes`)."""
    if out_dir:
        ensure_writable_dir(out_dir, "evaluation output directory")
    model, meta = load_model(checkpoint, overrides, device)
    dataset = CocoDataset(ann, images, train=False)
    names, ids = checkpoint_classes(model, meta)
    mapping = match_classes(names, ids, dataset.class_names, dataset.cat_ids, class_map=class_map,
                            model_source=f"checkpoint ({checkpoint})", dataset_source=f"annotation file ({ann})",
                            num_model_classes=model.cfg.num_classes)
    if mapping.note:
        note(mapping.note)
    head = model.roi_head
    if hasattr(head, "reset_exit_stats"):
        head.reset_exit_stats()
    metrics = evaluate(model, dataset, out_dir=out_dir, progress=progress, cat_ids=mapping.cat_ids)
    if hasattr(head, "exit_summary") and model.cfg.roi_head.early_exit.enabled:  # the table only when asked for
        metrics["early_exit"] = head.exit_summary()
        if out_dir:
            (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run_prediction(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, *, score_thr: float = PREDICT_SCORE_THR,
                   overrides: dict | None = None, device: str = "auto", progress: bool = True) -> list[dict]:
    """Overlay PNGs (masks, boxes, class names, scores) and a COCO-style results JSON for images or folders.

    Returns one entry per input file: {'file_name', 'overlay', 'detections'}, or {'file_name', 'error'} for a
    file that could not be read (it is skipped; the others are still predicted). results.json is written
    even when the run stops early.
    """
    out_dir = ensure_writable_dir(out_dir, "prediction output directory")
    files = collect_images(inputs)
    model, meta = load_model(checkpoint, overrides, device)
    cat_ids = list(meta.get("cat_ids") or range(1, model.cfg.num_classes + 1))
    results = []

    def write(image_id: int, path: Path, name: str, image: torch.Tensor, pred: dict) -> dict:
        draw_predictions(image, pred, model.class_names, score_thr=score_thr).save(out_dir / name)
        for r in results_to_coco([pred], [image_id], cat_ids):
            r["file_name"] = str(path)
            results.append(r)
        return {"file_name": str(path), "overlay": name, "detections": int((pred["scores"] >= score_thr).sum())}

    try:  # memory O(H x W) on big photos: masks are pasted one chunk at a time
        return predict_images(model, files, unique_output_names(files), write, progress=progress,
                              context=deferred_mask_pasting)
    finally:
        atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(results).encode()))
