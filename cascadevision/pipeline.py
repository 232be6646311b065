"""The jobs the CLI runs (train, evaluate, predict), as plain functions a script can call too."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .config import Config
from .errors import ConfigError, DatasetError


def train_datasets(cfg: Config):
    """(train, val or None) CocoDatasets for a config's data section."""
    from .data import CocoDataset, RandomHorizontalFlip

    data = cfg.data
    if not data.train_ann or not data.train_images:
        raise ConfigError("training needs data.train_ann and data.train_images (--train-ann, --train-images)")
    semantic = cfg.model.roi_head.with_semantic
    train = CocoDataset(data.train_ann, data.train_images, train=True, transforms=RandomHorizontalFlip(data.flip_prob),
                        semantic_dir=data.train_semantic or None,
                        derive_semantic=semantic and not data.train_semantic,
                        filter_empty=data.filter_empty, min_size=data.min_size)
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
                 progress: bool = True) -> dict:
    """Build datasets and the model for `cfg`, load initial weights, train, evaluate at the end."""
    from .engine import train
    from .models import build_from_config
    from .weights import load_weights

    train_set, val_set = train_datasets(cfg)
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
    return train(cfg, model, train_set, out_dir, val_dataset=val_set, resume=resume, progress=progress)


def load_model(checkpoint: str | Path, overrides: dict | None = None, device: str = "auto"):
    from .weights import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint, **(overrides or {}))
    return model.to(resolve_device(device)).eval(), meta


def run_evaluation(checkpoint: str | Path, ann: str, images: str, out_dir: str | Path,
                   overrides: dict | None = None, device: str = "auto", progress: bool = True) -> dict:
    from .data import CocoDataset
    from .engine import evaluate

    model, _ = load_model(checkpoint, overrides, device)
    dataset = CocoDataset(ann, images, train=False)
    head = model.roi_head
    if hasattr(head, "reset_exit_stats"):
        head.reset_exit_stats()
    metrics = evaluate(model, dataset, out_dir=out_dir, progress=progress)
    if hasattr(head, "exit_summary"):
        metrics["early_exit"] = head.exit_summary()
        if out_dir:
            (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such image file or directory")
    if not files:
        raise DatasetError(f"no images found in {', '.join(paths)}")
    return files


def run_prediction(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, *, score_thr: float = 0.3,
                   overrides: dict | None = None, device: str = "auto", progress: bool = True) -> list[dict]:
    """Overlay PNGs (masks, boxes, class names, scores) and a COCO-style results JSON for images or folders."""
    from tqdm import tqdm

    from .data import load_image
    from .engine.evaluator import results_to_coco
    from .visualize import draw_predictions

    model, meta = load_model(checkpoint, overrides, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_ = next(model.parameters()).device
    cat_ids = list(meta.get("cat_ids") or range(1, model.cfg.num_classes + 1))
    results, summary = [], []
    files = collect_images(inputs)
    for image_id, path in enumerate(tqdm(files, desc="predict", disable=not progress)):
        image = load_image(path)
        with torch.inference_mode():
            pred = model([image.to(device_).float() / 255])[0]
        pred = {k: v.cpu() for k, v in pred.items()}
        draw_predictions(image, pred, model.class_names, score_thr=score_thr).save(out_dir / f"{path.stem}.png")
        for r in results_to_coco([pred], [image_id], cat_ids):
            r["file_name"] = str(path)
            results.append(r)
        summary.append({"file_name": str(path), "detections": int((pred["scores"] >= score_thr).sum())})
    (out_dir / "results.json").write_text(json.dumps(results))
    return summary
