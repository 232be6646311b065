"""TensorBoard events of a training run (train.loggers) and evaluation during training (train.eval_interval)."""
from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cascadevision.config import Config, update
from cascadevision.data import CocoDataset
from cascadevision.data.synth import generate_synthetic
from cascadevision.engine.loggers import check_loggers
from cascadevision.engine.trainer import train
from cascadevision.errors import ConfigError
from cascadevision.io.checkpoint import load_checkpoint
from cascadevision.models import build_from_config
from cascadevision.models.presets import preset_config

from test_amp_and_memory import PixelRegression, TwoImages, TINY_MODEL


def events(run_dir):
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def regression_config(max_iters, **train_values):
    return update(Config(), {"data": {"batch_size": 1, "num_workers": 0},
                             "train": {"max_iters": max_iters, "lr": 0.01, "warmup_iters": 0, "log_interval": 1,
                                       "checkpoint_interval": 2, "device": "cpu", **train_values}})


def test_training_writes_tensorboard_scalars_and_a_resumed_run_continues_them(tmp_path):
    run = tmp_path / "run"
    train(regression_config(4), PixelRegression(), TwoImages(), run, progress=False)
    # resumed from iteration 2: the first run's steps 3 and 4 are replaced, no step shows twice
    train(regression_config(4), PixelRegression(), TwoImages(), run, resume=run / "checkpoints" / "iter_0000002.pth",
          progress=False)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    accumulator = events(run)
    assert {"train/loss", "train/lr", "train/time"} <= set(accumulator.Tags()["scalars"])
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx([e["loss"] for e in logged])


def test_no_loggers_writes_no_event_files(tmp_path):
    train(regression_config(1, loggers=[]), PixelRegression(), TwoImages(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_missing_optional_logger_is_a_one_line_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.loggers: 'wandb' is not installed \(pip install wandb\)"):
        check_loggers(["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match="unknown logger 'comet'"):
        check_loggers(["comet"])


def test_eval_interval_scores_the_val_split_and_keeps_the_best_checkpoint(tmp_path):
    paths = generate_synthetic(tmp_path / "data", num_images=4, size=64, seed=3, val_fraction=0.5)
    train_set = CocoDataset(paths["train_ann"], paths["train_images"], train=True)
    val_set = CocoDataset(paths["val_ann"], paths["val_images"], train=False)
    cfg = update(Config(model=preset_config("mask_rcnn_r18_fpn")),
                 {"model": {**TINY_MODEL, "num_classes": train_set.num_classes,
                            "roi_head": {**TINY_MODEL["roi_head"], "test": {"score_thr": 0.0}}},
                  "data": {"batch_size": 2, "num_workers": 0},
                  "train": {"max_iters": 4, "warmup_iters": 1, "lr": 0.01, "checkpoint_interval": 0,
                            "eval_interval": 2, "log_interval": 2, "device": "cpu"}})
    torch.manual_seed(0)
    run = tmp_path / "run"
    train(cfg, build_from_config(cfg.model), train_set, run, val_dataset=val_set, progress=False)

    evals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["type"] == "eval"]
    assert [e["iteration"] for e in evals] == [2, 4]  # every 2 iterations; the one at 4 is the end-of-run eval
    best = max(evals, key=lambda e: e["segm"]["AP"])  # first of equals wins: only a strictly better AP replaces
    meta = load_checkpoint(run / "checkpoints" / "best.pth")["meta"]
    assert meta["best"] == {"metric": "segm.AP", "value": best["segm"]["AP"], "iteration": best["iteration"]}
    assert meta["iteration"] == best["iteration"]

    accumulator = events(run)
    ap = accumulator.Scalars("eval/segm.AP")
    assert [e.step for e in ap] == [2, 4]
    assert [e.value for e in ap] == pytest.approx([e["segm"]["AP"] for e in evals])
    assert "eval/bbox.AP50" in accumulator.Tags()["scalars"]
    assert {"val/0", "val/1"} <= set(accumulator.Tags()["images"])
    assert [e.step for e in accumulator.Images("val/0")] == [2, 4]


def test_evaluations_during_training_leave_the_training_rng_alone(tmp_path):
    from test_engine import TinyDataset, TinyModel, tiny_config
    calls = []

    def rng_drawing_eval(model, dataset, **kwargs):  # as an eval DataLoader drawing its base seed would
        calls.append(float(torch.rand(())))
        return {"bbox": {"AP": 10.0 * len(calls)}}

    def run(name, eval_interval):
        model = TinyModel()  # its loss adds noise from the global torch RNG
        cfg = tiny_config(max_iters=6, eval_interval=eval_interval, eval_at_end=False, loggers=[])
        train(cfg, model, TinyDataset(), tmp_path / name, val_dataset=TinyDataset(), evaluate_fn=rng_drawing_eval,
              progress=False)
        logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return model.state_dict(), [e["loss_reg"] for e in logged if e["type"] == "train"]

    (plain, plain_losses), (evaluated, evaluated_losses) = run("plain", 0), run("evaluated", 2)
    assert len(calls) == 3  # iterations 2, 4, 6
    assert evaluated_losses == plain_losses  # loss_reg holds a draw from the global torch RNG
    for key in plain:
        assert torch.equal(plain[key], evaluated[key]), key
    meta = load_checkpoint(tmp_path / "evaluated" / "checkpoints" / "best.pth")["meta"]
    assert meta["best"] == {"metric": "bbox.AP", "value": 30.0, "iteration": 6}


def test_wandb_logger_gets_the_same_numbers_and_resumes_its_run(tmp_path, monkeypatch):
    """With a stand-in `wandb` module (the real one is optional and not needed here)."""
    import importlib.machinery
    import types

    from cascadevision.engine.loggers import RunLoggers

    logged, inits = [], []

    class Run:
        def log(self, values, step):
            logged.append((values, step))

        def finish(self):
            logged.append("finish")

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.util = types.SimpleNamespace(generate_id=lambda: f"id{len(inits)}")
    fake.init = lambda **kwargs: inits.append(kwargs) or Run()
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)

    loggers = RunLoggers(["wandb"], tmp_path, config={"train": {"lr": 0.1}})
    loggers.scalars({"loss": 1.5, "bbox": {"AP": 30.0}, "note": "text"}, 7, prefix="eval")
    loggers.images({"val/0": __import__("numpy").zeros((4, 5, 3), dtype="uint8")}, 7)
    loggers.close()
    assert logged == [({"eval/loss": 1.5, "eval/bbox.AP": 30.0}, 7), ({"val/0": ("image", (4, 5, 3))}, 7), "finish"]
    RunLoggers(["wandb"], tmp_path, resumed=True, start_step=7)
    assert inits[0]["id"] == inits[1]["id"] == "id0" and inits[1]["resume"] == "allow"
    assert inits[0]["config"] == {"train": {"lr": 0.1}}
