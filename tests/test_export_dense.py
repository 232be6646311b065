"""Export of the dense models (`cascadevision.export.dense`): a segmentation preset, the EfficientViT and HAT-Net
classifiers and a multi-exit classifier, each run by onnxruntime and as a loaded torch.export program on batches
of two sizes and compared with the eager PyTorch model; metadata, the CLI verbs, refusals."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cascadevision.cli import main
from cascadevision.config import to_dict
from cascadevision.early_exit.config import ExitsConfig
from cascadevision.early_exit.models import build_exit_model
from cascadevision.errors import CheckpointError, ModelInputError
from cascadevision.export import sidecar_path
from cascadevision.export.dense import export_classifier
from cascadevision.export.runtime import load_dense, load_exported
from cascadevision.io.checkpoint import save_checkpoint
from cascadevision.models.efficientvit import build_efficientvit
from cascadevision.models.hatnet import build_hatnet
from cascadevision.segmentation.model import build_segmenter
from cascadevision.segmentation.presets import seg_preset_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CLASSES = ["background", "disc", "square"]
TOL = 1e-4


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm/GroupNorm statistics and affines away from their init (zero-init BN weights would make the
    logits nearly constant, and the comparison weak)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.rand(m.bias.shape, generator=g) - 0.5
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean = torch.randn(m.running_mean.shape, generator=g) * 0.1
                m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model.eval()


def batch(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def export_both(export, folder) -> list[dict]:
    return [export(folder / name, fmt) for fmt, name in (("onnx", "m.onnx"), ("exported-program", "m.pt2"))]


def check_both_formats(module, metas, folder, batches, output="logits"):
    """Both files (ONNX, ExportedProgram), loaded back, give the eager outputs on every batch."""
    for meta, name in zip(metas, ("m.onnx", "m.pt2")):
        exported = load_dense(folder / name, threads=1)
        assert exported.meta == meta and exported.meta["cascadevision_version"]
        for x in batches:
            with torch.no_grad():
                want = module(x)
            got = exported(x)
            want = want if isinstance(want, (list, tuple)) else [want]
            names = meta["outputs"]
            assert len(names) == len(want) and names[0].startswith(output)
            for name, w in zip(names, want):
                assert w.abs().max() > 0.05, "the test model should give non-trivial outputs"
                assert got[name].shape == w.shape
                assert (got[name] - w).abs().max() <= TOL, (name, exported.source)
    assert sidecar_path(folder / "m.pt2").is_file()
    return metas


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    base = seg_preset_config("cascade_r18")
    cfg = dataclasses.replace(base, num_classes=len(CLASSES), class_names=tuple(CLASSES),
                              input=dataclasses.replace(base.input, size=(64, 64)))
    return randomise_norms(build_segmenter(cfg)), cfg


@pytest.fixture(scope="module")
def seg_files(segmenter, tmp_path_factory):
    from cascadevision.export.dense import export_segmenter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("seg")
    metas = export_both(lambda p, f: export_segmenter(segmenter[0], p, f, preset="tiny"), folder)
    torch.set_num_threads(threads)
    return folder, metas


def test_segmentation_export_matches_eager(segmenter, seg_files, one_thread):
    from cascadevision.export.dense import SegmentationGraph

    model, _ = segmenter
    folder, metas = seg_files
    graph = SegmentationGraph(model).eval()
    # two batch sizes, and a padded size other than the traced one (height and width are dynamic)
    check_both_formats(graph, metas, folder, [batch(1, 3, 64, 64, 1), batch(3, 3, 96, 64, 2)])
    meta = metas[0]
    assert meta["task"] == "segmentation" and meta["class_names"] == CLASSES and meta["preset"] == "tiny"
    assert meta["input"]["batch"] == [1, 1024] and meta["input"]["size_divisor"] == 32
    assert meta["input"]["height_range"][1] == 4096

    # the contract from the metadata alone, applied by hand, gives the eager model's label maps
    exported = load_dense(folder / "m.onnx", threads=1)
    contract = exported.meta["input"]
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, *contract["size"], generator=g) for _ in range(2)]
    mean, std = torch.tensor(contract["mean"]).view(3, 1, 1), torch.tensor(contract["std"]).view(3, 1, 1)
    x = torch.stack([(image * 255 - mean) / std for image in images])
    labels = exported(x)["logits"].argmax(dim=1)
    with torch.no_grad():
        want = torch.stack([p["semantic"] for p in model(images)])
    assert (labels == want).float().mean() > 0.999


def test_dense_runtime_refuses_bad_input_and_detector_loader_refuses_dense(seg_files, one_thread):
    path = seg_files[0] / "m.onnx"
    exported = load_dense(path)
    with pytest.raises(ModelInputError, match="multiples of 32"):
        exported(batch(1, 3, 64, 70, 0))
    with pytest.raises(ModelInputError, match="float batch"):
        exported(torch.zeros(3, 64, 64))
    with pytest.raises(CheckpointError, match="load_dense"):
        load_exported(path)


def test_segment_export_cli(segmenter, tmp_path, one_thread, capsys):
    model, cfg = segmenter
    checkpoint = tmp_path / "seg.pth"
    save_checkpoint(checkpoint, {"state_dict": model.state_dict(),
                                 "meta": {"config": {"model": to_dict(dataclasses.replace(cfg, preset="cascade_r18"))}}})
    out = tmp_path / "seg.pt2"
    assert main(["segment", "export", str(checkpoint), "--format", "exported-program", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["task"] == "segmentation" and meta["preset"] == "cascade_r18" and meta["class_names"] == CLASSES
    x = batch(2, 3, 64, 64, 4)
    with torch.no_grad():
        want = torch.stack(model.stage_logits(x)).sum(0)
    assert (load_dense(out)(x)["logits"] - want).abs().max() <= TOL


def test_efficientvit_m0_classifier(tmp_path, one_thread):
    torch.manual_seed(0)
    model = randomise_norms(build_efficientvit("m0", num_classes=5, img_size=64))
    metas = export_both(lambda p, f: export_classifier(model, p, f, input_size=64, preset="efficientvit_m0"),
                        tmp_path)
    check_both_formats(model, metas, tmp_path, [batch(1, 3, 64, 64, 1), batch(4, 3, 64, 64, 2)])
    meta = metas[0]
    assert meta["task"] == "classification" and meta["class_names"] == [str(i) for i in range(5)]
    assert meta["input"]["height_range"] == meta["input"]["width_range"] == [64, 64]
    assert meta["input"]["fixed_size"] is True
    with pytest.raises(ModelInputError, match="height sizes in"):
        load_dense(tmp_path / "m.onnx")(batch(1, 3, 96, 64, 0))


def test_hatnet_classifier(tmp_path, one_thread):
    torch.manual_seed(0)
    model = randomise_norms(build_hatnet("tiny", num_classes=4, dims=(16, 32, 48, 64), head_dim=16,
                                         depths=(1, 1, 1, 1), grid_sizes=(4, 2, 2, 1)))
    metas = export_both(lambda p, f: export_classifier(model, p, f, input_size=64, class_names="abcd"), tmp_path)
    check_both_formats(model, metas, tmp_path, [batch(1, 3, 64, 64, 1), batch(3, 3, 64, 64, 2)])
    assert metas[0]["class_names"] == ["a", "b", "c", "d"]


def test_exits_export_cli_gives_every_exit(tmp_path, one_thread, capsys):
    torch.manual_seed(0)
    cfg = ExitsConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=8),
                              model=dataclasses.replace(cfg.model, base_width=4, num_stages=3))
    model = randomise_norms(build_exit_model(cfg.model))
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "model.pth", {"state_dict": model.state_dict(), "meta": {"config": to_dict(cfg)}})
    out = tmp_path / "exits.onnx"
    assert main(["exits", "export", str(run), "--out", str(out)]) == 0
    assert "logits_exit3" in capsys.readouterr().out
    exported = load_dense(out, threads=1)
    assert exported.meta["task"] == "exits" and exported.meta["outputs"] == [f"logits_exit{k}" for k in (1, 2, 3)]
    for x in (batch(1, 1, 8, 8, 1), batch(5, 1, 8, 8, 2)):
        with torch.no_grad():
            want = model(x)
        got = exported(x)
        for k, w in enumerate(want):
            assert (got[f"logits_exit{k + 1}"] - w).abs().max() <= TOL
