"""What every task shares: a `Task` declares its presets and config, model builder, datasets, evaluator and metric
table; `run_training`, `model_from_checkpoint` and `predict_images` are written once against that description.

    DETECTION.load_config("mask_rcnn_r18_fpn", ["train.max_iters=100"])
    model, meta = SEGMENTATION.model_from_checkpoint("runs/seg/checkpoints/final.pth", device="cpu")
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import update
from ..data.image import load_image
from ..engine import train
from ..engine.rundir import check_run_dir
from ..engine.trainer import resolve_device
from ..errors import CheckpointError, ConfigError, DatasetError
from ..export.compile import compile_model
from ..io.checkpoint import read_state_dict, state_dict_mismatch
from ..io.weights import load_weights
from ..outputs import ensure_writable_dir, ensure_writable_file
from ..presets import PresetFamily


@dataclass(frozen=True)
class Training:
    """What a task hands the training loop: the config with the dataset's classes, the datasets, the evaluator."""
    cfg: Any
    train_set: Any
    val_set: Any
    evaluate: Callable


@dataclass(frozen=True)
class Task:
    name: str
    presets: PresetFamily  # the config class, the named presets and the loader
    model_config: type | None  # the `model` section's class (None: the task keeps its own checkpoint format)
    build_model: Callable  # model config -> nn.Module
    prepare_training: Callable[[Any], Training] | None  # config -> datasets (checked), classes, evaluator
    format_metrics: Callable[..., str]
    check_checkpoint: Callable[[Path, dict], None] | None = None  # raises when a checkpoint is another task's
    no_config_hint: str = ""  # what to do with a checkpoint that has no config of ours ({path}: the file)
    # (model, path, format, checkpoint meta) -> metadata written: the task's exporter (None: it has none yet)
    export_model: Callable[..., dict] | None = None

    def load_config(self, preset_or_path: str | Path | None = None, overrides: list[str] | dict | None = None):
        return self.presets.load(preset_or_path, overrides)

    def model_from_checkpoint(self, path: str | Path, overrides: dict | None = None, device: str | None = "auto"):
        """(model, meta): the model a checkpoint of ours was trained with (its config, then `overrides` of the
        model section), its weights loaded; on `device` in eval mode, or as built when `device` is None."""
        state, meta = read_state_dict(path)
        config = meta.get("config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: has no model config in its meta (not a cascadevision checkpoint)"
                                  + (f"; {self.no_config_hint.format(path=path)}" if self.no_config_hint else ""))
        values = config.get("model", config)
        if self.check_checkpoint is not None:
            self.check_checkpoint(Path(path), values)
        model_cfg = update(self.model_config(), values, prefix="model.", stored=True)
        if overrides:
            model_cfg = update(model_cfg, overrides, prefix="model.")
        model = self.build_model(model_cfg)
        mismatch = state_dict_mismatch(model.state_dict(), state)
        if mismatch:
            raise CheckpointError(f"{path}: weights do not match the model in its own config"
                                  f"{' with the overrides' if overrides else ''}: {mismatch}")
        model.load_state_dict(state, strict=True)
        if device is None:
            return model, meta
        return model.to(resolve_device(device)).eval(), meta

    def export(self, checkpoint: str | Path, out: str | Path, fmt: str = "onnx", overrides: dict | None = None) -> dict:
        """Write the model of a checkpoint of ours as an ONNX file or a torch.export program (`cascadevision
        export`); returns the metadata stored with it."""
        if self.export_model is None:
            raise ConfigError(f"export: {self.name} models have no exporter yet (detectors do)")
        ensure_writable_file(out, "export file")
        model, meta = self.model_from_checkpoint(checkpoint, overrides, device="cpu")
        return self.export_model(model, Path(out), fmt, meta)

    def run_training(self, cfg, out_dir: str | Path, *, resume: bool | str = False, weights: str = "",
                     progress: bool = True, overwrite: bool = False, compile: bool = False) -> dict:
        """Check what can be checked (the run directory, then the task's data), build the model with the
        dataset's classes, load initial weights, train with the engine, evaluate on the val split at the end.
        `compile`: the model's dense parts run through torch.compile (`export.compile.compile_model`)."""
        if self.presets.validate is not None:
            self.presets.validate(cfg)
        check_run_dir(out_dir, resume=resume, overwrite=overwrite)
        ensure_writable_dir(out_dir, "run directory")
        job = self.prepare_training(cfg)
        torch.manual_seed(job.cfg.train.seed)  # the initial weights depend on the seed too
        model = self.build_model(job.cfg.model)
        init = weights or job.cfg.model.weights
        if init and not resume:
            report = load_weights(model, init)
            if report["reinitialised"]:
                print(f"weights: {init}: re-initialised for {job.cfg.model.num_classes} classes: "
                      f"{', '.join(report['reinitialised'])}")
        if compile:
            compile_model(model)
        return train(job.cfg, model, job.train_set, out_dir, val_dataset=job.val_set, resume=resume,
                     overwrite=overwrite, progress=progress, evaluate_fn=job.evaluate)


def predict_images(model: torch.nn.Module, files: list[Path], names: list[str],
                   write: Callable[[int, Path, str, torch.Tensor, dict], dict], *, progress: bool = True,
                   context: Callable[[torch.nn.Module], Any] | None = None) -> list[dict]:
    """Run `model` on each image file (uint8 read, scaled to [0, 1]) and hand the prediction, on the CPU, to
    `write(index, path, output name, image, prediction)`, which returns the file's summary entry. A file that
    cannot be read is skipped: its entry is {'file_name', 'error'}, and the others are still predicted."""
    device = model.device if hasattr(model, "device") else next(model.parameters()).device  # an exported model
    summary = []
    for index, (path, name) in enumerate(tqdm(list(zip(files, names)), desc="predict", disable=not progress)):
        try:
            image = load_image(path)  # uint8 (3, H, W)
        except (DatasetError, OSError) as exc:
            summary.append({"file_name": str(path), "error": str(exc)})
            continue
        with torch.inference_mode(), (context(model) if context else contextlib.nullcontext()):
            pred = model([image.to(device).float() / 255])[0]
        pred = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in pred.items()}
        summary.append(write(index, path, name, image, pred))
    return summary


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def failed(summary: Iterable[dict]) -> list[dict]:
    return [entry for entry in summary if "error" in entry]
