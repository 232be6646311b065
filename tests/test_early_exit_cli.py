"""`cascadevision exits train|calibrate|evaluate|bench` end to end on a tiny model (8x8 digits, 3 exits)."""
import json

import pytest
import torch

from cascadevision.cli import main

TINY = ["--set", "data.image_size=8", "--set", "model.base_width=4", "--set", "model.num_stages=3",
        "--set", "train.epochs=2", "--set", "train.gate_epochs=20", "--set", "train.shift=0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("exits")
    assert main(["exits", "train", "--preset", "cloud", "--out", str(run), "--quiet", *TINY]) == 0
    yield run / "model.pth"
    torch.set_num_threads(threads)  # the commands set train.threads (1)


def test_calibrate_evaluate_bench(checkpoint, tmp_path, capsys):
    run = checkpoint.parent
    capsys.readouterr()
    assert main(["exits", "calibrate", str(checkpoint), "--max-drop", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "max_prob thresholds:" in out and "planned on val" in out
    plan = json.loads((run / "thresholds.json").read_text())
    assert plan["policy"] == "max_prob" and len(plan["thresholds"]) == 2
    assert plan["target"]["accuracy"] == pytest.approx(plan["target"]["full_accuracy"] - 0.005)

    assert main(["exits", "evaluate", str(checkpoint), "--thresholds", str(run / "thresholds.json"),
                 "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "| exit | samples |" in out and "compact == simulate: True" in out
    report = json.loads((tmp_path / "eval" / "stats.json").read_text())
    stats = report["statistics"]
    assert sum(stats["counts"]) == report["samples"] > 300
    assert stats["planned_macs"] == pytest.approx(plan["macs"])  # planned (val) next to realised (test)
    assert (tmp_path / "eval" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "planned (calibration split)" in (tmp_path / "eval" / "table.md").read_text()

    assert main(["exits", "calibrate", str(checkpoint), "--budget", "0.6", "--policy", "entropy",
                 "--out", str(tmp_path / "budget.json")]) == 0
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert budget["method"].startswith("geometric p=") and budget["policy"] == "entropy"
    capsys.readouterr()
    assert main(["exits", "bench", str(checkpoint), "--thresholds", str(tmp_path / "budget.json"),
                 "--batch-sizes", "1", "16", "--repeats", "1", "--out", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    assert "| 16 | compact |" in out and "| 1 | full |" in out
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["mode"] for r in rows} == {"full", "compact", "simulate"}


def test_gate_and_patience_policies_from_the_command_line(checkpoint, tmp_path, capsys):
    assert main(["exits", "calibrate", str(checkpoint), "--max-drop", "1", "--policy", "gate",
                 "--set", "early_exit.prune_threshold=0.05", "--out", str(tmp_path / "gate.json")]) == 0
    assert main(["exits", "evaluate", str(checkpoint), "--thresholds", str(tmp_path / "gate.json"),
                 "--out", str(tmp_path / "gate")]) == 0
    assert json.loads((tmp_path / "gate" / "stats.json").read_text())["compact_matches_simulate"]
    assert main(["exits", "calibrate", str(checkpoint), "--max-drop", "1", "--policy", "patience",
                 "--out", str(tmp_path / "patience.json")]) == 0
    assert json.loads((tmp_path / "patience.json").read_text())["params"]["patience"] in (1, 2, 3)


def test_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["exits", "train", "--out", str(tmp_path), "--set", "early_exit.treshold=0.9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'early_exit.treshold'") and err.count("\n") == 1
    assert main(["exits", "evaluate", str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["exits", "calibrate", str(checkpoint), "--max-drop", "0.5", "--set", "model.num_stages=2"]) == 2
    assert "cannot be overridden" in capsys.readouterr().err


def test_anytime_evaluation_under_a_time_budget(checkpoint, tmp_path, capsys):
    # a generous budget runs every stage, so the "last" answer is the full model's
    assert main(["exits", "evaluate", str(checkpoint), "--out", str(tmp_path), "--set", "run.mode=anytime",
                 "--set", "run.budget_ms=60000", "--set", "run.anytime_answer=last"]) == 0
    report = json.loads((tmp_path / "stats.json").read_text())["statistics"]
    assert report["counts"][:2] == [0, 0] and report["accuracy"] == pytest.approx(report["full_accuracy"])
    # a zero budget still answers, from the first exit
    assert main(["exits", "evaluate", str(checkpoint), "--out", str(tmp_path), "--set", "run.mode=anytime",
                 "--set", "run.budget_ms=0"]) == 0
    assert json.loads((tmp_path / "stats.json").read_text())["statistics"]["counts"][1:] == [0, 0]


def test_a_run_directory_from_train_to_evaluate(tmp_path, monkeypatch, capsys):
    """The README's flow: train writes runs/exits-PRESET, the other commands take that directory, evaluate
    uses the thresholds calibrate wrote there (and says so), and train does not replace a run unasked."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    tiny = TINY + ["--set", "train.epochs=1", "--set", "train.gate_epochs=5"]
    assert main(["exits", "train", "--preset", "mobile", "--quiet", *tiny]) == 0
    run = tmp_path / "runs" / "exits-mobile"
    assert (run / "model.pth").is_file()
    capsys.readouterr()
    assert main(["exits", "train", "--preset", "mobile", "--quiet", *tiny]) == 2
    err = capsys.readouterr().err
    assert "runs/exits-mobile: holds another run" in err and "--overwrite" in err and "--resume" not in err

    assert main(["exits", "calibrate", "runs/exits-mobile", "--max-drop", "1"]) == 0
    plan = json.loads((run / "thresholds.json").read_text())
    capsys.readouterr()
    assert main(["exits", "evaluate", "runs/exits-mobile"]) == 0
    assert "thresholds: runs/exits-mobile/thresholds.json (from `exits calibrate`" in capsys.readouterr().out
    report = json.loads((run / "eval" / "stats.json").read_text())
    assert report["calibration"]["thresholds"] == plan["thresholds"]
    # an explicit policy is not the calibrated one, and says nothing about thresholds.json
    assert main(["exits", "evaluate", "runs/exits-mobile", "--policy", "entropy", "--out", "entropy"]) == 0
    assert "thresholds:" not in capsys.readouterr().out
    assert json.loads((tmp_path / "entropy" / "stats.json").read_text())["calibration"] is None

    assert main(["exits", "calibrate", "runs", "--max-drop", "1"]) == 2
    assert "runs: no model.pth in this run directory" in capsys.readouterr().err
    assert main(["exits", "train", "--preset", "mobile", "--quiet", "--overwrite", *tiny]) == 0
    assert "removed the earlier run's model.pth, thresholds.json, eval" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["model.pth", "train.lock"]
    torch.set_num_threads(threads)
