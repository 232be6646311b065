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
from .base import Task

__all__ = ["EXITS", "TASK", "bench_run", "calibrate_run", "evaluate_run", "format_bench", "load_run", "save_run",
           "train_run"]


def format_report(report: dict, title: str = "") -> str:
    """The exit table of `evaluate_run` / `evaluate_anytime`."""
    return report["table"]


EXITS = Task(name="exits", presets=EXITS_PRESETS, model_config=ExitModelConfig, build_model=build_exit_model,
             prepare_training=None, format_metrics=format_report)
TASK = EXITS
