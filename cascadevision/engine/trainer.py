"""The training loop: iteration-based SGD with warm-up and step decay, DDP, AMP, checkpoints and exact resume.

Files written under `out_dir` (by process 0 only):
    config.yaml                      the resolved config, at the start
    metrics.jsonl                    one JSON object per `log_interval` iterations, plus {"type": "eval", ...}
    checkpoints/iter_{N:07d}.pth     full training state every `checkpoint_interval` iterations and at the end
                                     (the last `keep_checkpoints` kept; a periodic one less than half an
                                     interval before the end is removed once the end-of-run one is written)
    checkpoints/latest.pth           the newest of those
    checkpoints/final.pth            weights and meta only, at the end
    checkpoints/best.pth             with `eval_interval`: weights and meta of the best evaluation so far (segm AP,
                                     or bbox AP for box-only models), meta["best"] = {metric, value, iteration}
    loss_curve.png                   at the end
    eval/                            results.json, metrics.json, coco_eval.txt when a val_dataset is given
    tensorboard/                     event files (`train.loggers`, see `loggers`): train/* every log_interval,
                                     eval/* and a few prediction overlays (val/*) per evaluation

Progress, on process 0: on a terminal a progress bar (total loss and lr); otherwise, or with `progress=False`,
one line on stderr per `log_interval` iterations (iteration, lr, total and main losses, it/s, ETA), so a log
file stays readable and a run without a bar still says how it is doing.

Mixed precision (`train.amp`): bf16 autocast (CPU and CUDA) or fp16 autocast with loss scaling (CUDA), see
`engine.amp`. Gradient accumulation (`train.accumulate` = N): an iteration is still one batch, and everything
counted in iterations (max_iters, warmup_iters, lr_steps when max_iters is set, log/checkpoint/eval intervals)
counts batches; each loss is scaled by 1/N and the optimizer steps after every N-th iteration (and after the
last), with the lr of that iteration, so N batches of B images make one update like one batch of N * B images
(for a loss that is a mean over images). checkpoint_interval and eval_interval must be multiples of N.

Resuming is exact: a run stopped after k iterations and resumed reaches the same weights, bit for bit on CPU,
as one that never stopped. That needs (a) every RNG restored, (b) the same batches in the same order, and
(c) data augmentation that does not depend on which process or worker loaded a sample, nor on where the run
started: each sample is loaded with RNGs seeded from (seed, epoch, index), see `_SeededSamples`.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import Config, TrainConfig, to_dict
from ..data.sampler import AspectRatioBatchSampler
from ..data.transforms import collate
from ..errors import CheckpointError, ConfigError, TrainingError
from ..io.checkpoint import (atomic_copy, atomic_write, cascadevision_version, load_checkpoint, save_checkpoint,
                             state_dict_mismatch)
from ..visualize import draw_predictions, plot_loss_curve
from . import distributed as dist_utils
from .amp import amp_dtype, autocast
from .evaluator import evaluate
from .loggers import RunLoggers, check_loggers
from .rundir import RunLock, check_run_dir, prepare_run_dir, remove_leftovers

_SMOOTHING_WINDOW = 20  # iterations averaged for the progress bar
_PREVIEW_IMAGES = 2  # val images drawn with their predictions for the loggers at each evaluation


class WarmupMultiStepLR:
    """lr = base_lr * decay(iteration) * warm-up factor.

    decay is gamma^(number of milestones <= iteration) for the step schedule, or for the cosine schedule
    min_ratio + (1 - min_ratio) * (1 + cos(pi * iteration / max_iters)) / 2. The warm-up factor rises linearly
    from `warmup_ratio` at iteration 0 to 1 at `warmup_iters` (MMDetection's linear warm-up). `step()` is
    called after each optimizer step; the state is just the iteration count, and the lr is recomputed from
    it, so a resumed run gets exactly the same values.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float,
                 warmup_iters: int, warmup_ratio: float, *, schedule: str = "step", max_iters: int = 0,
                 min_ratio: float = 0.0):
        if schedule not in ("step", "cosine"):
            raise ConfigError(f"train.lr_schedule: unknown schedule '{schedule}'; valid: step, cosine")
        if schedule == "cosine" and max_iters <= 0:
            raise ConfigError("train.lr_schedule: the cosine schedule needs the total number of iterations")
        self.optimizer = optimizer
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.schedule, self.max_iters, self.min_ratio = schedule, max_iters, min_ratio
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.iteration = 0
        self._apply()

    def factor(self, iteration: int) -> float:
        if self.schedule == "cosine":
            progress = min(iteration / self.max_iters, 1.0)
            decay = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = self.gamma ** sum(1 for milestone in self.milestones if iteration >= milestone)
        if iteration < self.warmup_iters:
            decay *= self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / self.warmup_iters
        return decay

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self._apply()

    def _apply(self) -> None:
        factor = self.factor(self.iteration)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum over every trainable parameter (the reference), or AdamW with weight decay only on
    weight matrices and kernels: norm scales, biases and other 1-D parameters are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=tuple(tc.betas))
    raise ConfigError(f"train.optimizer: unknown optimizer '{tc.optimizer}'; valid: sgd, adamw")


