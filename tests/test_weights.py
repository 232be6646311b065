"""Loading weights: MMDetection-format checkpoints, torchvision ResNets, fine-tuning to other classes, safety."""
import hashlib
import json
import os

import pytest
import torch

from cascadevision import build_model
from cascadevision.cli import main as cli_main
from cascadevision.errors import CheckpointError
from cascadevision.weights import inspect_weights, load_weights

PRESET = "htc_r18_fpn"


def small(num_classes=3, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(PRESET, num_classes=num_classes, **kw)


def assert_same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        if not any(s in key for s in skip):
            assert torch.equal(sa[key], sb[key]), key


def test_mmdetection_checkpoint_loads_by_name(tmp_path):
    source = small(seed=1)
    path = tmp_path / "htc_mmdet.pth"
    torch.save({"meta": {"mmdet_version": "2.0.0", "CLASSES": ["a", "b", "c"]},
                "state_dict": source.state_dict(), "optimizer": {}}, path)
    model = small(seed=2)
    report = load_weights(model, path)
    assert report["format"] == "detector" and report["missing"] == [] and report["unexpected"] == []
    assert_same_weights(model, source)


def test_ddp_prefix_is_stripped(tmp_path):
    source = small(seed=1)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = small(seed=2)
    load_weights(model, path)
    assert_same_weights(model, source)


def test_finetune_reinitialises_class_layers_only(tmp_path):
    source = small(num_classes=80, seed=1, roi_head={"htc": {"semantic_num_classes": 183}})
    path = tmp_path / "coco.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = small(num_classes=3, seed=2, roi_head={"htc": {"semantic_num_classes": 4}})
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights(model, path)
    reinit = sorted(report["reinitialised"])
    assert reinit == sorted(
        [f"roi_head.bbox_head.{s}.fc_cls.{p}" for s in range(3) for p in ("weight", "bias")]
        + [f"roi_head.mask_head.{s}.conv_logits.{p}" for s in range(3) for p in ("weight", "bias")]
        + [f"roi_head.semantic_head.conv_logits.{p}" for p in ("weight", "bias")])
    state = model.state_dict()
    for key in reinit:
        assert torch.equal(state[key], init[key])  # left at the fresh initialisation
    assert torch.equal(state["roi_head.bbox_head.0.fc_reg.weight"], source.state_dict()["roi_head.bbox_head.0.fc_reg.weight"])
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(small(num_classes=3, seed=2, roi_head={"htc": {"semantic_num_classes": 4}}), path, strict_classes=True)


def test_other_mismatch_is_an_error(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save({"state_dict": small(seed=1, roi_head={"box_head": {"fc_channels": 64}}).state_dict()}, path)
    with pytest.raises(CheckpointError, match="shape mismatch for .*shared_fcs"):
        load_weights(small(), path)
    torch.save({"state_dict": build_model("mask_rcnn_r18_fpn", num_classes=3).state_dict()}, path)
    with pytest.raises(CheckpointError, match="does not fit this model: .* missing"):
        load_weights(small(), path)


def test_torchvision_resnet_loads_into_backbone(tmp_path):
    model = small()
    # a torchvision-style ImageNet state dict: backbone names plus the classifier
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in model.backbone.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    report = load_weights(model, path)
    assert report["format"] == "torchvision-resnet"
    assert torch.equal(model.backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    with pytest.raises(CheckpointError, match="do not fit backbone"):
        load_weights(build_model("mask_rcnn_r34_fpn", num_classes=3), path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(small(), path)


def test_url_download_cache_and_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADEVISION_CACHE", str(tmp_path / "cache"))
    source = small(seed=1)
    path = tmp_path / "remote" / "model.pth"
    path.parent.mkdir()
    torch.save({"state_dict": source.state_dict()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = small(seed=2)
    load_weights(model, path.as_uri(), sha256=digest, progress=False)
    assert_same_weights(model, source)
    assert (tmp_path / "cache" / "weights" / "model.pth").exists()
    path.unlink()  # the cached copy serves the second call
    load_weights(small(seed=3), path.as_uri(), progress=False)
    with pytest.raises(CheckpointError, match="sha256"):
        load_weights(small(), path.as_uri(), sha256="0" * 64, progress=False)
    with pytest.raises(CheckpointError, match="download failed"):
        load_weights(small(), (tmp_path / "missing.pth").as_uri(), progress=False)


def test_safetensors_convert_and_inspect(tmp_path, capsys):
    source = small(seed=1)
    src = tmp_path / "ckpt.pth"
    torch.save({"state_dict": source.state_dict(), "meta": {"class_names": ["a", "b", "c"]}}, src)
    dst = tmp_path / "ckpt.safetensors"
    assert cli_main(["weights", "convert", str(src), str(dst)]) == 0
    model = small(seed=2)
    load_weights(model, dst)
    assert_same_weights(model, source)
    info = inspect_weights(dst)
    assert info["num_classes"] == 3 and info["num_stages"] == 3 and info["class_names"] == ["a", "b", "c"]
    assert info["parameters"] == sum(p.numel() for p in source.parameters())
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(src)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "detector"


def test_efficientvit_classifier_weights_load_into_detector_backbone(tmp_path):
    from cascadevision.models.efficientvit import build_efficientvit

    torch.manual_seed(3)
    classifier = build_efficientvit("m0", num_classes=10)
    path = tmp_path / "efficientvit_m0.pth"
    torch.save({"model": classifier.state_dict()}, path)
    detector = build_model("htc_efficientvit_m0_fpn", num_classes=3, roi_head={"htc": {"semantic_num_classes": 4}})
    report = load_weights(detector, path)
    assert report["format"] == "efficientvit-classifier"
    own = detector.backbone.state_dict()
    key = "patch_embed.0.c.weight"
    assert torch.equal(own[key], classifier.state_dict()[key])
    with pytest.raises(CheckpointError, match="EfficientViT weights, but the model's backbone is ResNet"):
        load_weights(small(), path)


# MMDetection's own checkpoint layout, from the key lists of its model-zoo files (tests/data/*_keys.txt):
# load_weights must put each of the file's tensors where MMDetection's name says, not where a round trip of
# our own state_dict would.
from test_models import read_keys  # noqa: E402


def mmdetection_file(path, keys_file, classes=None):
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) if shape else torch.tensor(3)
             for name, shape in read_keys(keys_file).items()}
    meta = {"mmdet_version": "2.0.0", "CLASSES": list(classes or [f"c{i}" for i in range(80)])}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {}}, path)
    return state


@pytest.mark.parametrize("preset,keys_file", [("htc_r50_fpn_1x", "htc_r50_keys.txt"),
                                              ("mask_rcnn_r50_fpn_1x", "mask_rcnn_r50_keys.txt")])
def test_mmdetection_key_names_load_into_the_same_named_tensors(tmp_path, preset, keys_file):
    state = mmdetection_file(tmp_path / "zoo.pth", keys_file)
    model = build_model(preset, num_classes=80)
    report = load_weights(model, tmp_path / "zoo.pth")
    assert report["missing"] == [] and report["unexpected"] == [] and report["reinitialised"] == []
    ours = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(ours[name].to(tensor.dtype), tensor), name


def test_mmdetection_coco_weights_fine_tune_to_three_classes(tmp_path):
    state = mmdetection_file(tmp_path / "zoo.pth", "mask_rcnn_r50_keys.txt")
    model = build_model("mask_rcnn_r50_fpn_1x", num_classes=3)
    report = load_weights(model, tmp_path / "zoo.pth")
    # the class-dependent layers of MMDetection's Mask R-CNN: 81-way classifier, 80x4 box regression, 80 masks
    assert sorted(report["reinitialised"]) == sorted(
        f"roi_head.{layer}.{p}" for layer in ("bbox_head.fc_cls", "bbox_head.fc_reg", "mask_head.conv_logits")
        for p in ("weight", "bias"))
    ours = model.state_dict()
    assert tuple(ours["roi_head.bbox_head.fc_cls.weight"].shape) == (4, 1024)
    assert torch.equal(ours["roi_head.mask_head.convs.3.conv.weight"], state["roi_head.mask_head.convs.3.conv.weight"])
