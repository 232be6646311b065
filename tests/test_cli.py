"""The command line end to end on a tiny synthetic dataset: synth -> train -> resume -> eval -> predict."""
import json

import pytest
import torch

from cascadevision.cli import main

TINY = [
    "--set", "model.input.scale=[96,96]", "--set", "model.backbone.base_channels=8",
    "--set", "model.neck.out_channels=16", "--set", "model.rpn.feat_channels=16",
    "--set", "model.roi_head.box_head.fc_channels=32", "--set", "model.roi_head.mask_head.conv_channels=16",
    "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "train.warmup_iters=2",
    "--set", "train.checkpoint_interval=2", "--set", "train.log_interval=1",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", str(root), "--num-images", "6", "--size", "96", "--val-fraction", "0.34"]) == 0
    return root


def data_args(root):
    return ["--train-ann", str(root / "annotations/instances_train.json"), "--train-images", str(root / "images/train"),
            "--val-ann", str(root / "annotations/instances_val.json"), "--val-images", str(root / "images/val")]


@pytest.mark.slow
def test_train_resume_eval_predict(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "mask_rcnn_r18_fpn", *data_args(dataset), "--out", str(run), "--no-progress", *TINY]
    assert main(args + ["--set", "train.max_iters=2"]) == 0
    assert (run / "checkpoints" / "latest.pth").exists()
    # resume to 4 iterations: continues from iteration 2, not from scratch
    assert main(args + ["--set", "train.max_iters=4", "--resume"]) == 0
    iterations = [json.loads(l)["iteration"] for l in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(l).get("type") == "train"]
    assert iterations == [1, 2, 3, 4]
    final = run / "checkpoints" / "final.pth"
    assert (run / "loss_curve.png").exists() and (run / "eval" / "metrics.json").exists()

    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["eval", str(final), "--ann", str(dataset / "annotations/instances_val.json"),
                 "--images", str(dataset / "images/val"), "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| bbox" in table and "| segm" in table
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm"}

    preds = tmp_path / "preds"
    assert main(["predict", str(final), str(dataset / "images/val"), "--out", str(preds), "--no-progress",
                 "--score-thr", "0.0"]) == 0
    images = sorted((dataset / "images/val").iterdir())
    assert sorted(p.name for p in preds.glob("*.png")) == sorted(p.name for p in images)
    results = json.loads((preds / "results.json").read_text())
    assert all({"bbox", "score", "category_id", "segmentation"} <= set(r) for r in results)


def test_errors_are_one_line(dataset, tmp_path, capsys):
    assert main(["train", "mask_rcnn_r18_fpn", *data_args(dataset), "--out", str(tmp_path / "r"),
                 "--set", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'train.lrr'") and "lr" in err and err.count("\n") == 1
    assert main(["train", "no_such_preset", "--out", str(tmp_path / "r")]) == 2
    assert "unknown model preset 'no_such_preset'" in capsys.readouterr().err
    assert main(["train", "mask_rcnn_r18_fpn", "--train-ann", str(tmp_path / "missing.json"),
                 "--train-images", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "missing.json" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", str(bad), "--ann", "x.json", "--images", "."]) == 2
    assert "x.json: annotation file not found" in capsys.readouterr().err  # the data is checked first
    assert main(["eval", str(bad), "--ann", str(dataset / "annotations/instances_val.json"),
                 "--images", str(dataset / "images/val")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, bad)
    assert main(["predict", str(bad), str(dataset / "images/val"), "--out", str(tmp_path / "p")]) == 2
    assert "no model config" in capsys.readouterr().err


def test_yaml_config_and_overrides(tmp_path):
    from cascadevision.config import load_config
    from cascadevision.errors import ConfigError

    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  preset: htc_r50_fpn_20e\n  rpn:\n    nms_iou: 0.6\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["model.roi_head.iou_thresholds=[0.4,0.5,0.6]"])
    assert cfg.model.roi_head.type == "htc" and cfg.model.rpn.nms_iou == 0.6 and cfg.train.lr == 0.01
    assert cfg.train.epochs == 20 and cfg.train.lr_steps == (16, 19)
    assert cfg.model.roi_head.iou_thresholds == (0.4, 0.5, 0.6)
    with pytest.raises(ConfigError, match="'train.lr' must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="unknown config key 'model.roi_head.iou'.*iou_thresholds"):
        load_config(None, ["model.roi_head.iou=0.5"])


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--num-images", "6", "--max-iters", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| htc_r18_fpn" in out and "| mask_rcnn_r18_fpn" in out and "prediction PNGs" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["models"]) == {"htc_r18_fpn", "mask_rcnn_r18_fpn"}
    assert list((tmp_path / "demo" / "predictions").glob("*.png"))
