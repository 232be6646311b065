"""Mixed precision (train.amp, --dtype), activation checkpointing (backbone.with_cp) and gradient accumulation.

The ops under bf16 autocast are compared with their own float32 call on the same inputs: the independent
references of each op are the naive-loop tests in test_ops.py; what is checked here is that autocast changes
nothing in them.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cascadevision.config import BackboneConfig, Config, update, validate
from cascadevision.data import CocoDataset
from cascadevision.data.synth import generate_synthetic
from cascadevision.engine.trainer import train
from cascadevision.errors import ConfigError
from cascadevision.models import build_from_config
from cascadevision.models.backbone import ResNet
from cascadevision.models.efficientvit import EfficientViTBackbone
from cascadevision.models.presets import preset_config
from cascadevision.ops import batched_nms, box_iou, decode_boxes, encode_boxes, multi_scale_roi_align, nms, paste_masks

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def random_boxes(n, size=64.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


# ----------------------------------------------------------------------------------------------------------
# the ops keep float32 under autocast


def test_roi_align_under_bf16_autocast_equals_its_float32_result():
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 32, 16, 16, generator=g), torch.randn(2, 32, 8, 8, generator=g)]
    rois = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0]]), random_boxes(4, 60)], 1)
    expected = multi_scale_roi_align(features, rois, 7, strides=[4, 8], finest_scale=8)
    with BF16:
        got = multi_scale_roi_align(features, rois, 7, strides=[4, 8], finest_scale=8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mask_pasting_under_bf16_autocast_equals_its_float32_result():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(5, 28, 28, generator=g)
    boxes = random_boxes(5, 50, seed=3)
    expected = paste_masks(masks, boxes, (60, 70))
    with BF16:
        got = paste_masks(masks, boxes, (60, 70))
        got_bool = paste_masks(masks, boxes, (60, 70), threshold=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(got_bool, expected >= 0.5)


def test_box_coder_iou_and_nms_under_bf16_autocast_equal_their_float32_results():
    boxes, gt = random_boxes(300, seed=4), random_boxes(300, seed=5)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(6))
    labels = torch.arange(300) % 3
    deltas = encode_boxes(boxes, gt, stds=(0.1, 0.1, 0.2, 0.2))
    expected = (deltas, decode_boxes(boxes, deltas, stds=(0.1, 0.1, 0.2, 0.2), max_shape=(64, 64)),
                box_iou(boxes, gt), nms(boxes, scores, 0.5), batched_nms(boxes, scores, labels, 0.5))
    with BF16:
        got = (encode_boxes(boxes, gt, stds=(0.1, 0.1, 0.2, 0.2)),
               decode_boxes(boxes, deltas, stds=(0.1, 0.1, 0.2, 0.2), max_shape=(64, 64)),
               box_iou(boxes, gt), nms(boxes, scores, 0.5), batched_nms(boxes, scores, labels, 0.5))
    for value, reference in zip(got, expected):
        assert value.dtype == reference.dtype
        torch.testing.assert_close(value, reference, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# training and inference of a tiny detector in bf16


TINY_MODEL = {"input": {"scale": [64, 64]}, "backbone": {"base_channels": 8}, "neck": {"out_channels": 32},
              "rpn": {"feat_channels": 16}, "roi_head": {"box_head": {"fc_channels": 32},
                                                       "mask_head": {"conv_channels": 16},
                                                       "sampler": {"num_samples": 32}}}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = generate_synthetic(root, num_images=4, size=64, seed=3, val_fraction=0.5)
    return paths


def tiny_detector_config(preset="mask_rcnn_r18_fpn", num_classes=4, **train_values):
    cfg = update(Config(model=preset_config(preset)), {"model": {**TINY_MODEL, "num_classes": num_classes}})
    return update(cfg, {"data": {"batch_size": 2, "num_workers": 0},
                        "train": {"max_iters": 3, "warmup_iters": 1, "lr": 0.01, "checkpoint_interval": 0,
                                  "eval_at_end": False, "device": "cpu", "loggers": [], **train_values}})


def test_tiny_detector_trains_under_cpu_bf16_with_finite_losses(synth, tmp_path, monkeypatch):
    dataset = CocoDataset(synth["train_ann"], synth["train_images"], train=True)
    cfg = tiny_detector_config(num_classes=dataset.num_classes, amp="bf16", log_interval=1)
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    seen = []
    original = model.backbone.forward

    def record_dtype(x):  # the convolutions really run in bf16
        outs = original(x)
        seen.append(outs[0].dtype)
        return outs

    monkeypatch.setattr(model.backbone, "forward", record_dtype)
    before = [p.detach().clone() for p in model.parameters()]
    result = train(cfg, model, dataset, tmp_path / "run", progress=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bf16_inference_gives_float32_outputs_close_to_fp32(synth):
    dataset = CocoDataset(synth["val_ann"], synth["val_images"], train=False)
    cfg = tiny_detector_config(num_classes=dataset.num_classes)
    torch.manual_seed(0)
    model = build_from_config(update(cfg.model, {"roi_head": {"test": {"score_thr": 0.0}}})).eval()
    image = dataset[0][0]
    with torch.inference_mode():
        reference = model([image])[0]
        with BF16:
            got = model([image])[0]
    for key in ("boxes", "scores", "masks"):
        assert got[key].dtype == reference[key].dtype, key
    assert got["scores"].dtype == torch.float32 and got["boxes"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# activation checkpointing


def _gradients(model, x):
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum(o.pow(2).mean() * (i + 1) for i, o in enumerate(outs)).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("backbone_type", ["resnet", "efficientvit_m0"])
def test_checkpointed_backbone_gives_the_same_gradients(backbone_type):
    if backbone_type == "resnet":
        cfg = BackboneConfig(depth=18, base_channels=8, frozen_stages=-1, norm_eval=True)
        make = ResNet
    else:
        cfg = BackboneConfig(type="efficientvit_m0", out_indices=(2, 3, 4), frozen_stages=-1, norm_eval=True)
        make = EfficientViTBackbone
    torch.manual_seed(0)
    plain = make(cfg).train()
    checkpointed = make(update(cfg, {"with_cp": True})).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    expected, got = _gradients(plain, x), _gradients(checkpointed, x)
    assert len(expected) == len(got) == sum(1 for p in plain.parameters() if p.requires_grad)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_checkpointing_frees_activations(monkeypatch):
    """What with_cp saves for backward: only the block inputs (counted through saved-tensor hooks)."""
    def saved_numbers(model, x):
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = model(x)
        return total[0], outs

    cfg = BackboneConfig(depth=18, base_channels=8, frozen_stages=-1, norm_eval=True)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    plain, _ = saved_numbers(ResNet(cfg).train(), x)
    checkpointed, _ = saved_numbers(ResNet(update(cfg, {"with_cp": True})).train(), x)
    assert checkpointed < plain / 2


# ----------------------------------------------------------------------------------------------------------
# gradient accumulation


class PixelRegression(nn.Module):
    """loss = mean over the batch of (w . mean_colour(image) - target)^2: no batch-dependent layer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))

    def forward(self, images, targets=None):
        colours = torch.stack([image.mean(dim=(1, 2)) for image in images])  # (B, 3)
        target = torch.stack([t["value"] for t in targets])
        return {"loss": ((colours @ self.w - target) ** 2).mean()}


