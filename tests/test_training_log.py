"""What a training run shows a person: a readable line per log_interval without a terminal, a short progress-bar
postfix on one, a loss curve in panels, and no near-duplicate checkpoint at the end."""
import json

import pytest

from cascadevision.engine.trainer import _smoothed, format_log_line, main_losses, train
from cascadevision.visualize import loss_panels, plot_loss_curve
from test_engine import TinyDataset, TinyModel, tiny_config

HTC_ENTRY = {"type": "train", "iteration": 120, "epoch": 2, "lr": 0.00142, "loss_rpn_bbox": 0.045,
             "loss_rpn_cls": 0.123, "loss_semantic_seg": 0.12, "s0.acc": 90.0, "s0.loss_bbox": 0.3,
             "s0.loss_cls": 0.5, "s0.loss_mask": 0.6, "s1.acc": 91.0, "s1.loss_bbox": 0.2, "s1.loss_cls": 0.25,
             "s1.loss_mask": 0.5, "s2.acc": 92.0, "s2.loss_bbox": 0.033, "s2.loss_cls": 0.21, "s2.loss_mask": 0.44,
             "loss": 2.314, "grad_norm": 3.0, "time": 1.35, "data_time": 0.01, "eta": 460.4}


def test_an_htc_log_line_shows_the_main_losses_speed_and_eta():
    line = format_log_line(HTC_ENTRY, 460)
    assert line == ("iter 120/460  lr 1.42e-03  loss 2.314  rpn_cls 0.123  rpn_bbox 0.045  s2.cls 0.210  "
                    "s2.bbox 0.033  s2.mask 0.440  semantic 0.120  0.74 it/s  ETA 0:07:40")


def test_main_losses_of_a_one_stage_head_and_of_an_unknown_model():
    entry = {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 2.0, "loss_cls": 3.0, "loss_bbox": 4.0, "loss_mask": 5.0}
    assert main_losses(entry) == [("rpn_cls", 1.0), ("rpn_bbox", 2.0), ("cls", 3.0), ("bbox", 4.0), ("mask", 5.0)]
    assert main_losses({"loss": 3.0, "loss_fit": 1.0, "acc": 0.5, "loss_reg": 2.0}) == [("loss_fit", 1.0),
                                                                                      ("loss_reg", 2.0)]


def test_the_progress_bar_postfix_is_total_loss_and_lr():
    recent = [dict(HTC_ENTRY, loss=2.0), dict(HTC_ENTRY, loss=4.0, lr=0.001)]
    assert _smoothed(recent) == {"loss": "3", "lr": "1.00e-03"}


def test_without_a_terminal_training_prints_a_line_per_log_interval(tmp_path, capsys, one_thread):
    train(tiny_config(max_iters=10, log_interval=4, checkpoint_interval=0), TinyModel(), TinyDataset(), tmp_path,
          progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]  # and the last iteration
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert f"loss {logged[0]['loss']:.3f}" in lines[0] and f"loss_fit {logged[0]['loss_fit']:.3f}" in lines[0]
    assert lines[-1].endswith("ETA 0:00:00")


@pytest.mark.parametrize("max_iters, interval, kept", [
    (10, 3, [3, 6, 10]),     # iter 9 is one step before the end-of-run checkpoint: removed
    (11, 3, [3, 6, 9, 11]),  # two steps before, more than half an interval: kept
    (12, 3, [3, 6, 9, 12]),  # the end is on the schedule: nothing doubled
])
def test_no_periodic_checkpoint_just_before_the_end_of_run_one(tmp_path, max_iters, interval, kept, one_thread):
    train(tiny_config(max_iters=max_iters, checkpoint_interval=interval, keep_checkpoints=10, log_interval=0),
          TinyModel(), TinyDataset(), tmp_path, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*.pth"))
    assert names == [f"iter_{i:07d}.pth" for i in kept]


def test_the_demo_schedule_keeps_evenly_spaced_checkpoints(tmp_path, one_thread):
    # the demo's shape scaled down: max_iters 46 with interval 46 // 3 = 15 saved 15, 30, 45 and 46
    train(tiny_config(max_iters=46, checkpoint_interval=15, keep_checkpoints=2, log_interval=0), TinyModel(),
          TinyDataset(), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "final.pth", "iter_0000030.pth", "iter_0000046.pth", "latest.pth"]


def test_htc_losses_are_grouped_into_panels_with_distinct_styles():
    names = [k for k in HTC_ENTRY if "loss" in k and k != "loss"]
    panels = loss_panels(names)
    assert list(panels) == ["RPN", "box head per stage", "mask head per stage", "semantic"]
    assert {key for key, _, _ in panels["RPN"]} == {"loss_rpn_cls", "loss_rpn_bbox"}
    assert {key for key, _, _ in panels["box head per stage"]} == {f"s{t}.loss_{k}" for t in range(3)
                                                                   for k in ("cls", "bbox")}
    assert {key for key, _, _ in panels["mask head per stage"]} == {"s0.loss_mask", "s1.loss_mask", "s2.loss_mask"}
    for terms in panels.values():  # within a panel no two lines look alike
        assert len({style for _, _, style in terms}) == len(terms)
    assert sum(len(terms) for terms in panels.values()) == 12  # every HTC term is drawn once


def test_loss_curve_png_of_an_htc_log(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    entries = [dict(HTC_ENTRY, iteration=i, loss=10.0 / i, loss_semantic_seg=5.0 / i ** 2) for i in range(1, 30)]
    metrics.write_text("".join(json.dumps(e) + "\n" for e in entries))
    png = plot_loss_curve(metrics, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
