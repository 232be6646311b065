"""Export: each detector family to ONNX (run by onnxruntime) and to a torch.export program (torch.export.load),
compared with the eager PyTorch model on synthetic images of several sizes; metadata, CLI, refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cascadevision.cli import main
from cascadevision.config import to_dict
from cascadevision.errors import CascadeVisionError, ConfigError
from cascadevision.io.checkpoint import save_checkpoint
from cascadevision.export import export_model, preprocess, sidecar_path
from cascadevision.export.runtime import load_exported
from cascadevision.models import build_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZES = [(100, 150), (70, 120), (130, 90)]  # different aspect ratios: three padded graph input sizes
CLASSES = ["disc", "square", "triangle"]


def tiny_detector(preset: str, **overrides):
    torch.manual_seed(0)
    model = build_model(preset, class_names=CLASSES, input={"scale": (128, 96)},
                        roi_head={"test": {"score_thr": 0.02}}, **overrides).eval()
    for module in model.modules():  # sharper mask probabilities: few pixels at exactly the 0.5 threshold
        if module.__class__.__name__ == "MaskHead":
            module.conv_logits.weight.data *= 20
    return model


def images():
    g = torch.Generator().manual_seed(1)
    out = []
    for h, w in SIZES:
        img = torch.rand(3, h, w, generator=g) * 0.3
        img[:, h // 4: h // 2, w // 5: w // 2] += 0.6  # a bright block: something to detect
        out.append(img.clamp(0, 1))
    return out


def assert_same_detections(got: dict, want: dict):
    n = len(want["scores"])
    assert n > 0, "the test model should detect something"
    assert len(got["scores"]) == n
    assert torch.equal(got["labels"], want["labels"])
    assert (got["boxes"] - want["boxes"]).abs().max() <= 1e-3
    assert (got["scores"] - want["scores"]).abs().max() <= 1e-4
    if "masks" in want:
        inter = (got["masks"] & want["masks"]).flatten(1).sum(1).double()
        union = (got["masks"] | want["masks"]).flatten(1).sum(1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert iou.min() > 0.99
    else:
        assert "masks" not in got


def check_family(model, tmp_path, fmt):
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    export_model(model, path, fmt, cat_ids=[11, 12, 13], preset="tiny")
    exported = load_exported(path, threads=1)
    assert exported.class_names == CLASSES and exported.cat_ids == [11, 12, 13]
    with torch.no_grad():
        for image in images():
            assert_same_detections(exported([image])[0], model([image])[0])
    return exported


@pytest.fixture(scope="module")
def htc_export(tmp_path_factory):
    """A tiny HTC (semantic branch, masks, three stages) saved as a checkpoint and exported by the CLI."""
    model = tiny_detector("htc_r18_fpn")
    folder = tmp_path_factory.mktemp("htc")
    checkpoint = folder / "tiny.pth"
    save_checkpoint(checkpoint, {"state_dict": model.state_dict(),
                                 "meta": {"config": {"model": to_dict(model.cfg)}, "class_names": CLASSES,
                                          "cat_ids": [11, 12, 13]}})
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(folder / "htc.onnx")]) == 0
    return model, checkpoint, folder / "htc.onnx"


def test_htc_onnx_matches_eager(htc_export, one_thread):
    model, _, path = htc_export
    exported = load_exported(path, threads=1)
    assert exported.class_names == CLASSES and exported.cat_ids == [11, 12, 13]
    with torch.no_grad():
        for image in images():
            assert_same_detections(exported([image])[0], model([image])[0])


def test_mask_rcnn_exported_program_matches_eager(tmp_path, one_thread):
    check_family(tiny_detector("mask_rcnn_r18_fpn"), tmp_path, "exported-program")


# Each export takes 20-70 s of CPU: the default run exports one detector per code path (HTC above: cascade, masks,
# semantic branch, RoIAlign and NMS; Faster R-CNN: one stage, no masks); EfficientViT's attention exports in
# tests/test_export_dense.py. The detectors that only recombine those paths (the EfficientViT Mask R-CNN too, with
# its padded-size range) run with CASCADEVISION_TEST_ALL_EXPORTS=1 (and in benchmarks/bench_export.py).
ALL_EXPORTS = os.environ.get("CASCADEVISION_TEST_ALL_EXPORTS") == "1"
recombined = pytest.mark.skipif(not ALL_EXPORTS, reason="recombines paths tested above; "
                                                        "CASCADEVISION_TEST_ALL_EXPORTS=1 runs it")
FAMILIES = ["faster_rcnn_r18_fpn",
            *(pytest.param(p, marks=recombined) for p in ("mask_rcnn_r18_fpn", "cascade_rcnn_r18_fpn",
                                                          "cascade_mask_rcnn_r18_fpn", "htc_without_semantic_r18_fpn",
                                                          "mask_rcnn_efficientvit_m4_fpn"))]


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_export_matches_eager_every_family(preset, tmp_path, one_thread):
    model = tiny_detector(preset)
    if "efficientvit" not in preset:
        check_family(model, tmp_path, "onnx")
        return
    # EfficientViT attends to a whole feature map that fits in one 7x7 window and in windows otherwise: the
    # export follows its example's branch (96x128 here: stride-16 map 6x8, so windows) and says which sizes
    # keep to it; the 128x96 image (8x6, windows too, but reached through the height) is refused in one line
    path = tmp_path / "model.onnx"
    meta = export_model(model, path, "onnx")
    assert meta["input"]["height_range"] == [96, 96] and meta["input"]["width_range"] == [128, 224]
    exported = load_exported(path, threads=1)
    first, second, third = images()
    with torch.no_grad():
        for image in (first, second):
            assert_same_detections(exported([image])[0], model([image])[0])
    with pytest.raises(CascadeVisionError, match="this export takes padded heights in \\[96, 96\\]"):
        exported([third])


@recombined
def test_htc_exported_program_matches_eager(tmp_path, one_thread):
    check_family(tiny_detector("htc_r18_fpn"), tmp_path, "exported-program")


def test_cli_predict_onnx_writes_what_the_checkpoint_writes(htc_export, tmp_path, one_thread):
    from PIL import Image
    from pycocotools import mask as mask_utils

    _, checkpoint, path = htc_export
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images()):
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"im{i}.png")
    assert main(["predict", "--onnx", str(path), str(folder), "--out", str(tmp_path / "onnx"), "--threads", "1",
                 "--no-progress"]) == 0
    assert main(["predict", str(checkpoint), str(folder), "--out", str(tmp_path / "torch"), "--device", "cpu",
                 "--no-progress"]) == 0
    # the exported file in the checkpoint's place, the flags after the inputs: the same run
    assert main(["predict", str(path), str(folder), "--threads", "1", "--out", str(tmp_path / "onnx2"),
                 "--no-progress"]) == 0
    got = json.loads((tmp_path / "onnx/results.json").read_text())
    want = json.loads((tmp_path / "torch/results.json").read_text())
    assert json.loads((tmp_path / "onnx2/results.json").read_text()) == got
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g["file_name"] == w["file_name"] and g["category_id"] == w["category_id"] in (11, 12, 13)
        assert np.abs(np.array(g["bbox"]) - np.array(w["bbox"])).max() <= 1e-3
        assert abs(g["score"] - w["score"]) <= 1e-4
        assert mask_utils.iou([g["segmentation"]], [w["segmentation"]], [0])[0, 0] > 0.99 or (
            mask_utils.area(g["segmentation"]) == mask_utils.area(w["segmentation"]) == 0)
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.png")) == \
        sorted(p.name for p in (tmp_path / "torch").glob("*.png")) == ["im0.png", "im1.png", "im2.png"]


def test_serve_answers_from_the_onnx_file_as_the_checkpoint(htc_export, one_thread):
    """`cascadevision serve FILE.onnx`: the same app on the real exported file (onnxruntime), its answers against
    the server's answers for the checkpoint it was exported from."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import asyncio
    import io

    from PIL import Image
    from pycocotools import mask as mask_utils

    from cascadevision.serve import create_app, load_predictor

    _, checkpoint, path = htc_export
    buffer = io.BytesIO()
    Image.fromarray((images()[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, format="PNG")

    async def ask(source):
        app = create_app(load_predictor(source, device="cpu"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            health = (await client.get("/healthz")).json()
            answer = await client.post("/predict", params={"score_thr": 0.02},
                                       files={"image": ("a.png", buffer.getvalue())})
            return health, answer.json()

    health, got = asyncio.run(ask(path))
    _, want = asyncio.run(ask(checkpoint))
    assert [c["id"] for c in health["classes"]] == [11, 12, 13]
    assert len(got["detections"]) == len(want["detections"]) > 0
    for g, w in zip(got["detections"], want["detections"]):
        assert g["category_id"] == w["category_id"] and g["category_name"] == w["category_name"]
        assert np.abs(np.array(g["bbox"]) - np.array(w["bbox"])).max() <= 1e-3
        assert abs(g["score"] - w["score"]) <= 1e-4
        rle = [{**r["segmentation"], "counts": r["segmentation"]["counts"].encode()} for r in (g, w)]
        assert mask_utils.iou(rle[:1], rle[1:], [0])[0, 0] > 0.99 or mask_utils.area(rle).sum() == 0


def test_preprocess_is_the_model_transform():
    model = tiny_detector("mask_rcnn_r18_fpn")
    image = (torch.rand(3, 70, 120) * 255).to(torch.uint8)
    batch, meta = preprocess(image, model.cfg.input)
    want, sizes, factors, _ = model.transform([image.float() / 255])
    assert torch.equal(batch, want) and batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
    assert meta["image_size"].tolist() == list(sizes[0]) and meta["scale_factor"] == factors[0]
    # hand-computed: 70x120 into (128, 96): factor min(128/120, 96/70) = 1.0667 -> 75x128, padded to 96x128
    assert tuple(sizes[0]) == (75, 128) and tuple(batch.shape) == (1, 3, 96, 128)
    # the normalisation the contract states, on an image already at the input size: (x - mean) / std, 0-255 scale
    mean = torch.tensor(model.cfg.input.mean).view(3, 1, 1)
    std = torch.tensor(model.cfg.input.std).view(3, 1, 1)
    exact = (torch.rand(3, 96, 128) * 255).to(torch.uint8)
    assert torch.allclose(preprocess(exact, _contract(model))[0][0], (exact.float() - mean) / std, atol=1e-4)
    assert (batch[0, :, 75:] == 0).all()
    with pytest.raises(CascadeVisionError, match="expected a \\(3, H, W\\)"):
        preprocess(torch.rand(1, 70, 120), model.cfg.input)


def _contract(model):
    cfg = model.cfg.input
    return {"scale": cfg.scale, "mean": cfg.mean, "std": cfg.std, "size_divisor": cfg.size_divisor}


def test_onnx_metadata_and_graph_contract(htc_export):
    import onnx
    import onnxruntime as ort

    model, _, path = htc_export
    proto = onnx.load(str(path))
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["class_names"] == CLASSES and props["cat_ids"] == [11, 12, 13]
    assert props["preset"] == "htc_r18_fpn" and props["cascadevision_version"]
    assert props["input"]["size_divisor"] == 32 and props["input"]["batch"] == 1
    ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
    assert {"RoiAlign", "NonMaxSuppression"} <= ops
    # a raw onnxruntime session, fed as the contract says, gives the model's own unpasted results
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "image_size"]
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores", "labels", "mask_probs"]
    batch, meta = preprocess(images()[1], props["input"])
    boxes, scores, labels, probs = sess.run(None, {"image": batch.numpy(), "image_size": meta["image_size"].numpy()})
    size = [tuple(meta["image_size"].tolist())]
    with torch.no_grad():
        features = model.extract_features(batch)
        want = model.roi_head.predict(features, model.rpn_head(features, size)[0], size)[0]
    assert probs.shape[1:] == (28, 28) and len(boxes) == len(want["boxes"]) > 0
    np.testing.assert_allclose(boxes, want["boxes"].numpy(), atol=1e-3)
    np.testing.assert_array_equal(labels, want["labels"].numpy())
    # the test model's mask logits are scaled x20 (see tiny_detector), which scales float rounding too
    np.testing.assert_allclose(probs, want["mask_probs"].numpy(), atol=1e-3)


def test_early_exit_is_refused(tmp_path):
    from cascadevision.early_exit.detection import build_model as build_with_exit

    torch.manual_seed(0)
    model = build_with_exit("cascade_rcnn_r18_fpn", num_classes=3, input={"scale": (128, 96)},
                            roi_head={"early_exit": {"policy": "max_prob"}}).eval()
    with pytest.raises(ConfigError, match="early exit"):
        export_model(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_files_and_formats(tmp_path):
    model = tiny_detector("faster_rcnn_r18_fpn")
    with pytest.raises(ConfigError, match="--format must be one of"):
        export_model(model, tmp_path / "m.bin", "tflite")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CascadeVisionError, match="junk.onnx: onnxruntime cannot load it"):
        load_exported(junk)
    with pytest.raises(CascadeVisionError, match="no such exported model file"):
        load_exported(tmp_path / "missing.onnx")
    program = tmp_path / "p.pt2"
    program.write_bytes(b"zip?")
    with pytest.raises(CascadeVisionError, match="p.pt2.json is missing"):
        load_exported(program)
    sidecar_path(program).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CascadeVisionError, match="not a detector exported"):
        load_exported(program)
