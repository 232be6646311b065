"""norm: bn | syncbn | gn in the backbone, neck and heads (MMDetection's GN configs), and SyncBN under DDP."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from cascadevision.config import BackboneConfig, ModelConfig, update
from cascadevision.engine.distributed import wants_sync_batchnorm
from cascadevision.models import build_model
from cascadevision.models.backbone import ResNet
from cascadevision.models.presets import preset_config

DATA = Path(__file__).parent / "data"


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (DATA / name).read_text().splitlines():
        key, shape = line.split("\t")
        keys[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return keys


def gn_all_keys(bn_keys: dict) -> dict:
    """MMDetection's mask_rcnn_r50_fpn_gn-all keys, derived by hand from its BN model's (mmcv's naming): BN layers
    become `gn*` without running statistics, the FPN and mask-head ConvModules lose their conv bias and gain
    `.gn.{weight,bias}`, and the box head becomes Shared4Conv1FC (4 GN convs of 256, one FC of 1024)."""
    out = {}
    for key, shape in bn_keys.items():
        if re.search(r"(running_mean|running_var|num_batches_tracked)$", key):
            continue
        if key.startswith("backbone."):
            key = re.sub(r"\.bn(\d)\.", r".gn\1.", key)
            out[key] = shape
        elif re.match(r"(neck\.(lateral|fpn)_convs|roi_head\.mask_head\.convs)\.\d+\.conv\.bias", key):
            out[key.replace(".conv.bias", ".gn.weight")] = shape
            out[key.replace(".conv.bias", ".gn.bias")] = shape
        elif key.startswith("roi_head.bbox_head.shared_fcs."):
            continue
        else:
            out[key] = shape
    for i in range(4):
        out[f"roi_head.bbox_head.shared_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        out[f"roi_head.bbox_head.shared_convs.{i}.gn.weight"] = (256,)
        out[f"roi_head.bbox_head.shared_convs.{i}.gn.bias"] = (256,)
    out["roi_head.bbox_head.shared_fcs.0.weight"] = (1024, 256 * 7 * 7)
    out["roi_head.bbox_head.shared_fcs.0.bias"] = (1024,)
    return out


def test_gn_preset_has_mmdetection_gn_all_state_dict():
    with torch.device("meta"):
        model = build_model("mask_rcnn_r50_fpn_gn_2x", num_classes=80)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = gn_all_keys(read_keys("mask_rcnn_r50_keys.txt"))
    assert set(ours) ^ set(expected) == set()
    assert ours == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in model.modules()) > 50


def test_default_presets_have_no_norm_in_neck_and_heads():
    cfg = preset_config("htc_r50_fpn_1x")
    assert (cfg.backbone.norm, cfg.neck.norm, cfg.roi_head.mask_head.norm, cfg.roi_head.box_head.norm,
            cfg.roi_head.box_head.num_convs) == ("bn", "none", "none", "none", 0)


def test_gn_resnet_normalises_each_group_of_each_image():
    torch.manual_seed(0)
    model = ResNet(BackboneConfig(depth=18, norm="gn", frozen_stages=-1)).eval()
    stem = model.gn1
    x = torch.randn(2, 64, 5, 5) * 3 + 1
    y = stem(x)
    # hand check: every group of 2 channels of each image has mean 0 and (biased) variance 1 (weight 1, bias 0)
    groups = y.view(2, 32, -1)
    torch.testing.assert_close(groups.mean(-1), torch.zeros(2, 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(groups.var(-1, unbiased=False), torch.ones(2, 32), atol=1e-3, rtol=0)
    # the batch does not matter with GN: image 0 alone gives the same features
    torch.testing.assert_close(model(x[:1, :3])[0], model(x[:, :3])[0][:1], atol=1e-5, rtol=0)


def test_syncbn_is_plain_batchnorm_in_one_process_and_asks_for_conversion_under_ddp():
    cfg = update(ModelConfig(), {"backbone": {"norm": "syncbn"}})
    assert wants_sync_batchnorm(cfg) and not wants_sync_batchnorm(ModelConfig())
    assert wants_sync_batchnorm(update(ModelConfig(), {"roi_head": {"mask_head": {"norm": "syncbn"}}}))
    with torch.device("meta"):
        model = build_model(cfg)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(isinstance(m, nn.SyncBatchNorm) for m in bns)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what the trainer does under DDP
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == len(bns)
    assert set(converted.state_dict()) == set(model.state_dict())  # same keys: checkpoints load either way