class TwoImages:
    colours = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    values = torch.tensor([2.0, -1.0])
    aspect_ratios = [1.0, 1.0]
    image_ids = [1, 2]

    def __len__(self):
        return 2

    def __getitem__(self, index):
        image = self.colours[index][:, None, None].expand(3, 2, 2).clone()
        return image, {"value": self.values[index], "image_id": index + 1}


def test_accumulating_two_batches_of_one_equals_one_batch_of_two(tmp_path):
    lr = 0.1
    # hand computed: one SGD step (no momentum, no decay) on the mean loss over both images
    w0 = torch.tensor([0.5, -0.25, 1.0])
    residual = TwoImages.colours @ w0 - TwoImages.values  # (2,)
    gradient = (2 * residual[:, None] * TwoImages.colours).mean(0)
    expected = w0 - lr * gradient

    def run(batch_size, accumulate, name):
        model = PixelRegression()
        cfg = update(Config(), {"data": {"batch_size": batch_size, "num_workers": 0, "flip_prob": 0.0},
                                "train": {"max_iters": 2 // batch_size, "lr": lr, "momentum": 0.0,
                                          "weight_decay": 0.0, "warmup_iters": 0, "lr_steps": [100],
                                          "accumulate": accumulate, "checkpoint_interval": 0, "device": "cpu",
                                          "loggers": [], "log_interval": 1}})
        train(cfg, model, TwoImages(), tmp_path / name, progress=False)
        return model.w.detach()

    torch.testing.assert_close(run(2, 1, "batch2"), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(1, 2, "accumulate2"), expected, rtol=0, atol=1e-6)


def test_intervals_must_be_multiples_of_accumulate():
    validate(update(Config(), {"train": {"accumulate": 4, "checkpoint_interval": 500}}))
    with pytest.raises(ConfigError, match=r"train.checkpoint_interval \(500\) must be a multiple of train.accumulate"):
        validate(update(Config(), {"train": {"accumulate": 3, "checkpoint_interval": 500}}))


def test_fp16_inference_on_cpu_is_refused_before_any_work(tmp_path, capsys):
    from cascadevision.cli import main
    status = main(["eval", str(tmp_path / "missing.pth"), "--ann", str(tmp_path / "missing.json"), "--images",
                   str(tmp_path), "--device", "cpu", "--dtype", "fp16", "--no-progress"])
    assert status == 2
    assert "--dtype: fp16 runs on CUDA only; use bf16 on cpu" in capsys.readouterr().err
