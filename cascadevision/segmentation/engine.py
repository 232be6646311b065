"""Training, evaluation and prediction jobs for semantic segmentation, as plain functions the CLI and scripts call.

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

from ..config import update
from ..engine import distributed as dist_utils
from ..errors import CheckpointError, ConfigError, DatasetError
from .config import SegModelConfig, SegmentationConfig, build_segmenter
from ..engine.rundir import check_run_dir
from ..pipeline import collect_images
from .dataset import SegmentationDataset, train_transforms
from .metrics import ConfusionMatrix, format_scores


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


def run_training(cfg: SegmentationConfig, out_dir: str | Path, *, resume: bool | str = False, weights: str = "",
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Build the datasets and the model, load initial weights, train, evaluate on the val split at the end."""
    from ..engine import train
    from ..weights import load_weights

    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
    train_set, val_set = datasets(cfg)
    model_cfg = dataclasses.replace(cfg.model, num_classes=train_set.num_classes,
                                    class_names=tuple(train_set.class_names))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed too
    model = build_segmenter(model_cfg)
    init = weights or model_cfg.weights
    if init and not resume:
        load_weights(model, init)
    return train(cfg, model, train_set, out_dir, val_dataset=val_set, resume=resume, overwrite=overwrite,
                 progress=progress, evaluate_fn=evaluate)


def evaluate(model: torch.nn.Module, dataset: SegmentationDataset, *, out_dir: str | Path | None = None,
             device: str | torch.device | None = None, progress: bool = True, num_workers: int = 0,
             batch_size: int = 1) -> dict:
    """mIoU, mDice, pixel accuracy and per-class IoU / Dice (percent) of `model` on `dataset`.

    Under DDP each process predicts every world_size-th image and the confusion matrices are summed. With
    `out_dir`, process 0 writes metrics.json and metrics.md (the table) there.
    """
    from ..data import collate

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


# ----------------------------------------------------------------------------------------------------------
# checkpoints -> models


def model_from_checkpoint(path: str | Path, overrides: dict | None = None, device: str = "auto"):
    """(model in eval mode on `device`, meta) from a segmentation checkpoint written by training."""
    from ..pipeline import resolve_device
    from ..weights import read_state_dict

    state, meta = read_state_dict(path)
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: has no model config in its meta (not a cascadevision checkpoint)")
    if "decoder" not in config["model"]:
        raise CheckpointError(f"{path}: not a segmentation checkpoint (its model has no decoder; "
                              "use `cascadevision eval` for detectors)")
    model_cfg = update(SegModelConfig(), config["model"], prefix="model.")
    if overrides:
        model_cfg = update(model_cfg, overrides, prefix="model.")
    model = build_segmenter(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[1:2]).strip()
        raise CheckpointError(f"{path}: weights do not match the model in its own config ({first})") from None
    return model.to(resolve_device(device)).eval(), meta


def run_evaluation(checkpoint: str | Path, images: str | Path, labels: str | Path, out_dir: str | Path | None = None,
                   *, device: str = "auto", progress: bool = True) -> dict:
    model, _ = model_from_checkpoint(checkpoint, device=device)
    dataset = SegmentationDataset(images, labels, class_names=model.class_names or None)
    if dataset.num_classes != model.num_classes:
        raise DatasetError(f"{labels}: {dataset.num_classes} classes, but {checkpoint} predicts {model.num_classes}")
    return evaluate(model, dataset, out_dir=out_dir, progress=progress)


def run_prediction(checkpoint: str | Path, inputs: list[str], out_dir: str | Path, *, device: str = "auto",
                   progress: bool = True, alpha: float = 0.5) -> list[dict]:
    """For each image: `out_dir/overlays/<stem>.png` (colours + legend) and `out_dir/labels/<stem>.png` (uint8
    label map). Returns, and writes to predictions.json, the fraction of pixels given to each class."""
    from ..data import load_image
    from .visualize import draw_segmentation

    model, _ = model_from_checkpoint(checkpoint, device=device)
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    out_dir = Path(out_dir)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    model_device = next(model.parameters()).device
    summary = []
    for path in tqdm(collect_images(inputs), desc="predict", disable=not progress):
        image = load_image(path)  # uint8 (3, H, W)
        with torch.inference_mode():
            labels = model([image.to(model_device).float() / 255])[0]["semantic"].cpu()  # (H, W)
        Image.fromarray(labels.numpy().astype(np.uint8)).save(out_dir / "labels" / f"{path.stem}.png")
        draw_segmentation(image, labels, names, alpha=alpha).save(out_dir / "overlays" / f"{path.stem}.png")
        counts = torch.bincount(labels.flatten(), minlength=model.num_classes)
        fractions = {names[c]: round(float(n) / labels.numel(), 4) for c, n in enumerate(counts.tolist()) if n}
        summary.append({"file_name": str(path), "classes": fractions})
    (out_dir / "predictions.json").write_text(json.dumps({"class_names": names, "images": summary}, indent=2))
    return summary
