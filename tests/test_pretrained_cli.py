"""From published weights to predictions on the command line (`predict/eval PRESET --weights FILE_OR_URL`), and
the HTC semantic head sized from the training data.

The weights files are tiny models saved in MMDetection's layouts (v2: meta['CLASSES'], v3:
meta['dataset_meta']['classes']); URLs are file:// URLs or http://127.0.0.1:9 (connection refused at once):
nothing is downloaded from anywhere.
"""
import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cascadevision import build_model
from cascadevision.cli import main
from cascadevision.config import to_dict
from cascadevision.data import CocoDataset
from cascadevision.data.coco_classes import COCO_CLASSES
from cascadevision.errors import CheckpointError, DatasetError
from cascadevision.hub import resolve
from cascadevision.presets import load_config
from cascadevision.tasks.detection import load_model, prepare_training
from cascadevision.weights import inspect_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"input.scale": "[96,96]", "backbone.base_channels": "8", "neck.out_channels": "16",
        "rpn.feat_channels": "16", "roi_head.box_head.fc_channels": "32", "roi_head.mask_head.conv_channels": "16"}
TINY_SET = [arg for key, value in TINY.items() for arg in ("--set", f"model.{key}={value}")]
EVERY_DETECTION = ["--set", "model.roi_head.test.score_thr=0"]  # random weights score low: keep them all
QUIET = ["--no-progress"]


def _nested(flat):
    """{'a.b': '1'} -> {'a': {'b': 1}}"""
    out = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(value)
    return out


