"""EfficientViT: cascaded group attention against a naive loop, window partitioning, BN folding, published
parameter/MAC counts, loading reference checkpoints by name, and the detection backbone."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascadevision.config import BackboneConfig
from cascadevision.errors import CheckpointError, ConfigError
from cascadevision.macs import count_macs
from cascadevision.models.classifier import count_parameters
from cascadevision.models.efficientvit import (
    EFFICIENTVIT_CONFIGS, BN_Linear, CascadedGroupAttention, Conv2d_BN, EfficientViTBackbone, EfficientViTBlock,
    FFN, LocalWindowAttention, PatchMerging, Residual, build_efficientvit, fuse_bn)
from cascadevision.io.pretrained import load_efficientvit_weights

# published: parameters in M (BN unfused, head included) and MACs in M at 224x224 ("FLOPs" in the paper/README)
PUBLISHED_PARAMS_M = {"m0": 2.35, "m1": 2.98, "m2": 4.19, "m3": 6.90, "m4": 8.80, "m5": 12.47}
PUBLISHED_MACS_M = {"m0": 79, "m1": 167, "m2": 201, "m3": 263, "m4": 299, "m5": 522}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics/affine and bias tables, so that no branch is the zero it is initialised to."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, CascadedGroupAttention):
                m.attention_biases.copy_(torch.randn(m.attention_biases.shape, generator=gen))
    return module.eval()


# ----------------------------------------------------------------------------------------------------------
# cascaded group attention against an independent, loop-by-loop implementation


def naive_conv_bn_1x1(x, conv_bn):
    """1x1 conv + BN written out: y[o] = sum_i W[o,i] x[i], then (y - mean) / sqrt(var + eps) * gamma + beta."""
    weight = conv_bn.c.weight[:, :, 0, 0]
    bn = conv_bn.bn
    y = torch.einsum("oi,bihw->bohw", weight, x)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


def naive_depthwise_bn(x, conv_bn):
    """k x k depthwise conv (zero padding k//2) as a sum over kernel offsets, then BN."""
    weight = conv_bn.c.weight[:, 0]  # (C, k, k)
    k = weight.shape[-1]
    pad = k // 2
    xp = F.pad(x, (pad, pad, pad, pad))
    height, width = x.shape[-2:]
    y = torch.zeros_like(x)
    for di in range(k):
        for dj in range(k):
            y = y + weight[None, :, di, dj, None, None] * xp[:, :, di:di + height, dj:dj + width]
    bn = conv_bn.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


def naive_cascaded_group_attention(x, cga, cascade=True):
    """Per head, per query, per key; the bias of a (query, key) pair is table[|dr| * R + |dc|]."""
    batch, channels, height, width = x.shape
    heads, kd, d, table = cga.num_heads, cga.key_dim, channels // cga.num_heads, cga.resolution
    positions = list(itertools.product(range(height), range(width)))
    outputs, previous = [], None
    for h in range(heads):
        head_in = x[:, h * d:(h + 1) * d]
        if previous is not None and cascade:
            head_in = head_in + previous
        qkv = naive_conv_bn_1x1(head_in, cga.qkvs[h])
        q, k, v = qkv[:, :kd], qkv[:, kd:2 * kd], qkv[:, 2 * kd:]
        q = naive_depthwise_bn(q, cga.dws[h])
        out = torch.zeros(batch, d, height, width, dtype=x.dtype)
        for b in range(batch):
            for (r1, c1) in positions:
                logits = torch.stack([
                    (q[b, :, r1, c1] * k[b, :, r2, c2]).sum() * kd ** -0.5
                    + cga.attention_biases[h, abs(r1 - r2) * table + abs(c1 - c2)]
                    for (r2, c2) in positions])
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                out[b, :, r1, c1] = sum(w * v[b, :, r2, c2] for w, (r2, c2) in zip(weights, positions))
        outputs.append(out)
        previous = out
    return naive_conv_bn_1x1(torch.relu(torch.cat(outputs, 1)), cga.proj[1])


@pytest.mark.parametrize("height,width", [(4, 4), (3, 4)])
def test_cascaded_group_attention_matches_naive_loops(height, width):
    torch.manual_seed(0)
    cga = randomize(CascadedGroupAttention(dim=12, key_dim=4, num_heads=3, resolution=4, kernels=(3, 5, 1)))
    cga = cga.double()
    x = torch.randn(2, 12, height, width, dtype=torch.float64)
    with torch.no_grad():
        expected = naive_cascaded_group_attention(x, cga)
        torch.testing.assert_close(cga(x), expected, atol=1e-10, rtol=1e-10)
        # the test can tell: the same loops without the cascade give something else
        assert not torch.allclose(naive_cascaded_group_attention(x, cga, cascade=False), expected, atol=1e-3)


def test_bias_index_follows_the_reference_enumeration():
    """The reference numbers (|dr|, |dc|) pairs in the order it first meets them over all (query, key) pairs."""
    for resolution in (4, 7):
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets, idxs = {}, []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        cga = CascadedGroupAttention(16, 16, 1, resolution, (3,))
        assert torch.equal(cga.attention_bias_idxs, torch.tensor(idxs).view(resolution ** 2, resolution ** 2))
        assert cga.attention_biases.shape == (1, len(offsets))


def test_residual_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    residual = Residual(nn.Conv2d(4, 4, 1), drop_prob=0.5).train()
    x = torch.randn(64, 4, 3, 3)
    with torch.no_grad():
        branch = residual.m(x)
        out = residual(x)
        kept = torch.isclose(out, x + branch / 0.5).flatten(1).all(1)
        dropped = torch.isclose(out, x).flatten(1).all(1)
        assert bool((kept ^ dropped).all()) and 10 < int(kept.sum()) < 54
        torch.testing.assert_close(residual.eval()(x), x + branch)


# ----------------------------------------------------------------------------------------------------------
# window partitioning


def window_attention(window_size=7, dim=16, heads=2):
    torch.manual_seed(1)
    return randomize(LocalWindowAttention(dim, 16, heads, resolution=None, window_size=window_size, kernels=(5, 3)))


def test_windowed_and_whole_map_paths_agree_when_the_map_is_one_window():
    lwa = window_attention()
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(lwa.windowed(x), lwa.attn(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lwa(x), lwa.attn(x), atol=0, rtol=0)


def test_windows_are_attended_independently_and_padding_is_cropped():
    lwa = window_attention()
    x = torch.randn(1, 16, 10, 16)  # padded to 14 x 21: 2 x 3 windows
    padded = F.pad(x, (0, 5, 0, 4))
    with torch.no_grad():
        out = lwa(x)
        assert out.shape == x.shape
        expected = torch.zeros_like(padded)
        for r, c in itertools.product(range(2), range(3)):
            window = (slice(None), slice(None), slice(7 * r, 7 * r + 7), slice(7 * c, 7 * c + 7))
            expected[window] = lwa.attn(padded[window])
        torch.testing.assert_close(out, expected[:, :, :10, :16], atol=1e-6, rtol=1e-6)


def test_small_maps_use_the_matching_part_of_the_table():
    """A 3x5 map (smaller than the 7x7 table) gets the biases of its own offsets; no padding."""
    lwa = window_attention()
    x = torch.randn(1, 16, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(lwa(x), naive_cascaded_group_attention(x.double(), copy.deepcopy(lwa.attn).double())
                                   .float(), atol=1e-5, rtol=1e-5)


def test_classifier_tables_too_small_for_a_larger_input_is_a_clear_error():
    model = build_efficientvit("m0", img_size=128).eval()  # maps 8, 4, 2: stage 2 gets 4x4 tables
    with torch.no_grad(), pytest.raises(ValueError, match="5x5 map .* 4x4"):
        model(torch.randn(1, 3, 160, 160))  # stage 2 map 5x5
    with torch.no_grad():
        assert build_efficientvit("m0", img_size=160).eval()(torch.randn(1, 3, 160, 160)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)  # smaller maps use part of the tables


# ----------------------------------------------------------------------------------------------------------
# BN folding


@pytest.mark.parametrize("make,shape", [
    (lambda: Conv2d_BN(8, 16, 3, 2, 1), (2, 8, 9, 9)),
    (lambda: Conv2d_BN(8, 8, 5, 1, 2, groups=8), (2, 8, 9, 9)),
    (lambda: BN_Linear(8, 5), (3, 8)),
    (lambda: FFN(8, 16), (2, 8, 5, 5)),
    (lambda: PatchMerging(8, 16), (2, 8, 7, 7)),
    (lambda: CascadedGroupAttention(16, 4, 4, 5, (3, 5, 7, 3)), (2, 16, 5, 5)),
    (lambda: LocalWindowAttention(16, 4, 2, None, 7, (5, 3)), (2, 16, 9, 15)),
    (lambda: EfficientViTBlock(16, 4, 2, None, 7, (5, 3)), (2, 16, 9, 15)),
])
def test_bn_folding_keeps_outputs(make, shape):
    torch.manual_seed(0)
    module = randomize(make()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        expected = module(x)
        fused = fuse_bn(copy.deepcopy(module))
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        torch.testing.assert_close(fused(x), expected, atol=1e-10, rtol=1e-10)


def test_whole_network_bn_folding():
    torch.manual_seed(0)
    model = randomize(build_efficientvit("m1"))
    x = torch.randn(2, 3, 128, 128)  # stage 1 padded to 2x2 windows, stages 2-3 use parts of their tables
    with torch.no_grad():
        expected = model(x)
        fused = copy.deepcopy(model).fuse()
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        assert count_parameters(fused) < count_parameters(model)
        torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# counts against the published numbers


@pytest.mark.parametrize("name", list(EFFICIENTVIT_CONFIGS))
def test_parameter_and_mac_counts_match_published(name):
    """The paper's FLOPs are MACs of convs, linears and the two attention matmuls (BN, softmax not counted).
    Counted on the meta device: shapes only, no arithmetic."""
    with torch.device("meta"):
        model = build_efficientvit(name).eval()
        macs = count_macs(model, torch.empty(1, 3, 224, 224))
    assert round(count_parameters(model) / 1e6, 2) == PUBLISHED_PARAMS_M[name]
    assert round(macs / 1e6) == PUBLISHED_MACS_M[name]


# ----------------------------------------------------------------------------------------------------------
# loading reference checkpoints


def test_reference_parameter_names():
    keys = set(build_efficientvit("m1").state_dict())
    for key in ["patch_embed.0.c.weight", "patch_embed.6.bn.running_var",
                "blocks1.0.dw0.m.c.weight", "blocks1.0.ffn0.m.pw1.c.weight", "blocks1.0.ffn1.m.pw2.bn.bias",
                "blocks1.0.mixer.m.attn.qkvs.1.c.weight", "blocks1.0.mixer.m.attn.dws.1.bn.weight",
                "blocks1.0.mixer.m.attn.proj.1.c.weight", "blocks1.0.mixer.m.attn.attention_biases",
                "blocks1.0.mixer.m.attn.attention_bias_idxs",
                "blocks2.0.0.m.c.weight", "blocks2.0.1.m.pw2.c.weight", "blocks2.1.conv1.c.weight",
                "blocks2.1.conv2.bn.weight", "blocks2.1.se.fc1.weight", "blocks2.1.se.fc2.bias",
                "blocks2.1.conv3.c.weight", "blocks2.2.0.m.bn.weight", "blocks2.2.1.m.pw1.c.weight",
                "blocks2.4.mixer.m.attn.qkvs.2.c.weight", "blocks3.5.ffn1.m.pw2.c.weight",
                "head.bn.running_mean", "head.l.weight", "head.l.bias"]:
        assert key in keys, key
    assert "blocks2.5.dw0.m.c.weight" not in keys and "blocks1.0.mixer.m.attn.qkvs.2.c.weight" not in keys


def test_reference_checkpoint_round_trip(tmp_path):
    source = randomize(build_efficientvit("m0"), seed=3)
    state = source.state_dict()
    state["blocks2.1.se.fc1.weight"] = state["blocks2.1.se.fc1.weight"][:, :, 0, 0]  # stored 2-D, as the loader allows
    path = tmp_path / "efficientvit_m0.pth"
    torch.save({"model": state, "epoch": 299}, path)
    model = build_efficientvit("m0")
    report = load_efficientvit_weights(model, path)
    assert report == {"missing": [], "unexpected": [], "reinitialised": [], "resized": []}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), atol=0, rtol=0)
    ten_classes = build_efficientvit("m0", num_classes=10)
    assert sorted(load_efficientvit_weights(ten_classes, path)["reinitialised"]) == ["head.l.bias", "head.l.weight"]
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_efficientvit_weights(build_efficientvit("m0", num_classes=10), path, strict_classes=True)
    with pytest.raises(CheckpointError, match="6 missing .*head_dist"):
        load_efficientvit_weights(build_efficientvit("m0", distillation=True), path)  # no head_dist in the file


def test_timm_port_names_load(tmp_path):
    """timm's efficientvit_m* renames stages/blocks and c/l; written out here from timm's layout."""
    source = randomize(build_efficientvit("m2"), seed=4)
    depths = source.cfg.depths
    timm_state = {}
    for key, value in source.state_dict().items():
        parts = key.split(".")
        if parts[-2] == "c":
            parts[-2] = "conv"
        if parts[:2] == ["head", "l"]:
            parts[1] = "linear"
        if parts[0] == "patch_embed":
            parts[1] = f"conv{int(parts[1]) // 2 + 1}"
        elif parts[0].startswith("blocks"):
            stage, j = int(parts[0][6:]) - 1, int(parts[1])
            if stage > 0 and j < 3:
                parts = [f"stages.{stage}.downsample", ("res1", "patchmerge", "res2")[j]] + parts[2:]
            else:
                parts = [f"stages.{stage}.blocks", str(j - (3 if stage > 0 else 0))] + parts[2:]
            assert stage < len(depths)
        timm_state[".".join(parts)] = value
    assert "stages.1.downsample.patchmerge.conv1.conv.weight" in timm_state
    path = tmp_path / "timm.pth"
    torch.save(timm_state, path)
    model = build_efficientvit("m2")
    load_efficientvit_weights(model, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# detection backbone


def test_backbone_levels_strides_and_channels():
    m4 = EfficientViTBackbone(BackboneConfig(type="efficientvit_m4", out_indices=(0, 1, 2, 3, 4)))
    assert m4.out_channels == [32, 64, 128, 256, 384] and m4.strides == [4, 8, 16, 32, 64]
    backbone = EfficientViTBackbone(BackboneConfig(type="efficientvit_m0", out_indices=(0, 1, 2, 3, 4))).eval()
    assert backbone.out_channels == [16, 32, 64, 128, 192]
    for height, width in [(64, 96), (150, 230)]:  # stage-1 maps 4x6 (one window) and 10x15 (padded windows)
        with torch.no_grad():
            outs = backbone(torch.randn(1, 3, height, width))
        assert [o.shape[1] for o in outs] == backbone.out_channels
        size = (height, width)
        for out, stride in zip(outs, backbone.strides):
            size = tuple((s - 1) // 2 + 1 for s in size) if stride > 4 else tuple((s - 1) // 4 + 1 for s in size)
            assert tuple(out.shape[-2:]) == size
    three = EfficientViTBackbone(BackboneConfig(type="efficientvit_m0", out_indices=(2, 3, 4)))
    assert three.out_channels == [64, 128, 192]
    with pytest.raises(ConfigError, match="out_indices"):
        EfficientViTBackbone(BackboneConfig(type="efficientvit_m0", out_indices=(0, 5)))
    with pytest.raises(ConfigError, match="valid: efficientvit_m0"):
        EfficientViTBackbone(BackboneConfig(type="efficientvit_m9"))


def test_backbone_freezing_and_norm_eval():
    backbone = EfficientViTBackbone(BackboneConfig(type="efficientvit_m0", frozen_stages=1, norm_eval=True))
    backbone.train()
    assert not any(p.requires_grad for p in backbone.patch_embed.parameters())
    assert not any(p.requires_grad for p in backbone.blocks1.parameters())
    assert all(p.requires_grad for p in backbone.blocks2.parameters())
    assert not any(m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    trainable = EfficientViTBackbone(BackboneConfig(type="efficientvit_m0", frozen_stages=-1, norm_eval=False)).train()
    assert all(m.training for m in trainable.modules() if isinstance(m, nn.BatchNorm2d))
    outs = trainable(torch.randn(2, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    assert trainable.patch_embed[0].c.weight.grad is not None


def test_classifier_weights_load_into_backbone_with_resized_tables(tmp_path):
    classifier = randomize(build_efficientvit("m0"), seed=5)
    path = tmp_path / "m0.pth"
    torch.save({"model": classifier.state_dict()}, path)
    backbone = EfficientViTBackbone(BackboneConfig(type="efficientvit_m0"))
    report = load_efficientvit_weights(backbone, path)
    assert report["resized"] == [f"blocks3.{j}.mixer.m.attn.attention_biases" for j in range(3, 6)]
    assert backbone.blocks3[3].mixer.m.attn.attention_biases.shape == (4, 49)
    x = torch.randn(1, 3, 112, 112)
    backbone.eval()
    with torch.no_grad():  # stages 1-2 have the same tables: identical features
        torch.testing.assert_close(backbone(x)[3], classifier.blocks2(classifier.blocks1(classifier.patch_embed(x))))
