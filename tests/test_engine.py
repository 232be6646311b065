"""The training loop, on a model with three parameters and a dataset of ten 4x6 images."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cascadevision.config import Config, update
from cascadevision.engine import WarmupMultiStepLR, build_optimizer, load_checkpoint, train
from cascadevision.errors import CheckpointError, ConfigError, TrainingError
from test_evaluator import PerfectModel, make_eval_dataset


class TinyDataset:
    """Ten images (six landscape, four portrait), each with a number to predict. Loading draws a random flip
    from torch, a brightness from `random` and an offset from numpy, so all three RNGs matter to training."""

    def __init__(self, n: int = 10):
        g = torch.Generator().manual_seed(123)
        self.images = [torch.rand(3, 4, 6, generator=g) if i % 5 < 3 else torch.rand(3, 6, 4, generator=g)
                       for i in range(n)]
        self.values = torch.rand(n, generator=g)
        self.aspect_ratios = [image.shape[2] / image.shape[1] for image in self.images]
        self.image_ids = list(range(1, n + 1))
        self.cat_ids = [1]
        self.class_names = ["thing"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = image * (0.8 + 0.4 * random.random()) + 0.1 * float(np.random.rand())
        return image, {"value": self.values[index], "image_id": self.image_ids[index]}


class TinyModel(nn.Module):
    """Predicts a number from an image's top-left pixel and mean colour. Its loss adds noise from the global
    torch RNG, and it has a frozen parameter. `nan_at` / `kill_at` make the n-th training forward go wrong."""

    def __init__(self, init_seed: int = 0, nan_at: int = 0, kill_at: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(init_seed)
        self.weight = nn.Parameter(torch.randn(6, generator=g))
        self.bias = nn.Parameter(torch.zeros(()))
        self.frozen = nn.Parameter(torch.ones(6), requires_grad=False)
        self.nan_at, self.kill_at, self.calls = nan_at, kill_at, 0

    def forward(self, images, targets=None):
        features = torch.stack([torch.cat([image[:, 0, 0], image.mean(dim=(1, 2))]) for image in images])  # (B, 6)
        prediction = features @ (self.weight * self.frozen) + self.bias  # (B,)
        if not self.training:
            return [{"value": p} for p in prediction]
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        target = torch.stack([t["value"] for t in targets])
        loss_fit = ((prediction - target) ** 2).mean()
        if self.calls == self.nan_at:
            loss_fit = loss_fit * float("nan")
        loss_reg = 0.01 * (self.weight ** 2).sum() + 0.01 * torch.randn(()).abs()
        return {"loss_fit": loss_fit, "loss_reg": loss_reg, "acc": (prediction - target).abs().lt(0.1).float().mean()}


def tiny_config(**train_values) -> Config:
    values = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "warmup_iters": 3, "warmup_ratio": 0.1,
              "lr_steps": [1, 2], "epochs": 3, "log_interval": 1, "checkpoint_interval": 5, "device": "cpu"}
    values.update(train_values)
    return update(Config(), {"data": {"batch_size": 2, "num_workers": 0}, "train": values})


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# learning rate


def test_lr_schedule_warms_up_linearly_then_steps_down():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[8, 11], gamma=0.1, warmup_iters=4, warmup_ratio=0.001)
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    expected = {0: 0.02 * 0.001,                       # warm-up starts at warmup_ratio
                2: 0.02 * (0.001 + 0.999 * 2 / 4),      # half-way
                4: 0.02, 7: 0.02,                       # warm-up over, before the first step
                8: 0.002, 10: 0.002,                    # after the first step
                11: 0.0002, 12: 0.0002}                 # after the second
    for iteration, lr in expected.items():
        assert lrs[iteration] == pytest.approx(lr, rel=1e-12), iteration


def test_cosine_schedule_after_warm_up():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[], gamma=0.1, warmup_iters=2, warmup_ratio=0.5,
                                  schedule="cosine", max_iters=8, min_ratio=0.1)
    lrs = []
    for _ in range(9):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    # cos(pi * 2/8) = sqrt(2)/2; cos(pi/2) = 0; cos(pi) = -1
    expected = {0: 0.1 * 0.5 * 1.0,
                1: 0.1 * 0.75 * (0.1 + 0.9 * (1 + math.cos(math.pi / 8)) / 2),
                2: 0.1 * (0.1 + 0.9 * (1 + math.sqrt(2) / 2) / 2),
                4: 0.1 * (0.1 + 0.9 * 0.5),
                8: 0.1 * 0.1}
    for iteration, lr in expected.items():
        assert lrs[iteration] == pytest.approx(lr, rel=1e-12), iteration
    with pytest.raises(ConfigError, match="lr_schedule"):
        WarmupMultiStepLR(optimizer, [], 0.1, 0, 0.1, schedule="poly", max_iters=8)


def test_adamw_decays_only_matrices_and_kernels():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 2, 5, 5))
    cfg = tiny_config(optimizer="adamw", lr=1e-3, weight_decay=0.05, betas=[0.8, 0.9]).train
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(plain["params"]) == 4 and plain["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.05
    assert decayed["betas"] == (0.8, 0.9)
    # one step on a zero gradient: only the decayed weights shrink, by lr * weight_decay
    before = model[0].weight.detach().clone()
    bias = model[0].bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model[0].weight, before * (1 - 1e-3 * 0.05))
    torch.testing.assert_close(model[0].bias, bias)
    with pytest.raises(ConfigError, match="train.optimizer.*sgd, adamw"):
        build_optimizer(model, tiny_config(optimizer="adam").train)


def test_trainer_converts_epoch_steps_to_iterations(tmp_path):
    # 10 images in batches of 2 per orientation: 3 + 2 = 5 iterations per epoch; steps at epochs 1, 2
    result = train(tiny_config(epochs=3, warmup_iters=4, checkpoint_interval=0), TinyModel(), TinyDataset(),
                   tmp_path, progress=False)
    lrs = [entry["lr"] for entry in read_metrics(tmp_path)]
    warm = [0.05 * (0.1 + 0.9 * i / 4) for i in range(4)]
    assert lrs == pytest.approx(warm + [0.05] + [0.005] * 5 + [0.0005] * 5, rel=1e-12)
    assert result["iteration"] == 15 and result["epoch"] == 3


def test_max_iters_counts_lr_steps_in_iterations(tmp_path):
    train(tiny_config(max_iters=6, lr_steps=[4], warmup_iters=0), TinyModel(), TinyDataset(), tmp_path,
          progress=False)
    assert [entry["lr"] for entry in read_metrics(tmp_path)] == pytest.approx([0.05] * 4 + [0.005] * 2)


# ----------------------------------------------------------------------------------------------------------
# what a run leaves behind


def test_run_writes_config_metrics_checkpoints_and_curve(tmp_path):
    model = TinyModel()
    frozen_before = model.frozen.detach().clone()
    result = train(tiny_config(epochs=3, checkpoint_interval=4, keep_checkpoints=2, log_interval=5), model,
                   TinyDataset(), tmp_path, progress=False)

    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    entries = read_metrics(tmp_path)
    assert [e["iteration"] for e in entries] == [5, 10, 15]
    assert [e["epoch"] for e in entries] == [1, 2, 3]
    for key in ("lr", "loss", "loss_fit", "loss_reg", "acc", "time", "data_time", "eta"):
        assert key in entries[0], key
    assert entries[0]["loss"] == pytest.approx(entries[0]["loss_fit"] + entries[0]["loss_reg"])  # acc excluded
    assert entries[-1]["eta"] == 0
    assert result["loss"] == entries[-1]["loss"] and result["iteration"] == 15

    checkpoints = tmp_path / "checkpoints"
    # saved at 4, 8, 12 and at the end (15); only the last two iteration files are kept
    assert sorted(p.name for p in checkpoints.iterdir()) == ["final.pth", "iter_0000012.pth", "iter_0000015.pth",
                                                              "latest.pth"]
    latest = load_checkpoint(checkpoints / "latest.pth")
    assert latest["meta"]["iteration"] == 15 and latest["meta"]["epoch"] == 3
    assert latest["meta"]["class_names"] == ["thing"] and latest["meta"]["cat_ids"] == [1]
    assert latest["meta"]["config"]["train"]["checkpoint_interval"] == 4
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(latest)
    final = load_checkpoint(checkpoints / "final.pth")
    assert set(final) == {"state_dict", "meta"}
    assert torch.equal(final["state_dict"]["weight"], model.weight.detach())
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the frozen parameter is neither trained nor given to the optimizer
    assert torch.equal(model.frozen, frozen_before)
    assert len(latest["optimizer"]["param_groups"][0]["params"]) == 2


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_grad_clipping_matches_hand_computation(tmp_path, grad_clip):
    class LinearLoss(nn.Module):  # loss = w . (3, 4): the gradient is (3, 4), its norm 5
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, -1.0]))

        def forward(self, images, targets=None):
            return {"loss": (self.w * torch.tensor([3.0, 4.0])).sum()}

    model = LinearLoss()
    cfg = tiny_config(max_iters=1, lr=0.1, weight_decay=0.0, warmup_iters=0, grad_clip=grad_clip)
    result = train(cfg, model, TinyDataset(), tmp_path, progress=False)
    gradient = torch.tensor([3.0, 4.0])
    if grad_clip:
        gradient = gradient * (1.0 / (5.0 + 1e-6))  # clip_grad_norm_: scale by max_norm / (norm + 1e-6)
        assert result["grad_norm"] == pytest.approx(5.0)
    # first SGD step with momentum: the buffer is the gradient itself
    torch.testing.assert_close(model.w.detach(), torch.tensor([1.0, -1.0]) - 0.1 * gradient, rtol=0, atol=1e-6)


def test_old_boolean_amp_reads_as_bf16_and_fp16_needs_cuda(tmp_path):
    with pytest.warns(DeprecationWarning, match="train.amp: true is now train.amp: bf16"):
        assert tiny_config(max_iters=1, amp=True).train.amp == "bf16"
    with pytest.raises(ConfigError, match="train.amp: fp16 runs on CUDA only"):
        train(tiny_config(max_iters=1, amp="fp16"), TinyModel(), TinyDataset(), tmp_path, progress=False)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything was written


def test_eval_at_end_scores_the_val_dataset_and_logs_it(tmp_path):
    class TrainablePerfectModel(PerfectModel):
        def forward(self, images, targets=None):
            if self.training:
                return {"loss_anchor": (self.anchor ** 2).sum() + 1.0}
            return super().forward(images)

    result = train(tiny_config(max_iters=2), TrainablePerfectModel(), TinyDataset(), tmp_path,
                   val_dataset=make_eval_dataset(), progress=False)
    assert result["bbox"]["AP"] == 100.0 and result["segm"]["AP"] == 100.0
    last = read_metrics(tmp_path)[-1]
    assert last["type"] == "eval" and last["iteration"] == 2 and last["segm"] == result["segm"]
    assert (tmp_path / "eval/results.json").exists() and (tmp_path / "eval/metrics.json").exists()


# ----------------------------------------------------------------------------------------------------------
# resume


def _scramble_process_state():
    """What a fresh process would have: RNGs in some other state."""
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_after_kill_gives_bitwise_identical_weights(tmp_path, num_workers):
    # 14 iterations = 2 x 7; the run is killed during iteration 10, after the checkpoint at 7 (mid-epoch 2)
    cfg = update(tiny_config(max_iters=14, lr_steps=[9], checkpoint_interval=7), {"data": {"num_workers": num_workers}})
    straight = TinyModel()
    train(cfg, straight, TinyDataset(), tmp_path / "straight", progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, TinyModel(kill_at=10), TinyDataset(), tmp_path / "killed", progress=False)
    assert load_checkpoint(tmp_path / "killed/checkpoints/latest.pth")["meta"]["iteration"] == 7

    _scramble_process_state()
    resumed = TinyModel(init_seed=5)  # a new model object with other weights: all of them must come from the file
    result = train(cfg, resumed, TinyDataset(), tmp_path / "killed", resume=True, progress=False)

    assert result["iteration"] == 14
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # the log of the resumed run continues the straight one: same losses at every iteration, each logged once
    straight_log = [(e["iteration"], e["loss"], e["lr"]) for e in read_metrics(tmp_path / "straight")]
    resumed_log = [(e["iteration"], e["loss"], e["lr"]) for e in read_metrics(tmp_path / "killed")]
    assert resumed_log == straight_log


def test_resume_refuses_weights_only_checkpoint(tmp_path):
    cfg = tiny_config(max_iters=2)
    train(cfg, TinyModel(), TinyDataset(), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="final.pth: cannot resume"):
        train(cfg, TinyModel(), TinyDataset(), tmp_path, resume=tmp_path / "checkpoints/final.pth", progress=False)


# ----------------------------------------------------------------------------------------------------------
# NaN


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    model = TinyModel(nan_at=7)
    with pytest.raises(TrainingError) as info:
        train(tiny_config(checkpoint_interval=5), model, TinyDataset(), tmp_path, progress=False)
    message = str(info.value)
    assert "iteration 7" in message and "loss_fit=nan" in message and "loss_reg" not in message
    assert "iter_0000005.pth" in message and "\n" not in message
    weights_at_nan = model.weight.detach().clone()

    assert [e["iteration"] for e in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]  # nothing after the NaN
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000005.pth", "latest.pth"]
    assert not (tmp_path / "loss_curve.png").exists()
    last_good = load_checkpoint(checkpoints / "latest.pth")
    assert last_good["meta"]["iteration"] == 5
    assert torch.isfinite(last_good["state_dict"]["weight"]).all()
    assert torch.isfinite(weights_at_nan).all()  # the NaN step was never applied


# ----------------------------------------------------------------------------------------------------------
# DDP


_DDP_SCRIPT = """
import builtins, io, json, os, sys
import torch
sys.path.insert(0, {tests_dir!r})
from test_engine import TinyDataset, TinyModel, tiny_config
from test_evaluator import PerfectModel, make_eval_dataset
from cascadevision.engine import evaluate, train

