"""The jobs the CLI runs (train, evaluate, predict), as plain functions a script can call too."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from .config import Config, validate
from .errors import ConfigError, DatasetError
from .outputs import ensure_writable_dir


def train_datasets(cfg: Config):
    """(train, val or None) CocoDatasets for a config's data section; an empty split is a DatasetError."""
    from .data import CocoDataset, RandomHorizontalFlip

    data = cfg.data
    if not data.train_ann or not data.train_images:
        raise ConfigError("training needs data.train_ann and data.train_images (--train-ann, --train-images)")
    semantic = cfg.model.roi_head.with_semantic
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


def resolve_device(name: str) -> torch.device:
    from .engine.trainer import resolve_device as resolve

    return resolve(name)


def run_training(cfg: Config, out_dir: str | Path, *, resume: bool | str = False, weights: str = "",
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Build datasets and the model for `cfg`, load initial weights, train, evaluate at the end.

    Everything that can be checked before training is: the run directory (see `engine.rundir`), the
    annotation files, every image's existence and size (`data.check_images`), and that the validation set's
    categories are the training set's.
    """
    from .data import check_dataset, match_classes
    from .engine import train
    from .engine.rundir import check_run_dir
    from .models import build_from_config
    from .weights import load_weights

    validate(cfg)
    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
    ensure_writable_dir(out_dir, "run directory")
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
            _note(mapping.note)
        if cfg.train.eval_at_end and not any(not a.get("iscrowd", 0) for a in val_set.coco.dataset["annotations"]):
            raise DatasetError(f"{cfg.data.val_ann}: no annotations to evaluate against; give a validation set "
                               "with annotations, or train.eval_at_end=false")
    model_cfg = dataclasses.replace(cfg.model, num_classes=train_set.num_classes,
                                    class_names=tuple(train_set.class_names))
    if cfg.model.roi_head.with_semantic and not cfg.data.train_semantic:
        # things-only labels derived from the instance masks: one class per thing plus background
        model_cfg = dataclasses.replace(model_cfg, roi_head=dataclasses.replace(
            model_cfg.roi_head, semantic_num_classes=train_set.num_classes + 1))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed too
    model = build_from_config(model_cfg)
    init = weights or cfg.model.weights
    if init and not resume:
        report = load_weights(model, init)
        if report["reinitialised"]:
            print(f"weights: {init}: re-initialised for {model_cfg.num_classes} classes: "
                  f"{', '.join(report['reinitialised'])}")
    return train(cfg, model, train_set, out_dir, val_dataset=val_set, resume=resume, overwrite=overwrite,
                 progress=progress, val_cat_ids=val_cat_ids)


def load_model(checkpoint: str | Path, overrides: dict | None = None, device: str = "auto"):
    from .weights import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint, **(overrides or {}))
    return model.to(resolve_device(device)).eval(), meta


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
    from .data import CocoDataset, match_classes
    from .engine import evaluate

    if out_dir:
        ensure_writable_dir(out_dir, "evaluation output directory")
    model, meta = load_model(checkpoint, overrides, device)
    dataset = CocoDataset(ann, images, train=False)
    names, ids = checkpoint_classes(model, meta)
    mapping = match_classes(names, ids, dataset.class_names, dataset.cat_ids, class_map=class_map,
                            model_source=f"checkpoint ({checkpoint})", dataset_source=f"annotation file ({ann})",
                            num_model_classes=model.cfg.num_classes)
    if mapping.note:
        _note(mapping.note)
    head = model.roi_head
    if hasattr(head, "reset_exit_stats"):
        head.reset_exit_stats()
    metrics = evaluate(model, dataset, out_dir=out_dir, progress=progress, cat_ids=mapping.cat_ids)
    if hasattr(head, "exit_summary"):
        metrics["early_exit"] = head.exit_summary()
        if out_dir:
            (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(paths: list[str]) -> list[Path]:
    """The image files named in `paths`, and those directly inside the directories named there (by suffix;
    sub-directories, even one called `x.jpg`, are not images). A path that does not exist is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such image file or directory")
    if not files:
        raise DatasetError(f"no images found in {', '.join(paths)}")
    return files


def unique_output_names(files: list[Path], suffix: str = ".png") -> list[str]:
    """One output file name per input, never two alike: `a.png` for `a.jpg`; `a_jpg.png` and `a_png.png` when
    both `a.jpg` and `a.png` are given; a numbered name when even those collide (same name in two folders)."""
    stems = [f.stem for f in files]
    repeated = {s for s in stems if stems.count(s) > 1}
    names, taken = [], set()
    for file, stem in zip(files, stems):
        base = f"{stem}_{file.suffix.lstrip('.').lower()}" if stem in repeated else stem
        name, k = f"{base}{suffix}", 1
        while name in taken:
            k += 1
            name = f"{base}_{k}{suffix}"
        taken.add(name)
        names.append(name)
    return names


def run_prediction(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, *, score_thr: float = 0.3,
                   overrides: dict | None = None, device: str = "auto", progress: bool = True) -> list[dict]:
    """Overlay PNGs (masks, boxes, class names, scores) and a COCO-style results JSON for images or folders.

    Returns one entry per input file: {'file_name', 'overlay', 'detections'}, or {'file_name', 'error'} for a
    file that could not be read (it is skipped; the others are still predicted). results.json is written
    even when the run stops early.
    """
    from tqdm import tqdm

    from .data import load_image
    from .engine.checkpoint import atomic_write
    from .engine.evaluator import deferred_mask_pasting, results_to_coco
    from .visualize import draw_predictions

    out_dir = ensure_writable_dir(out_dir, "prediction output directory")
    files = collect_images(inputs)
    model, meta = load_model(checkpoint, overrides, device)
    device_ = next(model.parameters()).device
    cat_ids = list(meta.get("cat_ids") or range(1, model.cfg.num_classes + 1))
    results, summary = [], []
    try:
        for image_id, (path, name) in enumerate(tqdm(list(zip(files, unique_output_names(files))),
                                                      desc="predict", disable=not progress)):
            try:
                image = load_image(path)
            except (DatasetError, OSError) as exc:
                summary.append({"file_name": str(path), "error": str(exc)})
                continue
            with torch.inference_mode(), deferred_mask_pasting(model):  # memory O(H x W) on big photos
                pred = model([image.to(device_).float() / 255])[0]
            pred = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in pred.items()}
            draw_predictions(image, pred, model.class_names, score_thr=score_thr).save(out_dir / name)
            for r in results_to_coco([pred], [image_id], cat_ids):
                r["file_name"] = str(path)
                results.append(r)
            summary.append({"file_name": str(path), "overlay": name,
                            "detections": int((pred["scores"] >= score_thr).sum())})
    finally:
        atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(results).encode()))
    return summary


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)