def train(cfg: Config, model: torch.nn.Module, train_dataset, out_dir: str | Path, *, val_dataset=None,
          resume: bool | str | Path = False, overwrite: bool = False, progress: bool = True,
          find_unused_parameters: bool = False, evaluate_fn=None, val_cat_ids=None) -> dict:
    """Train `model` on `train_dataset` as `cfg.train` says; returns the last logged metrics (+ eval metrics).

    The same call works in one process and under `torchrun --nproc_per_node N` (one process per device,
    `cfg.data.batch_size` images per process). `resume=True` continues from `out_dir/checkpoints/latest.pth`,
    a path continues from that checkpoint. A directory that already holds something is refused unless
    `resume` or `overwrite` (see `rundir`). A non-finite loss raises TrainingError.
    `evaluate_fn(model, val_dataset, *, out_dir, device, progress, num_workers) -> dict` scores the model on
    `val_dataset` at the end (default: COCO `evaluator.evaluate` with `cat_ids=val_cat_ids`, the val set's
    category id for each model label, see `data.match_classes`).
    """
    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
    check_loggers(cfg.train.loggers)  # an optional logger asked for and not installed: refused before any work
    created_group = not torch.distributed.is_initialized()
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world_size, _ = dist_utils.init_distributed("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        trainer = _Trainer(cfg, model, train_dataset, Path(out_dir), device, rank, world_size,
                           find_unused_parameters)
        return trainer.run(val_dataset, resume, overwrite, progress, evaluate_fn, val_cat_ids)
    finally:
        if created_group:
            dist_utils.cleanup()


