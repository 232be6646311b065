"""Early-exit classifiers: the task description. Its workflow (train -> calibrate -> evaluate -> bench, with the
learned gates saved beside the model) is `cascadevision.early_exit.pipeline`, and its commands are
`cascadevision exits ...` (`early_exit/cli.py`): they differ from the detection-style train/eval/predict, so this
task keeps its own checkpoint format and training loop (`prepare_training` is None)."""
from __future__ import annotations

from ..early_exit.config import ExitModelConfig
from ..early_exit.models import build_exit_model
from ..early_exit.pipeline import (bench_run, calibrate_run, evaluate_run, format_bench, load_run, save_run,
                                   train_run)
from ..early_exit.presets import EXITS_PRESETS
from ..export.dense import export_exit_model
from .base import Task

__all__ = ["EXITS", "TASK", "bench_run", "export_model", "calibrate_run", "evaluate_run", "format_bench", "load_run", "save_run",
           "train_run"]


def format_report(report: dict, title: str = "") -> str:
    """The exit table of `evaluate_run` / `evaluate_anytime`."""
    return report["table"]


def export_model(model, path, fmt: str, meta: dict) -> dict:
    """The exits task's exporter (`Task.export`): the full multi-exit model, every exit's logits out (batch
    dynamic, the run's data.image_size fixed); the gates and calibrated thresholds stay outside the graph."""
    config = meta.get("config") or {}
    image_size = int((config.get("data") or {}).get("image_size", 32))
    channels = int((config.get("model") or {}).get("in_channels", 1))
    preset = str(config.get("preset", "") or meta.get("preset", "") or "")
    return export_exit_model(model, path, fmt, image_size=image_size, channels=channels, preset=preset)


EXITS = Task(name="exits", presets=EXITS_PRESETS, model_config=ExitModelConfig, build_model=build_exit_model,
             prepare_training=None, format_metrics=format_report, export_model=export_model)
TASK = EXITS
