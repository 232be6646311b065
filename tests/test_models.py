"""Model parts against hand-computed cases and the reference checkpoints' key lists."""
import math
from pathlib import Path

import pytest
import torch

from cascadevision import build_model
from cascadevision.config import BackboneConfig
from cascadevision.errors import ConfigError
from cascadevision.models.assign import MaxIoUAssigner, sample
from cascadevision.models.backbone import ResNet
from cascadevision.models.rpn import AnchorGenerator
from cascadevision.models.transform import DetectionTransform, rescale_size
from cascadevision.config import InputConfig

REFERENCE = Path(__file__).resolve().parent / "data"  # the state_dict names and shapes of MMDetection's checkpoints


def read_keys(name):
    path = REFERENCE / name
    keys = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            keys[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return keys


@pytest.mark.parametrize("preset,keys_file,params", [
    ("mask_rcnn_r50_fpn_1x", "mask_rcnn_r50_keys.txt", 44_396_336),
    ("faster_rcnn_r50_fpn_1x", "faster_rcnn_r50_keys.txt", 41_753_056),
    ("cascade_rcnn_r50_fpn_1x", "cascade_rcnn_r50_keys.txt", 69_394_766),
    ("cascade_mask_rcnn_r50_fpn_1x", "cascade_mask_rcnn_r50_keys.txt", 77_324_606),
    ("htc_without_semantic_r50_fpn_1x", "htc_without_semantic_r50_keys.txt", 77_456_190),
    ("htc_r50_fpn_1x", "htc_r50_keys.txt", 80_258_293),
])
def test_state_dict_matches_mmdetection(preset, keys_file, params):
    expected = read_keys(keys_file)
    with torch.device("meta"):
        model = build_model(preset, num_classes=80)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) - set(expected) == set()
    assert set(expected) - set(ours) == set()
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == params


def test_htc_r101_parameter_count():
    with torch.device("meta"):
        model = build_model("htc_r101_fpn_20e", num_classes=80)
    assert len(model.state_dict()) == 732
    assert sum(p.numel() for p in model.parameters()) == 99_250_421


def test_resnet_names_match_torchvision_layout():
    # torchvision resnet18: 62 parameter tensors, 11,689,512 params with fc (512*1000+1000 = 513,000)
    model = ResNet(BackboneConfig(depth=18))
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 513_000
    assert "layer4.1.bn2.running_var" in model.state_dict()


@pytest.mark.parametrize("frozen", [-1, 0, 1, 2, 4])
def test_frozen_stages(frozen):
    model = ResNet(BackboneConfig(depth=18, frozen_stages=frozen, norm_eval=False)).train()
    stem_frozen = frozen >= 0
    assert model.conv1.weight.requires_grad is not stem_frozen
    assert model.bn1.training is not stem_frozen
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}")
        frozen_layer = i <= frozen
        assert all(p.requires_grad is not frozen_layer for p in layer.parameters())
        assert layer[0].bn1.training is not frozen_layer


def test_norm_eval_keeps_bn_statistics_fixed():
    model = ResNet(BackboneConfig(depth=18, frozen_stages=-1, norm_eval=True)).train()
    before = model.layer2[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.layer2[0].bn1.running_mean)
    assert model.layer2[0].bn1.weight.requires_grad  # affine params still train


