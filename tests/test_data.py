"""Data pipeline: image reading, COCO parsing and validation, transforms, the aspect-ratio batch sampler.

Every test writes its own tiny dataset into tmp_path, so expected pixels and boxes are known exactly.
"""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from cascadevision.data import (AspectRatioBatchSampler, CocoDataset, Compose, RandomHorizontalFlip, RandomResize,
                                Resize, collate, load_image)
from cascadevision.errors import DatasetError

W, H = 10, 8  # default image size of the hand-written datasets


def rgb_image(width=W, height=H, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_dataset(tmp_path, annotations, images=None, categories=None, name="ann.json", pixels=None):
    """Write image files and a COCO JSON; returns (ann_file, image_dir)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "width": W, "height": H}]
    for image in images:
        path = image_dir / image["file_name"]
        if not path.exists() and isinstance(image.get("width"), int) and isinstance(image.get("height"), int):
            array = pixels if pixels is not None else rgb_image(image["width"], image["height"], image["id"])
            Image.fromarray(array).save(path)
    if categories is None:
        categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]  # unsorted on purpose
    ann_file = tmp_path / name
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, image_dir


def polygon_ann(ann_id, polygon, category_id=3, image_id=1, **extra):
    xs, ys = polygon[0::2], polygon[1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "segmentation": [polygon], "iscrowd": 0, "area": bbox[2] * bbox[3], **extra}


def uncompressed_rle(mask):
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def one_warning(record):
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    return messages[0]


# ---------------------------------------------------------------------------------------------------------------
# load_image


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_load_image_converts_every_common_mode_to_rgb(tmp_path, mode):
    rgb = rgb_image()
    source = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    source.save(path, **({"quality": 100} if mode == "CMYK" else {}))
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    if mode != "CMYK":  # lossless: pixels equal PIL's own RGB conversion (alpha dropped)
        expected = np.array(Image.open(path).convert("RGBA").convert("RGB"))
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_load_image_rescales_16_bit(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 1000, 65534]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png")
    assert image.shape == (3, 2, 3)
    assert image[0].tolist() == [[0, 1, 255], [128, 4, 255]]
    assert torch.equal(image[0], image[2])


def test_load_image_applies_exif_orientation(tmp_path):
    stored = (np.arange(6, dtype=np.uint8).reshape(2, 3) * 40)  # 2 rows, 3 columns
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    image = load_image(tmp_path / "rotated.png")
    assert image.shape == (3, 3, 2)
    assert image[0].tolist() == [[120, 0], [160, 40], [200, 80]]  # stored (0, 0) is now top-right


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_load_image_rejects_truncated_files(tmp_path, ext):
    path = tmp_path / f"full.{ext}"
    Image.fromarray(rgb_image(64, 64)).save(path)
    data = path.read_bytes()
    truncated = tmp_path / f"cut.{ext}"
    truncated.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(DatasetError, match=rf"cut\.{ext}: cannot decode image \(image file is truncated") as info:
        load_image(truncated)
    assert "\n" not in str(info.value) and info.value.__suppress_context__


def test_load_image_missing_and_garbage(tmp_path):
    with pytest.raises(DatasetError, match=r"nothere\.png: image file not found"):
        load_image(tmp_path / "nothere.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"junk\.png: not an image file"):
        load_image(tmp_path / "junk.png")


# ---------------------------------------------------------------------------------------------------------------
# CocoDataset: targets


def test_polygon_and_rle_masks_are_decoded_exactly(tmp_path):
    blob = np.zeros((H, W), dtype=np.uint8)
    blob[2:5, 6:9] = 1  # rows 2-4, columns 6-8
    blob[6, 0] = 1
    corner = np.zeros((H, W), dtype=np.uint8)
    corner[5:8, 7:10] = 1
    compressed = mask_utils.encode(np.asfortranarray(corner))
    compressed["counts"] = compressed["counts"].decode("ascii")
    annotations = [
        polygon_ann(1, [1, 1, 5, 1, 5, 4, 1, 4], category_id=7),  # covers columns 1-4, rows 1-3
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 2, 9, 5], "segmentation": uncompressed_rle(blob),
         "iscrowd": 0, "area": 10},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [7, 5, 3, 3], "segmentation": compressed,
         "iscrowd": 0, "area": 9},
    ]
    ann_file, image_dir = write_dataset(tmp_path, annotations)
    pixels = np.array(Image.open(image_dir / "a.png"))
    dataset = CocoDataset(ann_file, image_dir, train=True)

    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.allclose(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert target["image_id"] == 1 and target["file_name"] == "a.png" and target["orig_size"] == (H, W)
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[1, 1, 5, 4], [0, 2, 9, 7], [7, 5, 10, 8]]  # xywh -> x1y1x2y2
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 0, 0]  # 7 -> 1, 3 -> 0
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (3, H, W)
    rectangle = np.zeros((H, W), dtype=np.uint8)
    rectangle[1:4, 1:5] = 1
    assert np.array_equal(masks[0].numpy(), rectangle)
    assert np.array_equal(masks[1].numpy(), blob)
    assert np.array_equal(masks[2].numpy(), corner)


def test_category_ids_map_to_contiguous_labels_both_ways(tmp_path):
    categories = [{"id": 90, "name": "z"}, {"id": 2, "name": "b"}, {"id": 17, "name": "q"}]
    annotations = [polygon_ann(1, [0, 0, 4, 0, 4, 4], category_id=90),
                   polygon_ann(2, [0, 0, 4, 0, 4, 4], category_id=2)]
    ann_file, image_dir = write_dataset(tmp_path, annotations, categories=categories)
    dataset = CocoDataset(ann_file, image_dir, train=False)
    assert dataset.cat_ids == [2, 17, 90]
    assert dataset.class_names == ["b", "q", "z"]
    assert dataset.num_classes == 3
    labels = dataset[0][1]["labels"].tolist()
    assert labels == [2, 0]
    assert [dataset.cat_ids[label] for label in labels] == [90, 2]
    assert all(dataset.cat_id_to_label[dataset.cat_ids[label]] == label for label in range(3))


def test_crowd_is_not_a_target_but_stays_for_evaluation_and_semantic_ignore(tmp_path):
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[0:2, 6:10] = 1
    annotations = [
        polygon_ann(1, [0, 0, 6, 0, 6, 6, 0, 6], category_id=3),  # big square, label 0
        polygon_ann(2, [2, 2, 4, 2, 4, 4, 2, 4], category_id=7),  # small square on top of it, label 1
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [6, 0, 4, 2], "segmentation": uncompressed_rle(crowd),
         "iscrowd": 1, "area": 8},
    ]
    ann_file, image_dir = write_dataset(tmp_path, annotations)
    dataset = CocoDataset(ann_file, image_dir, train=True, derive_semantic=True)
    _, target = dataset[0]
    assert target["labels"].tolist() == [0, 1]  # the crowd is not a target
    assert sorted(dataset.coco.getAnnIds(imgIds=[1])) == [1, 2, 3]
    assert dataset.coco.loadAnns([3])[0]["iscrowd"] == 1
    semantic = target["semantic"]
    assert semantic.dtype == torch.uint8 and semantic.shape == (H, W)
    assert semantic[0, 0] == 0  # big square
    assert semantic[3, 3] == 1  # the smaller instance wins the overlap
    assert semantic[0, 8] == 255  # crowd
    assert semantic[7, 7] == dataset.num_classes  # background = one extra class


def test_images_without_annotations_are_kept_for_eval_and_dropped_for_training(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": W, "height": H},
              {"id": 2, "file_name": "b.png", "width": 4, "height": 12},
              {"id": 3, "file_name": "c.png", "width": 6, "height": 6}]
    annotations = [polygon_ann(1, [0, 0, 4, 0, 4, 4]),
                   polygon_ann(2, [0, 0, 3, 0, 3, 3], image_id=3)]
    ann_file, image_dir = write_dataset(tmp_path, annotations, images=images)

    evaluation = CocoDataset(ann_file, image_dir, train=False)
    assert evaluation.image_ids == [1, 2, 3]
    assert evaluation.aspect_ratios == pytest.approx([W / H, 4 / 12, 1.0])
    _, empty = evaluation[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["masks"].shape == (0, 12, 4) and empty["masks"].dtype == torch.uint8

    assert CocoDataset(ann_file, image_dir, train=True).image_ids == [1, 3]
    assert CocoDataset(ann_file, image_dir, train=True, filter_empty=False).image_ids == [1, 2, 3]
    assert CocoDataset(ann_file, image_dir, train=True, min_size=7).image_ids == [1]
    assert len(CocoDataset(ann_file, image_dir, train=False, min_size=7)) == 3  # min_size is for training only


def test_semantic_maps_are_read_from_semantic_dir(tmp_path):
    ann_file, image_dir = write_dataset(tmp_path, [polygon_ann(1, [0, 0, 4, 0, 4, 4])])
    semantic_dir = tmp_path / "semantic"
    semantic_dir.mkdir()
    labels = np.full((H, W), 5, dtype=np.uint8)
    labels[0, :3] = 255
    Image.fromarray(labels).save(semantic_dir / "a.png")
    _, target = CocoDataset(ann_file, image_dir, train=True, semantic_dir=semantic_dir)[0]
    assert torch.equal(target["semantic"], torch.from_numpy(labels))


# ---------------------------------------------------------------------------------------------------------------
# CocoDataset: bad input


def test_recoverable_problems_are_skipped_with_one_counted_warning(tmp_path):
    annotations = [
        polygon_ann(1, [1, 1, 5, 1, 5, 4, 1, 4]),  # good
        {**polygon_ann(2, [1, 1, 5, 1, 5, 4]), "bbox": [1, 1, -3, 2]},  # negative width
        {**polygon_ann(3, [1, 1, 5, 1, 5, 4]), "bbox": [1, 1, 4, 0]},  # zero height
        {**polygon_ann(4, [1, 1, 5, 1, 5, 4]), "segmentation": [[1, 1, 5, 5]]},  # only a 2-point polygon
        {**polygon_ann(5, [1, 1, 5, 1, 5, 4]), "segmentation": [[1, 1, 5, 5], [0, 0, 2, 0, 2, 2]]},  # one good
        polygon_ann(6, [1, 1, 5, 1, 5, 4], category_id=99),  # unknown category
        {**polygon_ann(7, [1, 1, 5, 1, 5, 4]), "bbox": [20, 1, 3, 3]},  # entirely outside the 10x8 image
        {**polygon_ann(8, [6, 5, 10, 5, 10, 8]), "bbox": [6, 5, 9, 9]},  # partly outside: clipped
    ]
    ann_file, image_dir = write_dataset(tmp_path, annotations)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = CocoDataset(ann_file, image_dir, train=True)
    message = one_warning(record)
    assert message.startswith(str(ann_file))
    assert "2 annotations skipped for a zero or negative box width/height (annotation ids 2, 3)" in message
    assert "1 annotations skipped for having no polygon of 3 or more points (annotation ids 4)" in message
    assert "2 polygons dropped for fewer than 3 points" in message and "(annotation ids 4, 5)" in message
    assert "1 annotations skipped for an unknown category id (annotation ids 6)" in message
    assert "1 annotations skipped for a box entirely outside the image (annotation ids 7)" in message
    assert "\n" not in message

    _, target = dataset[0]
    assert target["boxes"].tolist() == [[1, 1, 5, 4], [1, 1, 5, 4], [6, 5, 10, 8]]  # annotation 8 clipped
    triangle = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[0, 0, 2, 0, 2, 2]], H, W)))
    assert np.array_equal(target["masks"][1].numpy(), triangle)  # annotation 5 keeps only its good polygon
    assert sorted(dataset.coco.getAnnIds()) == [1, 5, 8]  # the evaluator sees the cleaned annotations
    assert dataset.coco.loadAnns([5])[0]["segmentation"] == [[0, 0, 2, 0, 2, 2]]


def test_annotation_without_segmentation_uses_its_box_as_mask(tmp_path):
    annotation = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 1, 3, 4], "iscrowd": 0}
    ann_file, image_dir = write_dataset(tmp_path, [annotation])
    with pytest.warns(UserWarning, match=r"1 annotations without segmentation \(their box is used as mask\)"):
        dataset = CocoDataset(ann_file, image_dir, train=True)
    mask = dataset[0][1]["masks"][0]
    assert mask.sum() == 12 and mask[1:5, 2:5].all()
    assert dataset.coco.loadAnns([1])[0]["area"] == 12  # filled in for the evaluator


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.pop("categories"), r"ann\.json: missing top-level key\(s\) 'categories'"),
    (lambda d: d["images"][0].pop("width"), r"ann\.json: image 1 has no 'width'"),
    (lambda d: d["images"][0].pop("id"), r"ann\.json: image at index 0 has no 'id'"),
    (lambda d: d["annotations"][1].pop("bbox"), r"ann\.json: annotation 12 has no 'bbox'"),
    (lambda d: d["annotations"][1].pop("category_id"), r"ann\.json: annotation 12 has no 'category_id'"),
    (lambda d: d["annotations"][1].pop("id"), r"ann\.json: annotation at index 1 has no 'id'"),
    (lambda d: d["annotations"][1].update(image_id=5), r"ann\.json: annotation 12 refers to unknown image id 5"),
    (lambda d: d["annotations"][1].update(id=11), r"ann\.json: duplicate annotation id 11"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"ann\.json: duplicate image id 1"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"ann\.json: annotation 12 has a malformed bbox"),
    (lambda d: d["annotations"][1].update(segmentation={"size": [3, 3], "counts": [9]}),
     r"ann\.json: annotation 12 has RLE size \[3, 3\] but image 1 is"),
])
def test_malformed_json_is_a_one_line_error_naming_file_and_id(tmp_path, edit, pattern):
    ann_file, image_dir = write_dataset(tmp_path, [polygon_ann(11, [0, 0, 4, 0, 4, 4]),
                                                   polygon_ann(12, [0, 0, 4, 0, 4, 4])])
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=pattern) as info:
        CocoDataset(ann_file, image_dir, train=True)
    assert "\n" not in str(info.value)


def test_unreadable_annotation_file(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"missing\.json: annotation file not found"):
        CocoDataset(tmp_path / "missing.json", tmp_path / "images", train=True)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"broken\.json: invalid JSON at line 1"):
        CocoDataset(tmp_path / "broken.json", tmp_path / "images", train=True)


def test_missing_and_truncated_images_fail_when_loaded(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": W, "height": H},
              {"id": 2, "file_name": "gone.png", "width": W, "height": H}]
    annotations = [polygon_ann(1, [0, 0, 4, 0, 4, 4]), polygon_ann(2, [0, 0, 4, 0, 4, 4], image_id=2)]
    ann_file, image_dir = write_dataset(tmp_path, annotations, images=images)
    (image_dir / "gone.png").unlink()
    dataset = CocoDataset(ann_file, image_dir, train=True)
    with pytest.raises(DatasetError, match=r"images/gone\.png: image file not found"):
        dataset[1]
    data = (image_dir / "a.png").read_bytes()
    (image_dir / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"images/a\.png: cannot decode image"):
        dataset[0]


def test_image_size_must_match_the_json(tmp_path):
    images = [{"id": 4, "file_name": "a.png", "width": W + 1, "height": H}]
    ann_file, image_dir = write_dataset(tmp_path, [polygon_ann(1, [0, 0, 4, 0, 4, 4], image_id=4)],
                                        images=images, pixels=rgb_image(W, H))
    with pytest.raises(DatasetError, match=r"a\.png: image is 10x8 \(width x height\) but .*ann\.json says 11x8 "
                                           r"for image 4"):
        CocoDataset(ann_file, image_dir, train=True)[0]


def test_exif_rotated_image_uses_the_orientation_the_json_describes(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.fromarray(rgb_image(W, H)).save(image_dir / "a.png", exif=exif)  # displayed as 8 wide, 10 high

    upright = [{"id": 1, "file_name": "a.png", "width": H, "height": W}]
    ann_file, _ = write_dataset(tmp_path, [polygon_ann(1, [0, 0, 4, 0, 4, 4])], images=upright)
    image, target = CocoDataset(ann_file, image_dir, train=True)[0]
    assert image.shape == (3, W, H) and target["masks"].shape == (1, W, H)

    stored = [{"id": 1, "file_name": "a.png", "width": W, "height": H}]
    ann_file, _ = write_dataset(tmp_path, [polygon_ann(1, [0, 0, 4, 0, 4, 4])], images=stored, name="b.json")
    dataset = CocoDataset(ann_file, image_dir, train=True)
    with pytest.warns(UserWarning, match="matches the image without its EXIF rotation"):
        image, _ = dataset[0]
    assert image.shape == (3, H, W)


def test_semantic_map_missing_or_mismatched(tmp_path):
    ann_file, image_dir = write_dataset(tmp_path, [polygon_ann(1, [0, 0, 4, 0, 4, 4])])
    semantic_dir = tmp_path / "semantic"
    semantic_dir.mkdir()
    dataset = CocoDataset(ann_file, image_dir, train=True, semantic_dir=semantic_dir)
    with pytest.raises(DatasetError, match=r"semantic/a\.png: semantic map not found \(for image 1, a\.png\)"):
        dataset[0]
    Image.fromarray(np.zeros((H + 1, W), dtype=np.uint8)).save(semantic_dir / "a.png")
    with pytest.raises(DatasetError, match=r"semantic/a\.png: semantic map is 10x9 .* but image .*a\.png is 10x8"):
        dataset[0]
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(semantic_dir / "a.png")
    with pytest.raises(DatasetError, match=r"semantic/a\.png: label map must be single-channel"):
        dataset[0]


# ---------------------------------------------------------------------------------------------------------------
# transforms


def sample_pair():
    image = torch.rand(3, H, W)
    mask = torch.zeros(1, H, W, dtype=torch.uint8)
    mask[0, 2:5, 1:4] = 1  # columns 1-3, rows 2-4
    semantic = torch.zeros(H, W, dtype=torch.uint8)
    semantic[2:5, 1:4] = 3
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([0]), "masks": mask,
              "semantic": semantic}
    return image, target


def test_flip_moves_image_boxes_masks_and_semantic_together():
    image, target = sample_pair()
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert out["boxes"].tolist() == [[W - 4.0, 2.0, W - 1.0, 5.0]]
    assert torch.equal(flipped[:, 3, W - 1 - 2], image[:, 3, 2])  # pixel (row 3, col 2) moved to col W-3
    assert out["masks"][0, 3, W - 1 - 2] == 1 and out["masks"][0, 3, 2] == 0
    assert out["semantic"][3, W - 1 - 2] == 3
    # the box still encloses the flipped mask exactly
    cols = out["masks"][0].any(0).nonzero().flatten()
    assert (cols.min().item(), cols.max().item() + 1) == (int(out["boxes"][0, 0]), int(out["boxes"][0, 2]))
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 5.0]]  # input not modified
    same, untouched = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and untouched is target


def test_resize_keeps_ratio_and_scales_everything():
    image, target = sample_pair()  # 10 wide, 8 high
    resized, out = Resize(scale=(40, 16))(image, target)  # factor = min(40/10, 16/8) = 2
    assert resized.shape == (3, 16, 20)
    assert out["boxes"].tolist() == [[2.0, 4.0, 8.0, 10.0]]
    assert out["masks"].shape == (1, 16, 20) and out["masks"].dtype == torch.uint8
    assert out["masks"][0].nonzero().min(0).values.tolist() == [4, 2]
    assert out["masks"][0].nonzero().max(0).values.tolist() == [9, 7]
    assert out["semantic"].shape == (16, 20) and out["semantic"][5, 3] == 3
    # a fractional factor: masks and semantic stay label-valued (nearest), never blended
    _, out = Resize(scale=(15, 12))(image, target)  # factor 1.5 -> 15 wide, 12 high
    rows, cols = (2 * torch.arange(12) + 1) * H // 24, (2 * torch.arange(15) + 1) * W // 30  # under each centre
    assert torch.equal(out["masks"][0], target["masks"][0][rows][:, cols])
    assert torch.equal(out["semantic"], target["semantic"][rows][:, cols])
    assert out["boxes"].tolist() == [[1.5, 3.0, 6.0, 7.5]]
    assert Resize(scale=(1333, 800))(torch.rand(3, 600, 400), {})[0].shape == (3, 1200, 800)
    stretched, out = Resize(scale=(30, 30), keep_ratio=False)(image, target)  # width x3, height x3.75
    assert stretched.shape == (3, 30, 30) and out["boxes"].tolist() == [[3.0, 7.5, 12.0, 18.75]]


def test_random_resize_draws_from_the_scales_with_torch_rng():
    image, target = sample_pair()
    transform = Compose([RandomResize([(20, 16), (40, 32)]), RandomHorizontalFlip()])
    torch.manual_seed(3)
    first = [transform(image, target)[0].shape for _ in range(8)]
    torch.manual_seed(3)
    second = [transform(image, target)[0].shape for _ in range(8)]
    assert first == second
    assert set(first) == {(3, 16, 20), (3, 32, 40)}
    ranged = RandomResize([(20, 8), (100, 40)], mode="range")
    assert all(8 <= ranged(image, target)[0].shape[1] <= 40 for _ in range(5))


def test_collate_keeps_lists():
    batch = [sample_pair(), sample_pair()]
    images, targets = collate(batch)
    assert isinstance(images, list) and len(images) == 2 and images[1] is batch[1][0]
    assert isinstance(targets, list) and targets[0] is batch[0][1]


def test_dataset_with_transforms_and_dataloader(tmp_path):
    ann_file, image_dir = write_dataset(tmp_path, [polygon_ann(1, [1, 1, 5, 1, 5, 4, 1, 4])])
    dataset = CocoDataset(ann_file, image_dir, train=True,
                          transforms=Compose([Resize(scale=(20, 16)), RandomHorizontalFlip(p=1.0)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate)
    images, targets = next(iter(loader))
    assert images[0].shape == (3, 16, 20)
    assert targets[0]["boxes"].tolist() == [[10.0, 2.0, 18.0, 8.0]]  # [1,1,5,4] * 2, then flipped in width 20
    assert targets[0]["masks"][0, 2:8, 10:18].all() and targets[0]["masks"][0].sum() == 48


# ---------------------------------------------------------------------------------------------------------------
# AspectRatioBatchSampler


RATIOS = [1.5, 0.5, 1.0, 0.7, 2.0, 0.6, 1.3, 0.9, 1.1, 0.4, 1.7]  # 6 landscape/square, 5 portrait


def test_sampler_batches_hold_one_orientation_and_cover_every_index():
    sampler = AspectRatioBatchSampler(RATIOS, batch_size=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 3
    for batch in batches:
        assert len({RATIOS[i] >= 1 for i in batch}) == 1
    assert sorted(i for batch in batches for i in batch) == list(range(len(RATIOS)))
    assert len(AspectRatioBatchSampler(RATIOS, batch_size=2, drop_last=True)) == 3 + 2
    assert sum(map(len, AspectRatioBatchSampler(RATIOS, batch_size=2, drop_last=True))) == 10


def test_sampler_is_deterministic_per_seed_and_epoch():
    def epoch(seed, number):
        sampler = AspectRatioBatchSampler(RATIOS, batch_size=2, seed=seed)
        sampler.set_epoch(number)
        return list(sampler)

    torch.manual_seed(0)
    first = epoch(0, 1)
    torch.manual_seed(123)  # the global RNG must not matter
    assert epoch(0, 1) == first
    assert epoch(0, 2) != first
    assert epoch(1, 1) != first
    unshuffled = list(AspectRatioBatchSampler(RATIOS, batch_size=3, shuffle=False))
    assert unshuffled == [[0, 2, 4], [6, 8, 10], [1, 3, 5], [7, 9]]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampler_ddp_shards_are_disjoint_and_equally_long(world_size):
    shards = []
    for rank in range(world_size):
        sampler = AspectRatioBatchSampler(RATIOS, batch_size=2, seed=5, rank=rank, world_size=world_size)
        sampler.set_epoch(3)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler)
    assert len({len(shard) for shard in shards}) == 1
    num_batches = 6  # ceil(6/2) + ceil(5/2)
    padding = len(shards[0]) * world_size - num_batches
    batches = [tuple(batch) for shard in shards for batch in shard]
    assert len(set(batches)) == num_batches  # only the padding repeats a batch
    assert len(batches) - len(set(batches)) == padding
    assert sorted({i for batch in batches for i in batch}) == list(range(len(RATIOS)))
    for batch in batches:
        assert len({RATIOS[i] >= 1 for i in batch}) == 1