out_dir, report_dir = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
writes = []
if rank != 0:  # record any attempt of this process to write under out_dir
    def watch(opener, is_write):
        def wrapper(file, *args, **kwargs):
            if os.path.abspath(str(file)).startswith(os.path.abspath(out_dir)) and is_write(args, kwargs):
                writes.append(str(file))
            return opener(file, *args, **kwargs)
        return wrapper
    text_mode = lambda args, kwargs: any(c in (args[0] if args else kwargs.get("mode", "r")) for c in "wax+")
    builtins.open = io.open = watch(builtins.open, text_mode)
    os.open = watch(os.open, lambda args, kwargs: bool(args[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))

model = TinyModel()
result = train(tiny_config(max_iters=4, checkpoint_interval=2), model, TinyDataset(), out_dir, progress=False)
metrics = evaluate(PerfectModel(), make_eval_dataset(), progress=False)
report = dict(rank=rank, world_size=int(os.environ["WORLD_SIZE"]), result=result, metrics=metrics,
              weight=model.weight.tolist(), writes=writes)
with builtins.open(os.path.join(report_dir, f"rank{{rank}}.json"), "w") as f:
    json.dump(report, f)
"""


def _torchrun_available() -> bool:
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.slow
@pytest.mark.skipif(not _torchrun_available(), reason="torchrun / the gloo backend is not available")
def test_ddp_two_processes_on_cpu(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT.format(tests_dir=str(Path(__file__).parent)))
    out_dir, report_dir = tmp_path / "run", tmp_path / "reports"
    report_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(out_dir), str(report_dir)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]

    reports = [json.loads((report_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    assert reports[0]["weight"] == reports[1]["weight"]  # gradients were averaged: the replicas agree
    assert reports[0]["result"]["loss"] == reports[1]["result"]["loss"]  # losses are reduced over ranks
    assert reports[0]["metrics"] == reports[1]["metrics"] and reports[0]["metrics"]["bbox"]["AP"] == 100.0
    assert reports[1]["writes"] == []  # rank 1 wrote nothing under out_dir
    assert [e["iteration"] for e in read_metrics(out_dir)] == [1, 2, 3, 4]  # logged once, by rank 0
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == [
        "final.pth", "iter_0000002.pth", "iter_0000004.pth", "latest.pth"]
    rng = load_checkpoint(out_dir / "checkpoints/latest.pth")["rng"]
    assert len(rng["ranks"]) == 2  # both processes' RNG states, for an exact resume