class _Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, dataset, out_dir: Path, device: torch.device,
                 rank: int, world_size: int, find_unused_parameters: bool):
        self.cfg, self.model, self.dataset, self.device = cfg, model, dataset, device
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.out_dir = out_dir
        self.checkpoint_dir = out_dir / "checkpoints"
        self.metrics_path = out_dir / "metrics.jsonl"
        tc = cfg.train

        _seed_everything(tc.seed + rank)  # a resumed run replaces these states with the checkpoint's
        model.to(device)
        if world_size > 1 and dist_utils.wants_sync_batchnorm(cfg.model):  # norm: syncbn somewhere
            model = self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.amp_dtype = amp_dtype(tc.amp, device)  # before any work: fp16 on CPU is refused here
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters (all have requires_grad=False)")
        self.optimizer = build_optimizer(model, tc)
        self.sampler = AspectRatioBatchSampler(dataset.aspect_ratios, cfg.data.batch_size, shuffle=True,
                                               seed=tc.seed, rank=rank, world_size=world_size)
        self.iters_per_epoch = len(self.sampler)
        if self.iters_per_epoch == 0:
            raise TrainingError("the training set is empty: no batch to train on")
        self.max_iters = tc.max_iters if tc.max_iters > 0 else tc.epochs * self.iters_per_epoch
        milestones = list(tc.lr_steps) if tc.max_iters > 0 else [e * self.iters_per_epoch for e in tc.lr_steps]
        self.scheduler = WarmupMultiStepLR(self.optimizer, milestones, tc.lr_gamma, tc.warmup_iters, tc.warmup_ratio,
                                           schedule=tc.lr_schedule, max_iters=self.max_iters,
                                           min_ratio=tc.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.net = model
        if world_size > 1:
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused_parameters)
        self.iteration = 0
        self.last_checkpoint: Path | None = None
        self.log_lines = False  # set by run(): print a line per log_interval (no progress bar)
        self.loggers = RunLoggers([], out_dir)  # process 0's are made by run()
        self.val_dataset, self.evaluate_fn = None, None
        self.best: dict | None = None  # {"metric", "value", "iteration"} of checkpoints/best.pth

    # ------------------------------------------------------------------------------------------------------

    def run(self, val_dataset, resume: bool | str | Path, overwrite: bool, progress: bool, evaluate_fn=None,
            val_cat_ids=None) -> dict:
        lock = contextlib.nullcontext()
        if self.is_main:
            prepare_run_dir(self.out_dir, resume=resume, overwrite=overwrite, log=_note)
            lock = RunLock(self.out_dir)
        with lock:
            if self.is_main:
                for path in remove_leftovers(self.out_dir):
                    _note(f"removed {path.name}, left by an interrupted write")
            try:
                return self._run_locked(val_dataset, resume, progress, evaluate_fn, val_cat_ids)
            finally:
                self.loggers.close()

    def _run_locked(self, val_dataset, resume, progress: bool, evaluate_fn, val_cat_ids) -> dict:
        if resume:  # before anything is written: the checkpoint must fit this model first
            self._resume(self.checkpoint_dir / "latest.pth" if resume is True else Path(resume))
        if self.is_main:
            atomic_write(self.out_dir / "config.yaml",
                         lambda f: f.write(yaml.safe_dump(to_dict(self.cfg), sort_keys=False).encode()))
        start = self.iteration
        if self.is_main:
            self.loggers = RunLoggers(self.cfg.train.loggers, self.out_dir, config=to_dict(self.cfg),
                                      start_step=start, resumed=bool(resume))
            self.best = self._previous_best(start)
        if evaluate_fn is None:
            evaluate_fn = functools.partial(evaluate, cat_ids=val_cat_ids)
        self.val_dataset, self.evaluate_fn = val_dataset, evaluate_fn
        if self.is_main and self.metrics_path.exists():
            # drop what an earlier run logged after `start`: all of it for a fresh run, the iterations an
            # interrupted run did after its last checkpoint for a resumed one
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= start]
            atomic_write(self.metrics_path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))
        show_bar = progress and self.is_main and sys.stderr.isatty()
        self.log_lines = self.is_main and not show_bar  # a line per log_interval instead of the bar
        bar = tqdm(total=self.max_iters, initial=start, desc="train", dynamic_ncols=True, disable=not show_bar)
        with bar:
            last_entry = self._train_loop(bar)
        result = {"iteration": self.iteration, "epoch": self._epoch_number(self.iteration), **last_entry}
        if self.is_main:
            final = self.checkpoint_dir / "final.pth"
            save_checkpoint(final, {"state_dict": self.model.state_dict(), "meta": self._meta()})
            result["checkpoint"] = str(final)
            if self.iteration > start:
                plot_loss_curve(self.metrics_path, self.out_dir / "loss_curve.png")
        if val_dataset is not None and self.cfg.train.eval_at_end:
            metrics = evaluate_fn(self.model, val_dataset, out_dir=self.out_dir / "eval", device=self.device,
                                  progress=show_bar, num_workers=self.cfg.data.num_workers)  # a bar on a terminal
            self._record_eval(metrics)
            result.update(metrics)
        dist_utils.barrier()
        return result

    def _train_loop(self, bar: tqdm) -> dict:
        tc = self.cfg.train
        recent: deque[dict[str, float]] = deque(maxlen=_SMOOTHING_WINDOW)  # for the progress bar
        interval: list[dict[str, float]] = []  # since the last metrics.jsonl entry
        last_entry: dict = {}
        self.net.train()
        while self.iteration < self.max_iters:
            epoch = self.iteration // self.iters_per_epoch
            self.sampler.set_epoch(epoch)
            consumed = self.iteration - epoch * self.iters_per_epoch  # > 0 only when resuming mid-epoch
            loader = torch.utils.data.DataLoader(
                _SeededSamples(self.dataset, tc.seed, epoch), batch_sampler=_SkipBatches(self.sampler, consumed),
                collate_fn=collate, num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                # the loader draws its worker base seed from this, not from the global RNG that we checkpoint
                generator=torch.Generator().manual_seed(tc.seed))
            tick = time.perf_counter()
            for images, targets in loader:
                data_time = time.perf_counter() - tick
                values = self._step(_to_device(list(images), self.device), _to_device(list(targets), self.device))
                self.iteration += 1
                values["time"] = time.perf_counter() - tick
                values["data_time"] = data_time
                recent.append(values)
                interval.append(values)
                bar.set_postfix(_smoothed(recent), refresh=False)
                bar.update(1)
                if (tc.log_interval > 0 and self.iteration % tc.log_interval == 0) or self.iteration == self.max_iters:
                    last_entry = self._log(interval)
                    interval = []
                if (tc.checkpoint_interval > 0 and self.iteration % tc.checkpoint_interval == 0) \
                        or self.iteration == self.max_iters:
                    self._save()
                if self._eval_due():
                    self._periodic_eval()
                if self.iteration >= self.max_iters:
                    break
                tick = time.perf_counter()
            if self.iteration < self.max_iters and self.iteration % self.iters_per_epoch != 0:
                raise TrainingError(f"the batch sampler ended epoch {epoch + 1} after "
                                    f"{self.iteration - epoch * self.iters_per_epoch} batches, but its len() is "
                                    f"{self.iters_per_epoch}")
        return last_entry

    def _step(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, float]:
        """One iteration: forward, backward and (every `accumulate` iterations) an optimizer step; returns the
        losses (averaged over processes), the total and the lr as floats."""
        accumulate = self.cfg.train.accumulate
        update = (self.iteration + 1) % accumulate == 0 or self.iteration + 1 == self.max_iters
        no_sync = getattr(self.net, "no_sync", None)  # DDP: all-reduce the gradients only before a step
        if self.iteration % accumulate == 0:  # the first iteration of an accumulation window
            self.optimizer.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if update or no_sync is None else no_sync():
            values = self._forward_backward(images, targets, accumulate)
        if update:
            if self.cfg.train.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()  # the schedule counts iterations (batches), whether the optimizer stepped or not
        return values

    def _forward_backward(self, images: list[torch.Tensor], targets: list[dict], accumulate: int) -> dict[str, float]:
        with autocast(self.device, self.amp_dtype):
            losses = self.net(images, targets)
        names = sorted(losses)  # the same order on every process, for the all-reduce
        loss_names = [name for name in names if "loss" in name]
        if not loss_names:
            raise TrainingError(f"the model returned no loss terms (keys containing 'loss'); got {names}")
        reduced = dist_utils.all_reduce_mean(torch.stack([losses[n].detach().float() for n in names])).tolist()
        values = dict(zip(names, reduced))
        values["loss"] = sum(values[n] for n in loss_names)
        if not math.isfinite(values["loss"]):
            self._stop_on_non_finite({n: values[n] for n in loss_names})

        values["lr"] = self.scheduler.get_last_lr()[0]  # the lr this iteration (and a step at its end) uses
        total = sum(losses[n] for n in loss_names)
        if accumulate > 1:
            total = total / accumulate
        self.scaler.scale(total).backward()
        return values

    def _stop_on_non_finite(self, loss_values: dict[str, float]) -> None:
        bad = ", ".join(f"{name}={value}" for name, value in loss_values.items() if not math.isfinite(value))
        if self.last_checkpoint is not None:
            last = f"the last good checkpoint is {self.last_checkpoint}"
        else:
            last = "no checkpoint was written before it"
        raise TrainingError(f"the loss is not finite at iteration {self.iteration + 1} ({bad or 'total overflow'}); "
                            f"training stopped and nothing more was written; {last}")

    # ------------------------------------------------------------------------------------------------------
    # logging

    def _log(self, interval: list[dict[str, float]]) -> dict:
        entry: dict[str, Any] = {"type": "train", "iteration": self.iteration,
                                 "epoch": self._epoch_number(self.iteration), "lr": interval[-1]["lr"]}
        for key in interval[-1]:
            if key != "lr":
                entry[key] = sum(values[key] for values in interval) / len(interval)
        entry["eta"] = entry["time"] * (self.max_iters - self.iteration)
        if self.device.type == "cuda":
            entry["memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.is_main:
            self._append_metrics(entry)
            self.loggers.scalars({k: v for k, v in entry.items() if k not in ("type", "iteration", "epoch", "eta")},
                                 self.iteration, prefix="train")
        if self.log_lines:
            print(format_log_line(entry, self.max_iters), file=sys.stderr, flush=True)
        return {k: v for k, v in entry.items() if k not in ("type", "iteration", "epoch")}

    # ------------------------------------------------------------------------------------------------------
    # evaluation during training

    def _eval_due(self) -> bool:
        """Every `eval_interval` iterations, except the last one when the end-of-run evaluation follows."""
        interval = self.cfg.train.eval_interval
        if interval <= 0 or self.val_dataset is None or self.iteration % interval:
            return False
        return not (self.iteration == self.max_iters and self.cfg.train.eval_at_end)

    def _periodic_eval(self) -> None:
        """Score the val split now. Every RNG is put back afterwards (the eval loader draws a seed from torch's),
        so a run with evaluations trains exactly as one without, and a resumed run as an uninterrupted one."""
        rng = _rng_state()
        try:
            self._record_eval(self.evaluate_fn(self.model, self.val_dataset, out_dir=None, device=self.device,
                                               progress=False, num_workers=self.cfg.data.num_workers))
        finally:
            _set_rng_state(rng)
        self.net.train()

    def _record_eval(self, metrics: dict) -> None:
        """An evaluation's metrics into metrics.jsonl and the loggers (with a few drawn predictions), and into
        checkpoints/best.pth when it beats the best so far (segm AP, else bbox AP; mIoU for segmentation)."""
        if not self.is_main:
            return
        self._append_metrics({"type": "eval", "iteration": self.iteration, **metrics})
        self.loggers.scalars(metrics, self.iteration, prefix="eval")  # every number, nested keys dotted
        if self.loggers.backends:
            self.loggers.images(self._preview(), self.iteration)
        if self.cfg.train.eval_interval <= 0:
            return
        name, value = _best_metric(metrics)
        if value is None or not math.isfinite(value):
            return
        if self.best is None or value > self.best["value"]:
            self.best = {"metric": name, "value": float(value), "iteration": self.iteration}
            save_checkpoint(self.checkpoint_dir / "best.pth",
                            {"state_dict": self.model.state_dict(), "meta": {**self._meta(), "best": self.best}})

    def _previous_best(self, start: int) -> dict | None:
        """The best evaluation of this run up to `start` (a resumed run keeps beating it); None if there is none."""
        path = self.checkpoint_dir / "best.pth"
        if start == 0 or not path.is_file():
            return None
        best = load_checkpoint(path).get("meta", {}).get("best")
        return best if best and best.get("iteration", start + 1) <= start else None

    def _preview(self) -> dict:
        """A few val images with the model's predictions drawn on them, as (H, W, 3) uint8 arrays."""
        was_training = self.model.training
        self.model.eval()
        images = {}
        try:
            with torch.inference_mode(), autocast(self.device, self.amp_dtype):
                for index in range(min(_PREVIEW_IMAGES, len(self.val_dataset))):
                    image = self.val_dataset[index][0]
                    prediction = self.model([image.to(self.device)])[0]
                    if not (isinstance(prediction, dict) and "boxes" in prediction):  # not a detector
                        break
                    names = getattr(self.dataset, "class_names", None)
                    images[f"val/{index}"] = np.asarray(draw_predictions(image, prediction, names))
        finally:
            self.model.train(was_training)
        return images

    def _append_metrics(self, entry: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _epoch_number(self, iteration: int) -> int:
        """The 1-based epoch that the `iteration`-th iteration belongs to."""
        return -(-iteration // self.iters_per_epoch)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def _meta(self) -> dict:
        return {"config": to_dict(self.cfg), "iteration": self.iteration,
                "epoch": self._epoch_number(self.iteration),
                "class_names": list(getattr(self.dataset, "class_names", [])),
                "cat_ids": [int(c) for c in getattr(self.dataset, "cat_ids", [])],
                "cascadevision_version": cascadevision_version()}

    def _save(self) -> None:
        rng_states = dist_utils.all_gather_object(_rng_state())  # every process's, for an exact resume
        path = self.checkpoint_dir / f"iter_{self.iteration:07d}.pth"
        if self.is_main:
            save_checkpoint(path, {
                "state_dict": self.model.state_dict(), "meta": self._meta(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": {"ranks": rng_states}})
            atomic_copy(path, self.checkpoint_dir / "latest.pth")
            superseded = self._superseded_checkpoint()
            if superseded is not None:
                superseded.unlink(missing_ok=True)
            self._prune_checkpoints()
        self.last_checkpoint = path

    def _superseded_checkpoint(self) -> Path | None:
        """At the end of the run, the periodic checkpoint before it when it is less than half an interval older
        (max_iters 460 with interval 153 would keep iter_459 beside iter_460: a near copy); else None."""
        interval = self.cfg.train.checkpoint_interval
        if self.iteration != self.max_iters or interval <= 0 or self.iteration % interval == 0:
            return None
        previous = self.iteration - self.iteration % interval
        if previous <= 0 or self.iteration - previous >= interval / 2:
            return None
        return self.checkpoint_dir / f"iter_{previous:07d}.pth"

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.train.keep_checkpoints
        if keep <= 0:
            return
        # only this run's history: checkpoints up to the current iteration (a run resumed from an older
        # checkpoint leaves the later ones of its first attempt alone; it overwrites them when it gets there)
        numbered = sorted(p for p in self.checkpoint_dir.glob("iter_*.pth")
                          if re.fullmatch(r"iter_\d{7}\.pth", p.name) and int(p.name[5:12]) <= self.iteration)
        for old in numbered[:-keep]:
            old.unlink(missing_ok=True)

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        missing = [key for key in ("state_dict", "meta", "optimizer", "scheduler", "rng") if key not in state]
        if missing:
            raise CheckpointError(f"{path}: cannot resume training from it: it has no {', '.join(missing)} "
                                  "(a weights-only file; use it as model.weights instead)")
        mismatch = state_dict_mismatch(self.model.state_dict(), state["state_dict"])
        if mismatch:
            preset = (state["meta"].get("config") or {}).get("model", {}).get("preset", "")
            written_by = f" (written by a run of '{preset}')" if preset else ""
            raise CheckpointError(f"{path}: does not fit this model{written_by}: {mismatch}")
        try:
            self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
            raise CheckpointError(f"{path}: does not fit this model/optimizer: {detail}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rng_states = state["rng"]["ranks"]
        if len(rng_states) != self.world_size:
            _note(f"resuming with {self.world_size} processes from a checkpoint written by {len(rng_states)}: "
                  "the data order and random draws will differ from an uninterrupted run")
        _set_rng_state(rng_states[self.rank % len(rng_states)])
        self.iteration = int(state["meta"]["iteration"])
        self.last_checkpoint = path


def _best_metric(metrics: dict) -> tuple[str, float | None]:
    """The number `eval_interval` keeps the best checkpoint by: segm AP, else bbox AP, else mIoU."""
    for section in ("segm", "bbox"):
        if isinstance(metrics.get(section), dict) and metrics[section].get("AP") is not None:
            return f"{section}.AP", metrics[section]["AP"]
    return "mIoU", metrics.get("mIoU")


# ----------------------------------------------------------------------------------------------------------
# data


class _SeededSamples(torch.utils.data.Dataset):
    """`dataset[index]` loaded with the torch/random/numpy RNGs seeded from (seed, epoch, index).

    So a sample's random augmentation is the same whichever worker loads it and whether the run was resumed;
    the caller's RNG states are restored afterwards, so loading never perturbs the training RNG stream.
    """

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, index]).generate_state(1)[0])
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _SkipBatches:
    """A batch sampler without its first `skip` batches (those a resumed run already trained on)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip


def _to_device(obj: Any, device: torch.device) -> Any:
    """Tensors, and tensors inside dicts/lists/tuples, moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def _smoothed(recent: deque) -> dict[str, str]:
    """The progress bar's short postfix: the total loss over the last iterations and the current lr."""
    return {"loss": f"{sum(v['loss'] for v in recent) / len(recent):.4g}", "lr": f"{recent[-1]['lr']:.2e}"}


_STAGE_LOSS = re.compile(r"s(\d+)\.loss_(cls|bbox|mask)")


def main_losses(entry: dict) -> list[tuple[str, float]]:
    """The few losses worth reading in a log line, as (short name, value): RPN classification and box, the
    last stage's classification, box and mask (cascades log `s{t}.loss_*` for every stage), the semantic
    branch. A model whose loss names are none of these shows its first four terms instead."""
    shown = [(short, entry[key]) for key, short in (("loss_rpn_cls", "rpn_cls"), ("loss_rpn_bbox", "rpn_bbox"))
             if key in entry]
    stages = [int(m.group(1)) for m in map(_STAGE_LOSS.fullmatch, entry) if m]
    prefix = f"s{max(stages)}." if stages else ""
    shown += [(f"{prefix}{name}", entry[f"{prefix}loss_{name}"]) for name in ("cls", "bbox", "mask")
              if f"{prefix}loss_{name}" in entry]
    if "loss_semantic_seg" in entry:
        shown.append(("semantic", entry["loss_semantic_seg"]))
    if not shown:
        shown = [(key, entry[key]) for key in entry if "loss" in key and key != "loss"][:4]
    return shown


def format_log_line(entry: dict, max_iters: int) -> str:
    """One metrics.jsonl entry as a line for a log file:
    `iter 120/460  lr 1.42e-03  loss 2.314  rpn_cls 0.123 ... s2.mask 0.440 semantic 0.120  0.74 it/s  ETA 0:07:40`"""
    losses = "  ".join(f"{name} {value:.3f}" for name, value in main_losses(entry))
    speed = f"{1.0 / entry['time']:.2f} it/s" if entry.get("time", 0) > 0 else "- it/s"
    eta = int(round(entry.get("eta", 0.0)))
    return (f"iter {entry['iteration']}/{max_iters}  lr {entry['lr']:.2e}  loss {entry['loss']:.3f}  {losses}  "
            f"{speed}  ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")


# ----------------------------------------------------------------------------------------------------------
# devices and RNG


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> a device (plain `cuda` under torchrun: this process's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is '{name}' but CUDA is not available here; use train.device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"train.device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """This process's RNG states, as types `torch.load(weights_only=True)` accepts."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(numpy_state["key"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _note(message: str) -> None:
    tqdm.write(f"note: {message}", file=sys.stderr)
