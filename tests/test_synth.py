"""The synthetic shapes dataset: valid COCO, both mask encodings, consistent with its semantic maps, deterministic."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cascadevision.data import CocoDataset, generate_synthetic
from cascadevision.data.synth import SEMANTIC_CLASSES, THING_CLASSES

SIZE = 128


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth"), num_images=24, size=SIZE, seed=3, val_fraction=0.25)


def load_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def test_layout_and_splits(synthetic):
    root = Path(synthetic["root"])
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == [f"{i:06d}.png" for i in range(18)]
    assert sorted(p.name for p in (root / "images" / "val").iterdir()) == [f"{i:06d}.png" for i in range(18, 24)]
    for split in ("train", "val"):
        assert len(list(Path(synthetic[f"{split}_semantic"]).iterdir())) == len(
            list(Path(synthetic[f"{split}_images"]).iterdir()))
    assert json.loads(Path(synthetic["semantic_classes"]).read_text()) == SEMANTIC_CLASSES
    assert SEMANTIC_CLASSES[:len(THING_CLASSES)] == ["circle", "rectangle", "triangle", "ring", "star"]


def test_annotations_are_valid_coco_with_polygons_and_rle(synthetic):
    kinds = set()
    images_without_objects = []
    for split in ("train", "val"):
        coco = load_coco(synthetic[f"{split}_ann"])
        assert sorted(coco.getCatIds()) == [1, 2, 3, 5, 7]  # not contiguous on purpose
        ann_ids = coco.getAnnIds()
        assert len(ann_ids) == len(set(ann_ids)) > 0
        for image_id in coco.getImgIds():
            info = coco.loadImgs([image_id])[0]
            assert (info["width"], info["height"]) == (SIZE, SIZE)
            if not coco.getAnnIds(imgIds=[image_id]):
                images_without_objects.append(image_id)
        for ann in coco.loadAnns(ann_ids):
            segmentation = ann["segmentation"]
            kinds.add("polygon" if isinstance(segmentation, list) else
                      "rle-list" if isinstance(segmentation["counts"], list) else "rle-string")
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"] >= (SIZE // 24) ** 2
            rows, cols = np.nonzero(mask)
            assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    assert kinds == {"polygon", "rle-list", "rle-string"}
    assert images_without_objects == [12, 24]  # every 12th image is empty


def test_instance_masks_match_the_semantic_map(synthetic):
    num_things = len(THING_CLASSES)
    coco = load_coco(synthetic["train_ann"])
    label_of = {cat_id: label for label, (cat_id, _) in enumerate(THING_CLASSES)}
    for image_id in coco.getImgIds():
        info = coco.loadImgs([image_id])[0]
        semantic = np.asarray(Image.open(Path(synthetic["train_semantic"]) / info["file_name"]))
        covered = np.zeros_like(semantic, dtype=np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = coco.annToMask(ann).astype(bool)
            assert (semantic[mask] == label_of[ann["category_id"]]).all()
            covered += mask
        assert covered.max() <= 1  # visible masks do not overlap
        things = semantic < num_things
        assert np.array_equal(things, covered == 1)  # every thing pixel belongs to an annotation
        stuff = semantic[(semantic != 255) & ~things]
        assert ((stuff >= num_things) & (stuff < len(SEMANTIC_CLASSES))).all()


def test_loads_as_a_cascadevision_dataset(synthetic):
    train = CocoDataset(synthetic["train_ann"], synthetic["train_images"], train=True,
                        semantic_dir=synthetic["train_semantic"])
    val = CocoDataset(synthetic["val_ann"], synthetic["val_images"], train=False)
    assert train.class_names == ["circle", "rectangle", "triangle", "ring", "star"]
    assert len(val) == 6  # the empty image 24 included
    assert 12 not in train.image_ids and len(train) == 17  # the empty image 12 dropped
    image, target = train[0]
    assert image.shape == (3, SIZE, SIZE) and target["semantic"].shape == (SIZE, SIZE)
    for mask, label in zip(target["masks"], target["labels"]):
        assert (target["semantic"][mask.bool()] == label).all()


def test_deterministic_in_seed_and_independent_of_workers(synthetic, tmp_path):
    again = generate_synthetic(tmp_path / "again", num_images=24, size=SIZE, seed=3, val_fraction=0.25,
                               num_workers=2)
    for key in ("train_ann", "val_ann"):
        assert Path(again[key]).read_bytes() == Path(synthetic[key]).read_bytes()
    for name in ("000000.png", "000005.png"):
        for key in ("train_images", "train_semantic"):
            assert (Path(again[key]) / name).read_bytes() == (Path(synthetic[key]) / name).read_bytes()
    other = generate_synthetic(tmp_path / "other", num_images=4, size=SIZE, seed=4, val_fraction=0.0)
    assert (Path(other["train_images"]) / "000000.png").read_bytes() != (
        Path(synthetic["train_images"]) / "000000.png").read_bytes()
