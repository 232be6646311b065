"""check_dataset: a tiny synthetic dataset with deliberate faults, each reported with its file name."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascadevision.data import generate_synthetic
from cascadevision.data.check import check_dataset, format_problems

SIZE = 64


@pytest.fixture
def dataset(tmp_path):
    """Six 64x64 PNG images (000000.png .. 000005.png) with annotations and semantic label maps."""
    paths = generate_synthetic(tmp_path / "data", num_images=6, size=SIZE, val_fraction=0)
    return {"ann": Path(paths["train_ann"]), "images": Path(paths["train_images"]),
            "semantic": Path(paths["train_semantic"])}


def image_bytes(width: int, height: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def problem_for(problems: list[str], name: str) -> str:
    found = [p for p in problems if name in p]
    assert len(found) == 1, (name, problems)
    return found[0]


def test_a_clean_dataset_has_no_problems(dataset):
    for deep in (True, False):
        assert check_dataset(dataset["ann"], dataset["images"], semantic_dir=dataset["semantic"], deep=deep) == []
    assert format_problems([]) == "no problems found"


def test_every_broken_image_is_reported_at_once(dataset):
    images = dataset["images"]
    (images / "000000.png").unlink()  # missing
    png = (images / "000001.png").read_bytes()
    (images / "000001.png").write_bytes(png[: len(png) // 2])  # truncated pixel data, header intact
    (images / "000002.png").write_bytes(image_bytes(48, 32, "PNG"))  # 48x32 where the JSON says 64x64
    (images / "000003.png").unlink()
    (images / "000003.png").mkdir()  # a directory where a file is expected
    ann = json.loads(dataset["ann"].read_text())
    ann["images"][4]["file_name"] = "000004.jpg"
    dataset["ann"].write_text(json.dumps(ann))
    jpeg = image_bytes(SIZE, SIZE, "JPEG")
    (images / "000004.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # truncated JPEG

    problems = check_dataset(dataset["ann"], images, deep=True)
    assert len(problems) == 5, problems
    assert "not found" in problem_for(problems, "000000.png")
    assert "image 1 " in problem_for(problems, "000000.png")  # synthetic image ids are index + 1
    assert "cannot decode" in problem_for(problems, "000001.png")
    assert "48x32" in problem_for(problems, "000002.png") and "64x64" in problem_for(problems, "000002.png")
    assert "directory" in problem_for(problems, "000003.png")
    assert "cannot decode" in problem_for(problems, "000004.jpg")
    assert all("\n" not in p for p in problems)

    quick = check_dataset(dataset["ann"], images, deep=False)  # headers only: truncated pixels go unnoticed
    assert "not found" in problem_for(quick, "000000.png")
    assert "48x32" in problem_for(quick, "000002.png")
    assert "directory" in problem_for(quick, "000003.png")


def test_an_exif_rotated_image_may_give_either_size_as_training_accepts(dataset):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: stored 64 wide and 48 high, shown 48 wide and 64 high
    Image.fromarray(np.zeros((48, SIZE, 3), dtype=np.uint8)).save(dataset["images"] / "rotated.jpg", exif=exif)
    ann = json.loads(dataset["ann"].read_text())
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != 1]
    for shown in ((48, SIZE), (SIZE, 48), (SIZE, SIZE)):
        ann["images"][0].update(file_name="rotated.jpg", width=shown[0], height=shown[1])
        dataset["ann"].write_text(json.dumps(ann))
        for deep in (True, False):
            problems = check_dataset(dataset["ann"], dataset["images"], deep=deep)
            if shown == (SIZE, SIZE):
                assert "rotated.jpg: image is 64x48" in problem_for(problems, "rotated.jpg")
            else:
                assert problems == []


def test_the_quick_check_finds_a_file_that_is_not_an_image(dataset):
    (dataset["images"] / "000001.png").write_bytes(b"\x89PNG\r\n")  # cut inside the header
    (dataset["images"] / "000002.png").write_text("hello")
    problems = check_dataset(dataset["ann"], dataset["images"], deep=False)
    assert len(problems) == 2, problems
    problem_for(problems, "000001.png")
    assert "not an image" in problem_for(problems, "000002.png")


def test_semantic_maps_missing_or_of_another_size(dataset):
    semantic = dataset["semantic"]
    (semantic / "000000.png").unlink()
    Image.fromarray(np.zeros((SIZE, SIZE + 1), dtype=np.uint8)).save(semantic / "000001.png")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(semantic / "000002.png")  # RGB, not labels
    for deep in (True, False):
        problems = check_dataset(dataset["ann"], dataset["images"], semantic_dir=semantic, deep=deep)
        assert len(problems) == 3, problems
        assert "semantic map not found" in problem_for(problems, "000000.png")
        assert "65x64" in problem_for(problems, "000001.png")
        assert "single-channel" in problem_for(problems, "000002.png")
    missing_dir = check_dataset(dataset["ann"], dataset["images"], semantic_dir=semantic / "nope")
    assert len(missing_dir) == 1 and "nope" in missing_dir[0]


def test_annotation_file_problems(dataset, tmp_path):
    missing = check_dataset(tmp_path / "missing.json", dataset["images"])
    assert len(missing) == 1 and "missing.json" in missing[0] and "not found" in missing[0]
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    assert "broken.json" in check_dataset(broken, dataset["images"])[0]

    # a malformed annotation and a missing image: both are reported
    ann = json.loads(dataset["ann"].read_text())
    ann["annotations"][0]["image_id"] = 999
    dataset["ann"].write_text(json.dumps(ann))
    (dataset["images"] / "000005.png").unlink()
    problems = check_dataset(dataset["ann"], dataset["images"])
    assert len(problems) == 2, problems
    assert "999" in problem_for(problems, "instances_train.json: annotation")
    assert "not found" in problem_for(problems, "000005.png")


def test_a_missing_image_directory_is_one_problem(dataset, tmp_path):
    shutil.rmtree(dataset["images"])
    problems = check_dataset(dataset["ann"], dataset["images"])
    assert len(problems) == 1 and "image directory not found" in problems[0]


def test_format_problems_lists_the_first_ones_and_counts_the_rest():
    problems = [f"img{i}.png: image file not found" for i in range(25)]
    text = format_problems(problems, limit=20)
    lines = text.splitlines()
    assert lines[0] == "25 problems:"
    assert lines[1].strip() == "img0.png: image file not found" and "img19.png" in lines[20]
    assert lines[-1].strip() == "... and 5 more" and len(lines) == 22
    assert format_problems(problems[:1]).splitlines()[0] == "1 problem:"
