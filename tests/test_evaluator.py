"""COCO conversion and scoring, on three 30x40 images holding two small rectangles each; and drawing."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch import nn

from cascadevision.engine import coco_eval, evaluate, results_to_coco
from cascadevision.visualize import class_color, draw_predictions

# per image: (x1, y1, x2, y2, label) in pixels; labels index cat_ids. Four objects of label 0, two of label 1.
OBJECTS = [[(2, 3, 12, 11, 0), (20, 10, 29, 22, 1)],
           [(5, 5, 15, 15, 1), (25, 2, 37, 9, 0)],
           [(0, 0, 8, 6, 0), (30, 20, 40, 30, 0)]]
CAT_IDS = [3, 7]
HEIGHT, WIDTH = 30, 40


def rectangle_mask(x1, y1, x2, y2, height=HEIGHT, width=WIDTH):
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


class EvalDataset:
    """The dataset interface `evaluate` needs; image i carries i in its first pixel so a model can find its truth."""

    def __init__(self):
        self.image_ids = [11, 12, 13]
        self.cat_ids = CAT_IDS
        self.class_names = ["cat", "dog"]
        annotations = []
        for image_id, objects in zip(self.image_ids, OBJECTS):
            for x1, y1, x2, y2, label in objects:
                rle = mask_util.encode(np.asfortranarray(rectangle_mask(x1, y1, x2, y2).numpy().astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CAT_IDS[label],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0, "segmentation": rle})
        self.coco = COCO()
        self.coco.dataset = {"images": [{"id": i, "width": WIDTH, "height": HEIGHT} for i in self.image_ids],
                             "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, self.class_names)],
                             "annotations": annotations}
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        image = torch.zeros(3, HEIGHT, WIDTH)
        image[0, 0, 0] = index / 10
        return image, {"image_id": self.image_ids[index]}


def make_eval_dataset() -> EvalDataset:
    return EvalDataset()


class PerfectModel(nn.Module):
    """Returns the true objects of each image, except those whose position in OBJECTS is in `missed`."""

    def __init__(self, missed=(), with_masks=True):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.missed, self.with_masks = set(missed), with_masks

    def forward(self, images, targets=None):
        outputs = []
        for image in images:
            objects = [o for k, o in enumerate(OBJECTS[round(image[0, 0, 0].item() * 10)]) if k not in self.missed]
            output = {"boxes": torch.tensor([o[:4] for o in objects], dtype=torch.float32).reshape(-1, 4),
                      "labels": torch.tensor([o[4] for o in objects], dtype=torch.int64),
                      "scores": torch.linspace(0.9, 0.8, len(objects))}
            if self.with_masks:
                output["masks"] = torch.stack([rectangle_mask(*o[:4]) for o in objects]) if objects else \
                    torch.zeros(0, HEIGHT, WIDTH, dtype=torch.bool)
            outputs.append(output)
        return outputs


def perfect_results():
    dataset = make_eval_dataset()
    predictions = PerfectModel().eval()([dataset[i][0] for i in range(len(dataset))])
    return results_to_coco(predictions, dataset.image_ids, CAT_IDS)


# ----------------------------------------------------------------------------------------------------------


def test_results_to_coco_converts_boxes_labels_and_masks():
    mask = rectangle_mask(3, 4, 9, 7)
    prediction = {"boxes": torch.tensor([[3.0, 4.0, 9.5, 7.25]]), "labels": torch.tensor([1]),
                  "scores": torch.tensor([0.75]), "masks": mask[None]}
    [result] = results_to_coco([prediction], [42], CAT_IDS)
    assert result["image_id"] == 42 and result["category_id"] == 7 and result["score"] == 0.75
    assert result["bbox"] == [3.0, 4.0, 6.5, 3.25]  # x, y, w, h
    assert isinstance(result["segmentation"]["counts"], str)
    json.dumps(result)
    decoded = mask_util.decode({"size": result["segmentation"]["size"],
                                "counts": result["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask.numpy())
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    assert results_to_coco([empty], [42], CAT_IDS) == []


def test_coco_eval_perfect_predictions_score_100():
    dataset, results = make_eval_dataset(), perfect_results()
    for iou_type in ("bbox", "segm"):
        metrics = coco_eval(dataset.coco, results, iou_type)
        assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["APs"] == 100.0, iou_type
        assert metrics["APm"] == metrics["APl"] == -1.0  # no medium or large objects: undefined, as in COCO


def test_coco_eval_half_the_objects_missed():
    # keep the first half of each class's detections: every one is right but recall stops at 1/2, so
    # precision is 1 at the 51 recall thresholds 0, 0.01, ..., 0.50 and 0 at the other 50: AP = 51/101
    results = perfect_results()
    half = []
    for category in CAT_IDS:
        found = [r for r in results if r["category_id"] == category]
        half += found[:len(found) // 2]
    assert len(half) == 3
    metrics = coco_eval(make_eval_dataset().coco, half, "bbox")
    assert metrics["AP"] == pytest.approx(100 * 51 / 101)
    assert metrics["AP50"] == pytest.approx(100 * 51 / 101)


def test_coco_eval_without_detections_is_zero():
    metrics = coco_eval(make_eval_dataset().coco, [], "segm")
    assert metrics == dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl"], 0.0)


def test_evaluate_runs_model_and_writes_results(tmp_path):
    model = PerfectModel().train()
    metrics = evaluate(model, make_eval_dataset(), out_dir=tmp_path, batch_size=2, progress=False)
    assert metrics["bbox"]["AP"] == 100.0 and metrics["segm"]["AP"] == 100.0
    assert model.training  # the mode is restored
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 6 and {r["image_id"] for r in results} == {11, 12, 13}
    assert "Average Precision" in (tmp_path / "coco_eval.txt").read_text()


def test_evaluate_boxes_only_model_and_no_detections():
    metrics = evaluate(PerfectModel(with_masks=False), make_eval_dataset(), progress=False)
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] == 100.0
    nothing = evaluate(PerfectModel(missed={0, 1}), make_eval_dataset(), progress=False)
    assert nothing["bbox"]["AP"] == 0.0 and nothing["segm"]["AP"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# drawing


def test_draw_predictions_fills_masks_outlines_boxes_and_skips_low_scores():
    height, width = 100, 160
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    prediction = {"boxes": torch.tensor([[80.0, 50.0, 140.0, 90.0], [5.0, 60.0, 40.0, 95.0]]),
                  "labels": torch.tensor([1, 0]), "scores": torch.tensor([0.93, 0.1]),
                  "masks": torch.stack([rectangle_mask(80, 50, 140, 90, height, width),
                                        rectangle_mask(5, 60, 40, 95, height, width)])}
    picture = draw_predictions(image, prediction, ["cat", "dog"], score_thr=0.3)
    assert picture.size == (width, height) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    color = np.array(class_color(1))
    assert np.array_equal(pixels[89, 110], color)  # the mask's outline
    assert np.array_equal(pixels[90, 110], color)  # the box
    assert np.array_equal(pixels[70, 110], np.round(color * 0.45))  # translucent fill over black
    tag = pixels[42:50, 80:120]  # "dog 0.93" in white on a patch of the (dark) class colour, above the box
    assert (tag == color).all(axis=-1).mean() > 0.5 and (tag.min(axis=-1) > 200).any()
    assert not pixels[55:, :50].any()  # the 0.1-score detection is not drawn
    assert len({class_color(label) for label in range(20)}) == 20  # colours are per class and differ

    as_float = draw_predictions(image.float() / 255, prediction, ["cat", "dog"])
    assert np.array_equal(np.asarray(as_float), pixels)
