"""Never a wrong number, never a lost run: class matching in eval, protected run directories, output checks,
annotations without masks, predict over a folder with bad files, empty datasets, errors from loader workers."""
import json
from pathlib import Path

import pytest
import torch
from test_evaluator import CAT_IDS, PerfectModel, make_eval_dataset

from cascadevision.cli import main
from cascadevision.config import Config, to_dict, update
from cascadevision.data import match_classes
from cascadevision.engine import evaluate, save_checkpoint
from cascadevision.engine.rundir import RunLock
from cascadevision.errors import ConfigError, DatasetError, OutputError
from cascadevision.models import build_from_config
from cascadevision.models.presets import preset_config

TINY_MODEL = {"input": {"scale": [64, 64]}, "backbone": {"base_channels": 8}, "neck": {"out_channels": 16},
              "rpn": {"feat_channels": 16}, "roi_head": {"box_head": {"fc_channels": 32}, "mask_head": {"conv_channels": 16}}}
TINY = ["--set", "model.input.scale=[64,64]", "--set", "model.backbone.base_channels=8",
        "--set", "model.neck.out_channels=16", "--set", "model.rpn.feat_channels=16",
        "--set", "model.roi_head.box_head.fc_channels=32", "--set", "model.roi_head.mask_head.conv_channels=16",
        "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "train.warmup_iters=1",
        "--set", "train.checkpoint_interval=1", "--set", "train.eval_at_end=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", str(root), "--num-images", "6", "--size", "64", "--val-fraction", "0.34"]) == 0
    return root


def data_args(root, val=True):
    args = ["--train-ann", str(root / "annotations/instances_train.json"), "--train-images", str(root / "images/train")]
    if val:
        args += ["--val-ann", str(root / "annotations/instances_val.json"), "--val-images", str(root / "images/val")]
    return args


def write_checkpoint(path, class_names, cat_ids):
    """A cascadevision checkpoint of an untrained tiny Mask R-CNN for the given classes (no training needed)."""
    cfg = update(Config(model=preset_config("mask_rcnn_r18_fpn")),
                 {"model": dict(TINY_MODEL, num_classes=len(class_names), class_names=list(class_names))})
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    save_checkpoint(path, {"state_dict": model.state_dict(),
                           "meta": {"config": to_dict(cfg), "class_names": list(class_names), "cat_ids": list(cat_ids)}})
    return path


# ---------------------------------------------------------------------------------------------------------
# 1. classes are matched by id and name, never by position


SHAPES = (["circle", "rectangle", "triangle", "ring", "star"], [1, 2, 3, 5, 7])  # what `synth` writes


def test_identical_classes_map_by_id_even_in_another_order():
    mapping = match_classes(["b", "a"], [2, 1], ["a", "b"], [1, 2])
    assert mapping.cat_ids == [2, 1] and mapping.scored == [1, 2] and mapping.note == ""


def test_same_names_under_other_ids_map_by_name_with_a_note():
    mapping = match_classes(["a", "b"], [1, 2], ["b", "a"], [10, 20])
    assert mapping.cat_ids == [20, 10] and "matched by name" in mapping.note


def test_three_classes_against_five_categories_is_an_error_listing_both():
    with pytest.raises(ConfigError) as info:
        match_classes(["circle", "rectangle", "other"], [1, 2, 3], *SHAPES)
    message = str(info.value)
    assert "\n" not in message and "3 other" in message and "3 triangle" in message and "7 star" in message


def test_five_classes_against_three_categories_is_an_error():
    with pytest.raises(ConfigError, match="do not correspond"):
        match_classes(*SHAPES, ["circle", "rectangle", "triangle"], [1, 2, 3])


def test_ids_that_swapped_names_follow_the_names():
    mapping = match_classes(["cat", "dog"], [1, 2], ["dog", "cat"], [1, 2])
    assert mapping.cat_ids == [2, 1] and "matched by name" in mapping.note


def test_explicit_class_map_by_name_and_id():
    mapping = match_classes(["round", "box", "other"], [1, 2, 3], *SHAPES, class_map="round=circle, box=2")
    assert mapping.cat_ids == [1, 2, None] and mapping.scored == [1, 2] and "other" in mapping.note
    with pytest.raises(ConfigError, match="'hexagon' is not a dataset category"):
        match_classes(["round"], [1], *SHAPES, class_map="round=hexagon")


def test_model_without_stored_classes_maps_by_position_only_when_counts_agree():
    mapping = match_classes([], [], ["a", "b"], [4, 9], num_model_classes=2)
    assert mapping.cat_ids == [4, 9] and "stores no class names" in mapping.note
    with pytest.raises(ConfigError, match="has 3 classes"):
        match_classes([], [], ["a", "b"], [4, 9], num_model_classes=3)


