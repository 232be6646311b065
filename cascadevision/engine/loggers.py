"""Where a training run reports its numbers besides metrics.jsonl: TensorBoard (default), Weights & Biases, MLflow.

`train.loggers` lists them (`[tensorboard]` by default, `[]` for none). The trainer makes one `RunLoggers` on
process 0 (the other processes get an empty one) and calls:

    scalars({"loss": 1.2, "lr": 0.02, ...}, step, prefix="train")   -> tags `train/loss`, `train/lr`, ...
    scalars({"bbox.AP": 31.0, ...}, step, prefix="eval")             -> tags `eval/bbox.AP`, ...
    images({"val/0": rgb_uint8_hwc, ...}, step)                     -> prediction overlays
    close()

TensorBoard event files go to `RUN_DIR/tensorboard/`. A resumed run adds a new event file there and purges the
events an interrupted run logged after the checkpoint it resumes from (`purge_step`: steps > start), so the
curves continue without a doubled stretch. Weights & Biases writes under `RUN_DIR/wandb/` and resumes the run
whose id is kept in `RUN_DIR/wandb/run_id`; MLflow logs to `RUN_DIR/mlruns` unless MLFLOW_TRACKING_URI says
otherwise. Each backend is imported only when asked for (they are optional dependencies); one that is asked for
and missing is a one-line ConfigError before training starts, except TensorBoard, the default, which is skipped
with a note.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

RUN_DIR_ENTRIES = ("tensorboard", "wandb", "mlruns")  # what the loggers write into a run directory
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(names) -> list[str]:
    """The loggers of `train.loggers` that can run here; raises ConfigError for an unknown or missing optional one."""
    usable = []
    for name in names:
        if name not in _PACKAGES:
            raise ConfigError(f"train.loggers: unknown logger '{name}'; valid: {', '.join(_PACKAGES)}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            if name == "tensorboard":
                print("note: the tensorboard package is not installed: no TensorBoard event files "
                      "(pip install tensorboard, or train.loggers=[] to silence this)", file=sys.stderr)
                continue
            raise ConfigError(f"train.loggers: '{name}' is not installed (pip install {_PACKAGES[name]}), or remove "
                              f"it from train.loggers")
        usable.append(name)
    return usable


class RunLoggers:
    """The run's loggers; every call goes to each of them. An empty list makes every call a no-op."""

    def __init__(self, names, out_dir: str | Path, *, config: dict | None = None, start_step: int = 0,
                 resumed: bool = False):
        self.out_dir = Path(out_dir)
        self.backends = [_BACKENDS[name](self.out_dir, config or {}, start_step, resumed)
                         for name in check_loggers(names)]

    def scalars(self, values: dict[str, Any], step: int, prefix: str) -> None:
        numbers = {f"{prefix}/{key}": float(value) for key, value in _flatten(values).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for backend in self.backends:
            backend.scalars(numbers, step)

    def images(self, images: dict[str, np.ndarray], step: int) -> None:
        for backend in self.backends:
            backend.images(images, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"bbox": {"AP": 1}} -> {"bbox.AP": 1}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _TensorBoard:
    def __init__(self, out_dir: Path, config: dict, start_step: int, resumed: bool):
        # lazy: the tensorboard package is optional, and importing it takes a while
        from torch.utils.tensorboard import SummaryWriter
        purge = start_step + 1 if resumed else None  # hide what an interrupted run logged past its checkpoint
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def images(self, images: dict[str, np.ndarray], step: int) -> None:
        for tag, image in images.items():
            self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, config: dict, start_step: int, resumed: bool):
        import wandb  # lazy: optional dependency
        self.wandb = wandb
        directory = out_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / "run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project="cascadevision", dir=str(out_dir), config=config, id=run_id,
                              resume="allow", name=out_dir.name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({tag: self.wandb.Image(image) for tag, image in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out_dir: Path, config: dict, start_step: int, resumed: bool):
        import mlflow  # lazy: optional dependency
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=out_dir.name)
        mlflow.log_params({key: str(value)[:250] for key, value in _flatten(config).items()})

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({tag.replace("/", "."): value for tag, value in values.items()}, step=step)

    def images(self, images: dict[str, np.ndarray], step: int) -> None:
        for tag, image in images.items():
            self.mlflow.log_image(image, f"{tag.replace('/', '_')}_{step:07d}.png")

    def close(self) -> None:
        self.mlflow.end_run()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}
