"""Semantic segmentation: mIoU / Dice against a hand-computed confusion matrix, the image + label-map dataset and
its errors, augmentation, configs, and `cascadevision segment train -> resume -> eval -> predict` end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cascadevision.data import generate_synthetic
from cascadevision.errors import ConfigError, DatasetError
from cascadevision.segmentation import (ConfusionMatrix, SegmentationDataset, build_segmenter, load_seg_config,
                                        seg_preset_names)
from cascadevision.cli import main
from cascadevision.segmentation.dataset import RandomRotFlip, rotate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, num_images=6, size=64, seed=0, val_fraction=0.34)  # 4 train, 2 val
    return root


# ----------------------------------------------------------------------------------------------------------
# metrics


def test_scores_from_a_hand_computed_confusion_matrix():
    labels = torch.tensor([[0, 0, 1, 1, 2], [2, 2, 255, 255, 0]])
    prediction = torch.tensor([[0, 1, 1, 1, 2], [2, 0, 3, 0, 0]])
    confusion = ConfusionMatrix(4)
    confusion.update(prediction, labels)
    # rows: label, columns: prediction; the two 255 pixels are not counted
    expected = torch.tensor([[2, 1, 0, 0],
                             [0, 2, 0, 0],
                             [1, 0, 2, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(confusion.matrix, expected)
    scores = confusion.scores(["a", "b", "c", "d"])
    # a: TP 2, FP 1, FN 1 -> IoU 2/4, Dice 4/6;  b: TP 2, FP 1, FN 0 -> 2/3, 4/5;  c: TP 2, FP 0, FN 1 -> 2/3, 4/5
    # d never appears in labels or predictions: no score, not in the means
    assert scores["IoU"] == pytest.approx({"a": 50.0, "b": 200 / 3, "c": 200 / 3, "d": None}, abs=1e-3)
    assert scores["Dice"] == pytest.approx({"a": 400 / 6, "b": 80.0, "c": 80.0, "d": None}, abs=1e-3)
    assert scores["mIoU"] == pytest.approx((50 + 400 / 3) / 3, abs=1e-3)
    assert scores["mDice"] == pytest.approx((400 / 6 + 160) / 3, abs=1e-3)
    assert scores["aAcc"] == pytest.approx(100 * 6 / 8, abs=1e-3)


def test_a_class_predicted_but_never_labelled_scores_zero():
    confusion = ConfusionMatrix(2)
    confusion.update(torch.tensor([1, 1]), torch.tensor([0, 0]))
    scores = confusion.scores()
    assert scores["IoU"] == {"0": 0.0, "1": 0.0} and scores["mIoU"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# dataset


def test_dataset_reads_images_labels_and_class_names(synth):
    dataset = SegmentationDataset(synth / "images/train", synth / "semantic/train")
    assert len(dataset) == 4 and dataset.num_classes == 9
    assert dataset.class_names == json.loads((synth / "semantic_classes.json").read_text())
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64) and 0 <= image.min() <= image.max() <= 1
    assert target["semantic"].dtype == torch.uint8 and target["semantic"].shape == (64, 64)
    assert dataset.aspect_ratios == [1.0] * 4


def copy_split(synth, tmp_path, n=2):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for path in sorted((synth / "images/train").iterdir())[:n]:
        (images / path.name).write_bytes(path.read_bytes())
        (labels / path.name).write_bytes((synth / "semantic/train" / path.name).read_bytes())
    return images, labels


def test_classes_are_inferred_without_a_class_file(synth, tmp_path):
    images, labels = copy_split(synth, tmp_path)
    dataset = SegmentationDataset(images, labels)
    largest = max(int(np.asarray(Image.open(p))[np.asarray(Image.open(p)) != 255].max()) for p in labels.iterdir())
    assert dataset.class_names == [str(i) for i in range(largest + 1)]


def test_dataset_errors_name_the_file(synth, tmp_path):
    images, labels = copy_split(synth, tmp_path)
    first = sorted(labels.iterdir())[0]
    array = np.asarray(Image.open(first)).copy()
    array[0, 0] = 12
    Image.fromarray(array).save(first)
    dataset = SegmentationDataset(images, labels, class_names=[str(i) for i in range(9)])
    with pytest.raises(DatasetError, match=f"{first.name}: label value 12 is not a class"):
        dataset[0]

    array[0, 0] = 0
    Image.fromarray(array[:32]).save(first)
    with pytest.raises(DatasetError, match=f"{first.name}: label map is 64x32 .* but image"):
        dataset[0]

    first.unlink()
    with pytest.raises(DatasetError, match=f"{first.name}: label map not found for image"):
        SegmentationDataset(images, labels)
    with pytest.raises(DatasetError, match="image directory not found"):
        SegmentationDataset(tmp_path / "nowhere", labels)


def test_rotation_moves_image_and_labels_together():
    labels = torch.arange(16, dtype=torch.uint8).view(4, 4)
    image = torch.rand(3, 4, 4)
    rotated_image, rotated_labels = rotate(image, labels, 90)
    assert torch.equal(rotated_labels, labels.rot90(1, (0, 1)))
    torch.testing.assert_close(rotated_image, image.rot90(1, (1, 2)))
    _, corners = rotate(torch.rand(3, 8, 8), torch.ones(8, 8, dtype=torch.uint8), 45)
    assert corners[0, 0] == 255 and corners[4, 4] == 1  # what comes in from outside is ignored

    # random rot90 / flip / rotation: on a ramp (value 15 row + column) each label stays on its pixel; the
    # image is resampled bilinearly and the labels nearest, so inside the picture they differ by <= 15/2 + 1/2
    ramp = torch.arange(225).view(15, 15)
    torch.manual_seed(0)
    for _ in range(12):
        out_image, target = RandomRotFlip()(ramp.float().expand(3, 15, 15), {"semantic": ramp.to(torch.uint8)})
        known = target["semantic"] != 255
        inside = known.clone()
        inside[1:-1, 1:-1] &= known[:-2, 1:-1] & known[2:, 1:-1] & known[1:-1, :-2] & known[1:-1, 2:]
        inside[[0, -1]] = False
        inside[:, [0, -1]] = False
        difference = (out_image[0] - target["semantic"].float())[inside].abs()
        assert difference.max() <= 8.0 + 1e-4


# ----------------------------------------------------------------------------------------------------------
# configs and presets


def test_presets_build_and_unknown_keys_are_errors():
    assert {"cascade_r18", "cascade_add_r18", "fpn_r18", "cascade_r50", "cascade_efficientvit_m4"} <= set(
        seg_preset_names())
    cfg = load_seg_config("cascade_add_r18_mutation", ["model.num_classes=5"])
    assert cfg.model.loss.mutation and (cfg.model.loss.ce_weight, cfg.model.loss.dice_weight) == (0.3, 0.7)
    assert cfg.model.decoder.type == "cascade_add"
    assert build_segmenter(cfg.model).heads[0].out_channels == 5
    with pytest.raises(ConfigError, match="unknown config key 'model.decoder.chanels'"):
        load_seg_config("cascade_r18", ["model.decoder.chanels=[1]"])
    with pytest.raises(ConfigError, match="unknown segmentation preset 'nope'"):
        load_seg_config("nope")
    with pytest.raises(ConfigError, match="multiple of"):
        build_segmenter(load_seg_config("cascade_r18", ["model.input.size=[100,100]"]).model)


# ----------------------------------------------------------------------------------------------------------
# the command line, end to end

TINY = ["--set", "model.input.size=[64,64]", "--set", "model.backbone.base_channels=8",
        "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "train.warmup_iters=2",
        "--set", "train.checkpoint_interval=2", "--set", "train.log_interval=1", "--set", "train.device=cpu"]


@pytest.mark.slow
def test_segment_train_resume_eval_predict(synth, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["segment", "train", "cascade_r18", "--train-images", str(synth / "images/train"),
            "--train-labels", str(synth / "semantic/train"), "--val-images", str(synth / "images/val"),
            "--val-labels", str(synth / "semantic/val"), "--out", str(run), "--no-progress", *TINY]
    assert main(args + ["--set", "train.max_iters=2"]) == 0
    assert (run / "checkpoints" / "latest.pth").exists()
    assert main(args + ["--set", "train.max_iters=4", "--resume"]) == 0  # continues from iteration 2
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in entries if e["type"] == "train"] == [1, 2, 3, 4]
    evals = [e for e in entries if e["type"] == "eval"]
    assert evals and set(evals[-1]) >= {"mIoU", "mDice", "IoU", "Dice"}
    assert set(json.loads((run / "eval" / "metrics.json").read_text())["IoU"]) == set(
        json.loads((synth / "semantic_classes.json").read_text()))
    assert (run / "loss_curve.png").exists()

    final = run / "checkpoints" / "final.pth"
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["segment", "eval", str(final), "--images", str(synth / "images/val"),
                 "--labels", str(synth / "semantic/val"), "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "|    IoU |   Dice |" in table and "| circle" in table and "| mean" in table
    assert json.loads((out / "metrics.json").read_text())["mIoU"] is not None

    preds = tmp_path / "preds"
    assert main(["segment", "predict", str(final), str(synth / "images/val"), "--out", str(preds),
                 "--no-progress"]) == 0
    names = sorted(p.name for p in (synth / "images/val").iterdir())
    assert sorted(p.name for p in (preds / "overlays").iterdir()) == names
    assert sorted(p.name for p in (preds / "labels").iterdir()) == names
    label_map = np.asarray(Image.open(preds / "labels" / names[0]))
    assert label_map.shape == (64, 64) and label_map.max() < 9
    assert Image.open(preds / "overlays" / names[0]).size[0] == 64  # a legend strip may make it taller


def test_cli_errors_are_one_line(synth, tmp_path, capsys):
    assert main(["segment", "train", "cascade_r18", "--train-images", str(synth / "images/train"),
                 "--train-labels", str(synth / "semantic/train"), "--out", str(tmp_path / "r"),
                 "--set", "model.loss.mutaton=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'model.loss.mutaton'") and err.count("\n") == 1
    assert main(["segment", "train", "cascade_r18", "--out", str(tmp_path / "r")]) == 2
    assert "--train-images" in capsys.readouterr().err
    detector = tmp_path / "detector.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": {"config": {"model": {"neck": {}}}}}, detector)
    assert main(["segment", "eval", str(detector), "--images", ".", "--labels", "."]) == 2
    assert "not a segmentation checkpoint" in capsys.readouterr().err