def test_evaluate_scores_each_label_under_its_mapped_category():
    dataset = make_eval_dataset()  # categories 3 'cat', 7 'dog'; the perfect model predicts label 0 = cat
    assert evaluate(PerfectModel(), dataset, progress=False)["bbox"]["AP"] == 100.0
    # a model whose labels are swapped relative to the file: positional scoring would give 0
    swapped = evaluate(PerfectModel(), dataset, progress=False, cat_ids=list(reversed(CAT_IDS)))
    assert swapped["bbox"]["AP"] == 0.0
    # only label 0 mapped: its detections are scored against category 3 alone, 100 AP there
    only_cats = evaluate(PerfectModel(), dataset, progress=False, cat_ids=[3, None])
    assert only_cats["bbox"]["AP"] == 100.0 and only_cats["segm"]["AP"] == 100.0


def test_eval_cli_refuses_a_checkpoint_of_other_classes(dataset, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "three.pth", ["circle", "rectangle", "other"], [1, 2, 3])
    code = main(["eval", str(ckpt), "--ann", str(dataset / "annotations/instances_val.json"),
                 "--images", str(dataset / "images/val"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "3 other" in err and "7 star" in err and "--class-map" in err


# ---------------------------------------------------------------------------------------------------------
# 2. run directories


def test_train_refuses_a_directory_holding_another_run_then_overwrite_replaces_it(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "mask_rcnn_r18_fpn", *data_args(dataset, val=False), "--out", str(run), "--no-progress", *TINY]
    assert main(args + ["--set", "train.max_iters=2", "--set", "train.seed=1"]) == 0
    first_final = (run / "checkpoints" / "final.pth").read_bytes()
    first_config = (run / "config.yaml").read_text()
    capsys.readouterr()

    assert main(args + ["--set", "train.max_iters=1"]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "--overwrite" in err
    assert (run / "checkpoints" / "final.pth").read_bytes() == first_final  # untouched
    assert (run / "config.yaml").read_text() == first_config

    assert main(args + ["--set", "train.max_iters=1", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "removed the earlier run's" in err and "checkpoints" in err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["final.pth", "iter_0000001.pth", "latest.pth"]  # nothing of the first run is left
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_with_another_model_fails_before_writing_and_names_the_keys(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "mask_rcnn_r18_fpn", *data_args(dataset, val=False), "--out", str(run), "--no-progress", *TINY]
    assert main(base + ["--set", "train.max_iters=1"]) == 0
    config_before = (run / "config.yaml").read_text()
    leftover = run / "checkpoints" / ".iter_0000002.pth.x1y2z3.tmp"  # what a kill in the middle of a write leaves
    leftover.write_bytes(b"\0" * 1000)
    capsys.readouterr()
    other = ["train", "cascade_mask_rcnn_r18_fpn", *base[2:], "--set", "train.max_iters=2", "--resume"]
    assert main(other) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit this model" in err and "roi_head." in err and "mask_rcnn_r18_fpn" in err
    assert (run / "config.yaml").read_text() == config_before
    assert not leftover.exists()


def test_a_second_trainer_on_a_locked_run_is_refused(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "mask_rcnn_r18_fpn", *data_args(dataset, val=False), "--out", str(run), "--no-progress", *TINY,
            "--set", "train.max_iters=1"]
    run.mkdir()
    with RunLock(run):  # another process training here (flock conflicts across open files, even in one process)
        assert main(args + ["--overwrite"]) == 2
    assert "another process" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    from cascadevision.engine.rundir import check_run_dir

    with pytest.raises(OutputError, match="not both"):
        check_run_dir(tmp_path, resume=True, overwrite=True)


# ---------------------------------------------------------------------------------------------------------
# 3. an output location that cannot be written is one line, before any work


@pytest.mark.parametrize("verb", ["train", "eval", "predict", "synth"])
def test_unwritable_output_is_one_line_before_any_work(verb, dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = str(blocker / "out")  # a path below a file: cannot be created, whoever runs this (root included)
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pth", *SHAPES))
    argv = {"train": ["train", "mask_rcnn_r18_fpn", *data_args(dataset), "--out", out, *TINY],
            "eval": ["eval", ckpt, "--ann", str(dataset / "annotations/instances_val.json"),
                     "--images", str(dataset / "images/val"), "--out", out],
            "predict": ["predict", ckpt, str(dataset / "images/val"), "--out", out],
            "synth": ["synth", out, "--num-images", "2"]}[verb]
    assert main(argv + (["--no-progress"] if verb != "synth" else [])) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0 and "a_file/out" in captured.err and "cannot" in captured.err
    assert "eval:" not in captured.err + captured.out  # no progress bar: nothing ran


# ---------------------------------------------------------------------------------------------------------
# 5 + 9. annotations without masks, splits without annotations


def test_annotations_without_segmentation_are_scored_box_only(capsys):
    dataset = make_eval_dataset()
    del dataset.coco.dataset["annotations"][0]["segmentation"]
    metrics = evaluate(PerfectModel(), dataset, progress=False)
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == 100.0
    assert "segm AP skipped: 1 annotations" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="mask AP needs a segmentation"):
        evaluate(PerfectModel(), dataset, progress=False, iou_types=["bbox", "segm"])


def test_eval_on_a_split_without_annotations_says_so():
    dataset = make_eval_dataset()
    dataset.coco.dataset["annotations"] = []
    with pytest.raises(DatasetError, match="no annotations to evaluate against"):
        evaluate(PerfectModel(), dataset, progress=False)


def test_training_on_a_split_whose_images_all_lack_annotations(dataset, tmp_path, capsys):
    ann = json.loads((dataset / "annotations/instances_train.json").read_text())
    ann["annotations"] = []
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(ann))
    code = main(["train", "mask_rcnn_r18_fpn", "--train-ann", str(empty), "--train-images",
                 str(dataset / "images/train"), "--out", str(tmp_path / "run"), "--no-progress", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and f"all {len(ann['images'])} images were dropped" in err and "data.filter_empty" in err


# ---------------------------------------------------------------------------------------------------------
# 6. predict over a folder with bad files


def test_predict_skips_unreadable_files_and_names_outputs_uniquely(dataset, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    source = sorted((dataset / "images/val").iterdir())[0]
    (folder / "a.png").write_bytes(source.read_bytes())
    from PIL import Image
    Image.open(source).convert("RGB").save(folder / "a.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "x.jpg").mkdir()  # a directory with an image's name
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", *SHAPES)
    out = tmp_path / "preds"
    code = main(["predict", str(ckpt), str(folder), "--out", str(out), "--no-progress", "--score-thr", "0"])
    captured = capsys.readouterr()
    assert code == 1  # done, but not everything could be read
    assert "wrote 2 overlays" in captured.out and "broken.jpg" in captured.err
    assert sorted(p.name for p in out.glob("*.png")) == ["a_jpg.png", "a_png.png"]
    results = json.loads((out / "results.json").read_text())
    assert {Path(r["file_name"]).name for r in results} <= {"a.png", "a.jpg"}


# ---------------------------------------------------------------------------------------------------------
# 7. errors raised in DataLoader workers


class _BadDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DatasetError("images/0001.jpg: cannot decode image (truncated)")


def test_an_error_in_a_loader_worker_keeps_its_one_line_message():
    loader = torch.utils.data.DataLoader(_BadDataset(), num_workers=1)
    with pytest.raises(DatasetError) as info:
        next(iter(loader))
    assert str(info.value) == "images/0001.jpg: cannot decode image (truncated)"


def test_check_data_lists_every_problem_and_exits_1(dataset, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((dataset / "images/train").iterdir()):
        (images / source.name).write_bytes(source.read_bytes())
    names = sorted(p.name for p in images.iterdir())
    (images / names[0]).unlink()                                          # missing
    (images / names[1]).write_bytes((images / names[1]).read_bytes()[:60])  # truncated
    ann = str(dataset / "annotations/instances_train.json")
    assert main(["check-data", ann, str(images)]) == 1
    out = capsys.readouterr().out
    assert names[0] in out and names[1] in out
    assert main(["check-data", ann, str(dataset / "images/train")]) == 0


def test_eval_of_a_cascade_checkpoint_with_and_without_early_exit(dataset, tmp_path, capsys):
    cfg = update(Config(model=preset_config("cascade_mask_rcnn_r18_fpn")),
                 {"model": dict(TINY_MODEL, num_classes=5, class_names=SHAPES[0])})
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    ckpt = tmp_path / "cascade.pth"
    save_checkpoint(ckpt, {"state_dict": model.state_dict(),
                           "meta": {"config": to_dict(cfg), "class_names": SHAPES[0], "cat_ids": SHAPES[1]}})
    args = ["eval", str(ckpt), "--ann", str(dataset / "annotations/instances_val.json"),
            "--images", str(dataset / "images/val"), "--no-progress", "--set", "model.roi_head.test.score_thr=0.0"]
    assert main(args) == 0
    assert "RoI-head compute" not in capsys.readouterr().out  # no exit table unless asked for
    assert main(args + ["--early-exit", "max_prob", "--exit-threshold", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "| bbox" in out and "RoI-head compute" in out
