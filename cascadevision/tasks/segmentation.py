"""Semantic segmentation (the CASCADE decoder): the task description and its train / evaluate / predict jobs.

Training goes through the detection engine (`cascadevision.engine.train`): the same progress bar, checkpoints,
exact resume, DDP, metrics.jsonl and loss curve; only the end-of-training evaluation is ours (`evaluate`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.transforms import collate
from ..engine import distributed as dist_utils
from ..errors import CheckpointError, ConfigError, DatasetError
from ..export.dense import export_segmenter
from ..io.images import collect_images, unique_output_names
from ..outputs import ensure_writable_dir
from ..segmentation.config import SegmentationConfig, SegModelConfig
from ..segmentation.dataset import SegmentationDataset, train_transforms
from ..segmentation.metrics import ConfusionMatrix, format_scores
from ..segmentation.model import build_segmenter
from ..segmentation.presets import SEGMENTATION_PRESETS
from ..segmentation.visualize import draw_segmentation
from .base import Task, Training, predict_images

__all__ = ["SEGMENTATION", "TASK", "datasets", "evaluate", "export_model", "format_scores", "model_from_checkpoint",
           "run_evaluation", "run_prediction", "run_training"]


def datasets(cfg: SegmentationConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(train, val or None) for a config's data section; val uses the train set's classes."""
    data = cfg.data
    if not data.train_images or not data.train_labels:
        raise ConfigError("training needs data.train_images and data.train_labels (--train-images, --train-labels)")
    train_set = SegmentationDataset(data.train_images, data.train_labels, classes_file=data.classes or None,
                                    transforms=train_transforms(data.augment))
    val_set = None
    if data.val_images or data.val_labels:
        if not (data.val_images and data.val_labels):
            raise ConfigError("give both data.val_images and data.val_labels (--val-images, --val-labels)")
        val_set = SegmentationDataset(data.val_images, data.val_labels, class_names=train_set.class_names)
    return train_set, val_set


def prepare_training(cfg: SegmentationConfig) -> Training:
    train_set, val_set = datasets(cfg)
    model_cfg = dataclasses.replace(cfg.model, num_classes=train_set.num_classes,
                                    class_names=tuple(train_set.class_names))
    return Training(dataclasses.replace(cfg, model=model_cfg), train_set, val_set, evaluate)


def evaluate(model: torch.nn.Module, dataset: SegmentationDataset, *, out_dir: str | Path | None = None,
             device: str | torch.device | None = None, progress: bool = True, num_workers: int = 0,
             batch_size: int = 1) -> dict:
    """mIoU, mDice, pixel accuracy and per-class IoU / Dice (percent) of `model` on `dataset`.

    Under DDP each process predicts every world_size-th image and the confusion matrices are summed. With
    `out_dir`, process 0 writes metrics.json and metrics.md (the table) there.
    """
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    indices = list(range(rank, len(dataset), world_size))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=num_workers)
    confusion = ConfusionMatrix(dataset.num_classes)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(batches), desc="eval", dynamic_ncols=True,
                                          disable=not (progress and rank == 0)) as bar:
            for images, targets in loader:
                outputs = model([image.to(device, non_blocking=True) for image in images])
                for output, target in zip(outputs, targets):
                    confusion.update(output["semantic"], target["semantic"])
                bar.update(1)
    finally:
        model.train(was_training)
    for i, matrix in enumerate(dist_utils.all_gather_object(confusion.matrix)):
        if i != rank:
            confusion.merge(matrix)
    scores = confusion.scores(dataset.class_names)
    if out_dir is not None and rank == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
        (out_dir / "metrics.md").write_text(format_scores(scores) + "\n")
    return scores


def _check_checkpoint(path: Path, model_values: dict) -> None:
    if "decoder" not in model_values:
        raise CheckpointError(f"{path}: not a segmentation checkpoint (its model has no decoder; "
                              "use `cascadevision eval` for detectors)")


def export_model(model, path: Path, fmt: str, meta: dict) -> dict:
    """The segmentation task's exporter (`Task.export`): normalised batch in (dynamic batch, height and width),
    summed logits out; the checkpoint's classes and preset travel with the file (`export.dense`)."""
    config = meta.get("config") or {}
    preset = (config.get("model", config) or {}).get("preset", "")
    return export_segmenter(model, path, fmt, preset=preset)


SEGMENTATION = Task(
    name="segmentation", presets=SEGMENTATION_PRESETS, model_config=SegModelConfig, build_model=build_segmenter,
    prepare_training=prepare_training, format_metrics=format_scores, check_checkpoint=_check_checkpoint,
    export_model=export_model)
TASK = SEGMENTATION  # what `cascadevision.commands` runs


def run_training(cfg: SegmentationConfig, out_dir: str | Path, *, resume: bool | str = False, weights: str = "",
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Build the datasets and the model, load initial weights, train, evaluate on the val split at the end."""
    return SEGMENTATION.run_training(cfg, out_dir, resume=resume, weights=weights, progress=progress,
                                     overwrite=overwrite)


def model_from_checkpoint(path: str | Path, overrides: dict | None = None, device: str = "auto"):
    """(model in eval mode on `device`, meta) from a segmentation checkpoint written by training."""
    return SEGMENTATION.model_from_checkpoint(path, overrides, device)


def run_evaluation(checkpoint: str | Path, images: str | Path, labels: str | Path, out_dir: str | Path | None = None,
                   *, device: str = "auto", progress: bool = True) -> dict:
    if out_dir:
        ensure_writable_dir(out_dir, "evaluation output directory")
    model, _ = model_from_checkpoint(checkpoint, device=device)
    dataset = SegmentationDataset(images, labels, class_names=model.class_names or None)
    if dataset.num_classes != model.num_classes:
        raise DatasetError(f"{labels}: {dataset.num_classes} classes, but {checkpoint} predicts {model.num_classes}")
    return evaluate(model, dataset, out_dir=out_dir, progress=progress)


def run_prediction(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, *, device: str = "auto",
                   progress: bool = True, alpha: float = 0.5) -> list[dict]:
    """For each image: `out_dir/overlays/<stem>.png` (colours + legend) and `out_dir/labels/<stem>.png` (uint8
    label map). Returns, and writes to predictions.json, the fraction of pixels given to each class; a file
    that cannot be read is skipped (its entry is {'file_name', 'error'})."""
    out_dir = ensure_writable_dir(out_dir, "prediction output directory")
    files = collect_images(inputs)
    model, _ = model_from_checkpoint(checkpoint, device=device)
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)

    def write(index: int, path: Path, name: str, image: torch.Tensor, pred: dict) -> dict:
        labels = pred["semantic"]  # (H, W)
        Image.fromarray(labels.numpy().astype(np.uint8)).save(out_dir / "labels" / name)
        draw_segmentation(image, labels, names, alpha=alpha).save(out_dir / "overlays" / name)
        counts = torch.bincount(labels.flatten(), minlength=model.num_classes)
        fractions = {names[c]: round(float(n) / labels.numel(), 4) for c, n in enumerate(counts.tolist()) if n}
        return {"file_name": str(path), "classes": fractions}

    summary = predict_images(model, files, unique_output_names(files), write, progress=progress)
    (out_dir / "predictions.json").write_text(json.dumps({"class_names": names, "images": summary}, indent=2))
    return summary