def test_anchors_hand_computed():
    gen = AnchorGenerator([4, 8], [0.5, 1.0, 2.0], [8])
    a4, a8 = gen.grid_anchors([(2, 3), (1, 1)], "cpu")
    assert a4.shape == (2 * 3 * 3, 4) and a8.shape == (3, 4)
    # ratio 0.5 (h/w): h = 32*sqrt(.5), w = 32/sqrt(.5)
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)
    torch.testing.assert_close(a4[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    torch.testing.assert_close(a4[4], torch.tensor([4 - 16.0, -16.0, 4 + 16.0, 16.0]))  # (y=0, x=1), ratio 1
    torch.testing.assert_close(a4[3 * 3 + 1], torch.tensor([-16.0, 4 - 16.0, 16.0, 4 + 16.0]))  # (y=1, x=0)
    torch.testing.assert_close(a8[1], torch.tensor([-32.0, -32.0, 32.0, 32.0]))


def test_assigner_hand_case():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    boxes = torch.tensor([
        [0.0, 0, 10, 10],  # IoU 1 with gt0 -> pos 1
        [0.0, 0, 10, 20],  # IoU .5 with gt0 -> ignored at (0.7, 0.3)
        [50.0, 50, 60, 60],  # no overlap -> negative
        [20.0, 20, 30, 36],  # IoU 100/160 = .625 with gt1: ignored, but it is gt1's best -> low-quality pos 2
    ])
    res = MaxIoUAssigner(0.7, 0.3, 0.3).assign(boxes, gt, torch.tensor([4, 7]))
    assert res.gt_inds.tolist() == [1, -1, 0, 2]
    assert res.labels.tolist() == [4, -1, -1, 7]
    res = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=False).assign(boxes, gt, torch.tensor([4, 7]))
    assert res.gt_inds.tolist() == [1, -1, 0, -1]


def test_sampler_respects_fraction():
    torch.manual_seed(0)
    gt = torch.tensor([[0.0, 0, 100, 100]])
    boxes = torch.cat([torch.tensor([[0.0, 0, 100, 100]]).repeat(50, 1), torch.tensor([[200.0, 200, 300, 300]]).repeat(500, 1)])
    res = MaxIoUAssigner(0.5, 0.5, 0.5).assign(boxes, gt, torch.tensor([0]))
    s = sample(res, 64, 0.25)
    assert len(s.pos_inds) == 16 and len(s.neg_inds) == 48
    assert (s.pos_inds < 50).all() and (s.neg_inds >= 50).all()


def test_rescale_and_pad():
    assert rescale_size(480, 640, (1333, 800))[:2] == (800, 1067)  # short side binds
    assert rescale_size(500, 2000, (1333, 800))[:2] == (333, 1333)  # long side binds
    t = DetectionTransform(InputConfig(scale=(1333, 800)))
    batch, sizes, factors, targets = t([torch.rand(3, 480, 640), torch.rand(3, 500, 2000)],
                                       [{"boxes": torch.tensor([[10.0, 20, 30, 40]])}] * 2)
    assert sizes == [(800, 1067), (333, 1333)]
    assert batch.shape == (2, 3, 800, 1344)  # padded to /32
    assert batch[1, :, 333:].abs().sum() == 0
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[10 * 1067 / 640, 20 * 800 / 480, 30 * 1067 / 640, 40 * 800 / 480]]))


def test_bad_model_inputs_are_clear():
    model = build_model("mask_rcnn_r18_fpn", num_classes=2).eval()
    with pytest.raises(ValueError, match="image 0: expected a \\(3, H, W\\)"):
        model([torch.rand(1, 32, 32)])
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        build_model("nope")
    with pytest.raises(ConfigError, match="unknown config key 'rpn.nms'"):
        build_model("mask_rcnn_r18_fpn", rpn={"nms": 0.5})


def _toy_sample(size=128):
    image = torch.full((3, size, size), 0.2)
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[30:90, 40:100] = 1
    image[:, 30:90, 40:100] = 0.9
    target = {"boxes": torch.tensor([[40.0, 30, 100, 90]]), "labels": torch.tensor([1]), "masks": mask[None]}
    return image, target


def test_train_step_gives_finite_losses_and_gradients_everywhere():
    torch.manual_seed(0)
    model = build_model("mask_rcnn_r18_fpn", num_classes=3).train()
    image, target = _toy_sample()
    losses = model([image, image.flip(-1)], [target, target])
    assert set(losses) >= {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_inference_output_contract():
    torch.manual_seed(0)
    model = build_model("mask_rcnn_r18_fpn", num_classes=3, roi_head={"test": {"score_thr": 0.0}}).eval()
    images = [torch.rand(3, 100, 150), torch.rand(3, 90, 60)]
    with torch.no_grad():
        out = model(images)
    for img, det in zip(images, out):
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["masks"].shape == (n, *img.shape[-2:]) and det["masks"].dtype == torch.bool
        assert (det["boxes"][:, 2] <= img.shape[2]).all() and (det["boxes"][:, 3] <= img.shape[1]).all()
        assert (det["labels"] < 3).all()


def test_empty_rois_pool_to_zero_not_nan():
    # a cascade stage can refine a box to zero width (clipped at the image border); RoIAlign must give zeros
    from cascadevision.ops import roi_align

    features = torch.rand(1, 2, 16, 16, requires_grad=True)
    rois = torch.tensor([[0.0, 5, 5, 5, 9], [0.0, 64, 3, 64, 3]])
    out = roi_align(features, rois, 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(features.grad).all()