def tiny_model(preset, num_classes, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(preset, [f"model.{k}={v}" for k, v in TINY.items()]).model
    return build_model(dataclasses.replace(cfg, num_classes=num_classes))


def mmdetection_v2_file(path, model, classes=None):
    meta = {"mmdet_version": "2.25.0", "config": "model = dict(type='MaskRCNN', ...)"}  # v2 keeps its config as text
    if classes is not None:
        meta["CLASSES"] = tuple(classes)
    torch.save({"meta": meta, "state_dict": model.state_dict(), "optimizer": {}}, path)
    return path


def mmdetection_v3_file(path, model, classes):
    meta = {"mmengine_version": "0.10.0", "dataset_meta": {"classes": tuple(classes),
                                                           "palette": [(220, 20, 60)] * len(classes)}}
    torch.save({"meta": meta, "state_dict": model.state_dict(), "message_hub": {}}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", str(root), "--num-images", "4", "--size", "96", "--val-fraction", "0.5"]) == 0
    return root


def predict(data, out, *args):
    return main(["predict", *args, str(data / "images/val"), "--out", str(out), *TINY_SET, *EVERY_DETECTION, *QUIET])


def results(out):
    return json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# predict / eval PRESET --weights FILE


def test_predict_preset_with_mmdetection_v2_weights_names_its_classes(data, tmp_path, capsys):
    source = tiny_model("mask_rcnn_r18_fpn", 3, seed=1)
    path = mmdetection_v2_file(tmp_path / "shapes_mmdet.pth", source, ["cat", "dog", "fish"])
    assert predict(data, tmp_path / "preds", "mask_rcnn_r18_fpn", "--weights", str(path)) == 0
    found = results(tmp_path / "preds")
    assert found and {r["category_id"] for r in found} <= {1, 2, 3}  # the file's 3 classes, in order
    assert len(list((tmp_path / "preds").glob("*.png"))) == 2

    model, meta = load_model("mask_rcnn_r18_fpn", _nested(TINY), device="cpu", weights=str(path))
    assert model.cfg.num_classes == 3 and model.class_names == ["cat", "dog", "fish"] and not model.training
    assert meta["class_names"] == ["cat", "dog", "fish"] and meta["cat_ids"] == []
    for key, tensor in source.state_dict().items():  # every tensor is the file's: nothing re-initialised
        assert torch.equal(model.state_dict()[key], tensor), key


def test_mmdetection_v3_meta_names_the_classes(tmp_path, capsys):
    path = mmdetection_v3_file(tmp_path / "v3.pth", tiny_model("mask_rcnn_r18_fpn", 2), ["boat", "buoy"])
    assert inspect_weights(path)["class_names"] == ["boat", "buoy"]
    model, meta = load_model("mask_rcnn_r18_fpn", _nested(TINY), device="cpu", weights=str(path))
    assert model.class_names == ["boat", "buoy"] and model.cfg.num_classes == 2


# COCO 2017 facts written out here, independently of cascadevision.data.coco_classes
COCO_GAPS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
COCO_SOME = {1: "person", 13: "stop sign", 44: "bottle", 67: "dining table", 72: "tv", 90: "toothbrush"}


def test_coco_preset_without_class_names_takes_coco_names_and_ids(data, tmp_path, capsys):
    # a COCO preset (MMDetection's mask_rcnn_r50_fpn_1x, made tiny) whose file names no classes: COCO's 80
    path = tmp_path / "mask_rcnn_r50_fpn_1x_coco.pth"
    torch.save({"state_dict": tiny_model("mask_rcnn_r50_fpn_1x", 80).state_dict()}, path)
    model, meta = load_model("mask_rcnn_r50_fpn_1x", _nested(TINY), device="cpu", weights=str(path))
    assert "names no classes: taking them to be COCO's 80" in capsys.readouterr().err
    ids, names = meta["cat_ids"], model.class_names
    assert len(ids) == len(names) == 80 and ids == sorted(ids)
    assert [i for i in range(1, 91) if i not in ids] == COCO_GAPS
    assert all(dict(zip(ids, names))[i] == name for i, name in COCO_SOME.items())

    assert predict(data, tmp_path / "preds", "mask_rcnn_r50_fpn_1x", "--weights", str(path)) == 0
    found = {r["category_id"] for r in results(tmp_path / "preds")}
    assert found and not found & set(COCO_GAPS) and found <= set(range(1, 91))

    # eval matches the weights' COCO ids to an annotation file that uses COCO's categories (given here out of order)
    ann = json.loads((data / "annotations/instances_val.json").read_text())
    categories = [{"id": i, "name": n} for i, n in zip(ids, names)][::-1]
    ann["categories"] = categories
    for a, cat_id in zip(ann["annotations"], [1, 13, 90, 44] * len(ann["annotations"])):
        a["category_id"] = cat_id
    coco_ann = tmp_path / "coco_val.json"
    coco_ann.write_text(json.dumps(ann))
    capsys.readouterr()
    assert main(["eval", "mask_rcnn_r50_fpn_1x", "--set", f"model.weights={path}", "--ann", str(coco_ann),
                 "--images", str(data / "images/val"), "--out", str(tmp_path / "eval"), *TINY_SET, *QUIET]) == 0
    captured = capsys.readouterr()
    assert "| bbox" in captured.out and "matched by name" not in captured.err and "id order" not in captured.err
    assert {r["category_id"] for r in json.loads((tmp_path / "eval/results.json").read_text())} <= set(ids)


def test_coco_class_names_in_a_file_give_coco_ids(tmp_path):
    path = mmdetection_v2_file(tmp_path / "named.pth", tiny_model("mask_rcnn_r18_fpn", 80), COCO_CLASSES)
    _, meta = load_model("mask_rcnn_r18_fpn", _nested(TINY), device="cpu", weights=str(path))
    assert [i for i in range(1, 91) if i not in meta["cat_ids"]] == COCO_GAPS


# ---------------------------------------------------------------------------------------------------------
# URLs, the cache and what an unreachable URL says


def test_weights_by_url_and_by_hand_when_unreachable(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASCADEVISION_CACHE", str(tmp_path / "cache"))
    path = mmdetection_v2_file(tmp_path / "w.pth", tiny_model("mask_rcnn_r18_fpn", 3), ["a", "b", "c"])
    assert predict(data, tmp_path / "by_url", "mask_rcnn_r18_fpn", "--weights", path.as_uri()) == 0
    assert (tmp_path / "cache/weights/w.pth").read_bytes() == path.read_bytes()

    name = "mask_rcnn_r18_fpn_coco_20200317-1a2b3c4d.pth"
    url = f"http://127.0.0.1:9/mmdetection/v2.0/{name}"  # nothing listens on port 9: refused at once
    capsys.readouterr()
    assert predict(data, tmp_path / "p", "mask_rcnn_r18_fpn", "--weights", url) == 2
    err = capsys.readouterr().err
    hand = tmp_path / "cache" / "weights" / name
    assert err.count("\n") == 1 and "download failed" in err
    assert f"put it at {hand}" in err and "sha256 should begin with 1a2b3c4d" in err
    shutil.copy(path, hand)  # fetched another way and put where the message says: used as it is
    assert predict(data, tmp_path / "p", "mask_rcnn_r18_fpn", "--weights", url) == 0


def test_a_download_whose_sha256_differs_from_its_name_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADEVISION_CACHE", str(tmp_path / "cache"))
    content = b"weights" * 100
    digest = hashlib.sha256(content).hexdigest()
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    (tmp_path / f"model-{wrong}.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match="does not begin with"):
        resolve((tmp_path / f"model-{wrong}.pth").as_uri(), progress=False)
    assert not (tmp_path / "cache/weights" / f"model-{wrong}.pth").exists()
    (tmp_path / f"model-{digest[:8]}.pth").write_bytes(content)
    got = resolve((tmp_path / f"model-{digest[:8]}.pth").as_uri(), progress=False)
    assert got.read_bytes() == content


# ---------------------------------------------------------------------------------------------------------
# --set model.weights, and what the first argument is


def our_checkpoint(path, num_classes=3):
    cfg = load_config("mask_rcnn_r18_fpn", [f"model.{k}={v}" for k, v in TINY.items()])
    names = tuple(f"k{i}" for i in range(num_classes))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes, class_names=names))
    torch.manual_seed(0)
    meta = {"config": to_dict(cfg), "class_names": list(names), "cat_ids": list(range(1, num_classes + 1))}
    torch.save({"state_dict": build_model(cfg.model).state_dict(), "meta": meta}, path)
    return path


def test_set_model_weights_is_the_same_as_weights_or_refused(data, tmp_path, capsys):
    path = mmdetection_v2_file(tmp_path / "w.pth", tiny_model("mask_rcnn_r18_fpn", 3, seed=4), ["a", "b", "c"])
    assert predict(data, tmp_path / "flag", "mask_rcnn_r18_fpn", "--weights", str(path)) == 0
    assert predict(data, tmp_path / "set", "mask_rcnn_r18_fpn", "--set", f"model.weights={path}") == 0
    assert results(tmp_path / "flag") == results(tmp_path / "set")

    ours = our_checkpoint(tmp_path / "ours.pth")
    capsys.readouterr()
    assert predict(data, tmp_path / "p", str(ours), "--set", f"model.weights={path}") == 2
    assert "brings its own weights" in capsys.readouterr().err
    assert predict(data, tmp_path / "p", str(ours), "--weights", str(path)) == 2
    assert "brings its own weights" in capsys.readouterr().err
    assert predict(data, tmp_path / "p", "mask_rcnn_r18_fpn", "--weights", str(path),
                   "--set", f"model.weights={tmp_path / 'other.pth'}") == 2
    assert "disagree" in capsys.readouterr().err


def test_first_argument_an_existing_file_wins_then_a_preset_name(data, tmp_path, monkeypatch, capsys):
    mmdet = mmdetection_v2_file(tmp_path / "zoo.pth", tiny_model("mask_rcnn_r18_fpn", 3), ["a", "b", "c"])
    monkeypatch.chdir(tmp_path)
    our_checkpoint(tmp_path / "mask_rcnn_r18_fpn")  # a checkpoint file named like a preset
    assert predict(data, tmp_path / "p1", "mask_rcnn_r18_fpn") == 0  # read as the checkpoint it is
    assert {r["category_id"] for r in results(tmp_path / "p1")} <= {1, 2, 3}

    capsys.readouterr()
    assert predict(data, tmp_path / "p2", "no_such_thing") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a checkpoint file" in err and "preset" in err
    assert predict(data, tmp_path / "p2", "htc_r50_fpn_1x") == 2
    assert "give the weights to run it with, --weights" in capsys.readouterr().err
    url = "http://127.0.0.1:9/htc/htc_r50_fpn_1x_coco_20200317-7332cf16.pth"
    assert predict(data, tmp_path / "p2", url) == 2
    assert f"cascadevision predict htc_r50_fpn_1x --weights {url}" in capsys.readouterr().err
    assert predict(data, tmp_path / "p2", str(mmdet)) == 2
    err = capsys.readouterr().err
    assert "no model config" in err and f"--weights {mmdet}" in err


def test_weights_that_do_not_fit_are_an_error_not_reinitialised(data, tmp_path, capsys):
    path = mmdetection_v2_file(tmp_path / "w.pth", tiny_model("mask_rcnn_r18_fpn", 3))  # names no classes
    assert predict(data, tmp_path / "p", "mask_rcnn_r18_fpn", "--weights", str(path),
                   "--set", "model.num_classes=5") == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "roi_head.bbox_head.fc_cls.weight (4, 32) vs model (6, 32)" in err
    assert not (tmp_path / "p" / "results.json").exists()
    backbone_only = tmp_path / "resnet18.pth"
    torch.save(tiny_model("mask_rcnn_r18_fpn", 3).backbone.state_dict(), backbone_only)
    assert predict(data, tmp_path / "p", "mask_rcnn_r18_fpn", "--weights", str(backbone_only)) == 2
    assert "not a whole detector's" in capsys.readouterr().err
    named_wrong = mmdetection_v2_file(tmp_path / "w2.pth", tiny_model("mask_rcnn_r18_fpn", 3), ["a", "b"])
    assert predict(data, tmp_path / "p", "mask_rcnn_r18_fpn", "--weights", str(named_wrong)) == 2
    assert "names 2 classes but its class layers have 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the HTC semantic head, sized from the data


def htc_config(data, model=None, **data_values):
    values = {"data": {"train_ann": str(data / "annotations/instances_train.json"),
                       "train_images": str(data / "images/train"), **data_values}, "model": model or {}}
    return load_config("htc_r18_fpn", values)


def label_maps(data, directory, labels_per_map):
    """One label map per training image (its size), holding the given labels (and 255) in stripes."""
    ann = json.loads((data / "annotations/instances_train.json").read_text())
    directory.mkdir()
    for image, labels in zip(ann["images"], labels_per_map):
        array = np.full((image["height"], image["width"]), 255, dtype=np.uint8)
        for row, label in enumerate(labels):
            array[row * 4:(row + 1) * 4] = label
        Image.fromarray(array).save((directory / image["file_name"]).with_suffix(".png"))
    return directory


def test_semantic_head_sized_from_the_label_maps(data, tmp_path, capsys):
    maps = label_maps(data, tmp_path / "semantic", [[0, 3], [11, 1]])
    job = prepare_training(htc_config(data, train_semantic=str(maps)))
    assert job.cfg.model.roi_head.htc.semantic_num_classes == 12  # labels 0..11 (255 ignored)
    notes = [line for line in capsys.readouterr().err.splitlines() if "semantic head" in line]
    assert notes == [f"note: HTC semantic head: 12 classes, the largest label + 1 in all 2 label maps of {maps} "
                     "(255 = ignore); set model.roi_head.htc.semantic_num_classes to choose another"]

    # the user's choice wins, without a note
    cfg = htc_config(data, {"roi_head": {"htc": {"semantic_num_classes": 40}}}, train_semantic=str(maps))
    assert prepare_training(cfg).cfg.model.roi_head.htc.semantic_num_classes == 40
    assert "semantic head" not in capsys.readouterr().err

    # many maps: an evenly spread sample is read
    dataset = CocoDataset(data / "annotations/instances_train.json", data / "images/train", train=True,
                          semantic_dir=maps)
    assert dataset.semantic_label_count(max_maps=1) == (4, 1)


def test_semantic_head_from_instance_masks_and_maps_without_labels(data, tmp_path, capsys):
    job = prepare_training(htc_config(data))
    things = len(json.loads((data / "annotations/instances_train.json").read_text())["categories"])
    assert job.cfg.model.roi_head.htc.semantic_num_classes == things + 1
    assert f"HTC semantic head: {things + 1} classes ({things} things + background)" in capsys.readouterr().err

    empty = label_maps(data, tmp_path / "empty", [[255], [255]])
    with pytest.raises(DatasetError, match="no label but 255"):
        prepare_training(htc_config(data, train_semantic=str(empty)))
