"""Small things a person reads: the AP table (aligned, -1 explained, not printed empty), overlay tags that do not
cover each other, checkpoint files with a normal file's mode."""
import os
import stat

import torch

from cascadevision import commands
from cascadevision.io.checkpoint import save_checkpoint
from cascadevision.presets import load_config
from cascadevision.tasks import detection
from cascadevision.visualize import _place_tags, draw_predictions

ROW = {"AP": 50.0, "AP50": 70.0, "AP75": 55.0, "APs": 30.0, "APm": 60.0, "APl": -1.0}


def test_the_ap_table_stays_aligned_under_a_long_title_and_explains_minus_one():
    text = detection.format_metrics({"bbox": ROW, "segm": dict(ROW, APm=-1.0)}, title="htc_without_semantic_r18_fpn")
    table, note = text.splitlines()[:4], text.splitlines()[4:]
    assert len({len(line) for line in table}) == 1  # every row as wide as the header
    assert [line.index("|", 2) for line in table] == [table[0].index("|", 2)] * 4  # the first column lines up
    assert len(note) == 1 and note[0].startswith("note: APm, APl = -1")
    assert "medium" in note[0] and "large" in note[0] and "small" not in note[0]


def test_no_note_when_every_size_has_ground_truth():
    assert "note" not in detection.format_metrics({"bbox": dict(ROW, APl=40.0)})


def test_no_table_after_training_without_evaluation(capsys):
    cfg = load_config("mask_rcnn_r18_fpn", ["train.eval_at_end=false"])
    commands._detection_report(detection, {"iteration": 10, "loss": 1.5, "checkpoint": "final.pth"}, cfg)
    assert capsys.readouterr().out == ""
    commands._detection_report(detection, {"bbox": ROW}, cfg)
    assert "| bbox" in capsys.readouterr().out


def test_overlapping_tags_move_or_are_left_out():
    box = [10.0, 40.0, 60.0, 90.0]
    # six detections of one box (ascending score): the best gets the spot above the box, the next its top inside
    # edge, then below the box, then its bottom inside edge; the two lowest find no free spot and get no tag
    tags = _place_tags([box] * 6, [(30, 10)] * 6, (100, 100))
    spots = [None if t is None else (t[0], t[1], t[0] + 30, t[1] + 10) for t in tags]
    assert tags[5] == (10.0, 30.0) and tags[4] == (10.0, 40.0) and tags[3] == (10.0, 90.0) and tags[2] == (10.0, 80.0)
    assert tags[:2] == [None, None]
    placed = [s for s in spots if s is not None]
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_separate_boxes_keep_their_tags_above_them():
    tags = _place_tags([[0.0, 50.0, 20.0, 60.0], [60.0, 50.0, 90.0, 60.0]], [(20, 8), (20, 8)], (100, 100))
    assert tags == [(0.0, 42.0), (60.0, 42.0)]


def test_draw_predictions_with_piled_up_detections_draws_every_box():
    prediction = {"boxes": torch.tensor([[10.0, 40.0, 60.0, 90.0]] * 4), "labels": torch.tensor([0, 1, 0, 1]),
                  "scores": torch.tensor([0.9, 0.8, 0.7, 0.6])}
    picture = draw_predictions(torch.zeros(3, 100, 100), prediction, ["circle", "square"], score_thr=0.5)
    assert picture.size == (100, 100)


def test_checkpoints_get_a_normal_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "a.pth", {"state_dict": {"w": torch.zeros(2)}})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o027)
        path = save_checkpoint(tmp_path / "b.pth", {"state_dict": {"w": torch.zeros(2)}})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the umask is respected, as by open()
        with open(tmp_path / "plain", "w"):
            pass
        assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640
    finally:
        os.umask(old)
