"""CASCADE decoder, its attention modules, the Segmenter, and the CE + Dice / MUTATION losses, checked against
hand-computed values and explicit re-implementations written here."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascadevision.models.cascade_decoder import (
    AttentionGate, CascadeDecoder, ChannelAttention, FPNDecoder, SegInputConfig, SegLossConfig, SpatialAttention)
from cascadevision.segmentation.model import Segmenter, cross_entropy_loss, dice_loss, mutation_loss, stage_losses

torch.set_num_threads(1)


def features(in_channels=(8, 16, 32, 64), size=64, batch=2, seed=0):
    """Backbone-like maps at strides 4, 8, 16, 32 of a size x size input, shallowest first."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size // s, size // s, generator=g) for c, s in zip(in_channels, (4, 8, 16, 32))]


# ----------------------------------------------------------------------------------------------------------
# building blocks




def zero_(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module.eval()  # BatchNorm with its initial statistics (mean 0, var 1): BN(0) = 0


def test_zero_weights_halve_the_input():
    """With every conv zeroed, each attention is sigmoid(0) = 0.5 everywhere."""
    x = torch.randn(2, 32, 5, 7)
    skip = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(zero_(ChannelAttention(32))(x), 0.5 * x)
    torch.testing.assert_close(zero_(SpatialAttention())(x), 0.5 * x)
    torch.testing.assert_close(zero_(AttentionGate(32, 16, 8))(x, skip), 0.5 * skip)


def test_channel_attention_by_hand():
    """hidden = ReLU(mean over channels of the pooled vector); every channel's logit is hidden(avg) + hidden(max)."""
    ca = ChannelAttention(16)  # 16 / 16 = 1 hidden unit
    with torch.no_grad():
        ca.mlp[0].weight.fill_(1 / 16)
        ca.mlp[2].weight.fill_(1.0)
    x = torch.randn(2, 16, 4, 4)
    avg, peak = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))  # (2, 16)
    logit = avg.mean(1).clamp_min(0) + peak.mean(1).clamp_min(0)  # (2,)
    expected = torch.sigmoid(logit)[:, None, None, None].expand(2, 16, 1, 1)
    torch.testing.assert_close(ca.weights(x), expected)


def test_spatial_attention_by_hand():
    """Centre tap 1 on the mean channel and 2 on the max channel: sigmoid(mean_c + 2 max_c) per pixel."""
    sa = SpatialAttention()
    with torch.no_grad():
        sa.conv.weight.zero_()
        sa.conv.weight[0, 0, 3, 3] = 1.0
        sa.conv.weight[0, 1, 3, 3] = 2.0
    x = torch.randn(2, 5, 6, 6)
    expected = torch.sigmoid(x.mean(1, keepdim=True) + 2 * x.amax(1, keepdim=True))
    torch.testing.assert_close(sa(x), x * expected)


def test_attention_gate_by_hand():
    """psi = sigmoid(ReLU(g_0 + x_0)) when the 1x1 convs pick channel 0 of each input (BN at its init, eval)."""
    gate = zero_(AttentionGate(3, 2, 1))
    with torch.no_grad():
        gate.gate_proj[0].weight[0, 0] = 1.0
        gate.skip_proj[0].weight[0, 0] = 1.0
        gate.psi[0].weight.fill_(1.0)
    g, skip = torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)
    bn = 1 / math.sqrt(1 + 1e-5)  # BatchNorm2d in eval with running var 1
    psi = torch.sigmoid(bn * F.relu(bn * (g[:, :1] + skip[:, :1])))
    torch.testing.assert_close(gate(g, skip), skip * psi)


# ----------------------------------------------------------------------------------------------------------
# decoders


@pytest.mark.parametrize("merge", ["cat", "add"])
def test_decoder_stages_go_from_stride_32_to_4(merge):
    decoder = CascadeDecoder([8, 16, 32, 64], merge=merge)
    assert decoder.out_channels == [64, 32, 16, 8]  # the backbone's widths, deepest first
    outputs = decoder(features())
    assert [tuple(o.shape) for o in outputs] == [(2, 64, 2, 2), (2, 32, 4, 4), (2, 16, 8, 8), (2, 8, 16, 16)]
    assert isinstance(decoder.stages[0].lateral, nn.Identity)
    # concatenation feeds 2c channels to the channel attention and the ConvBlock; addition feeds c
    merged = decoder.stages[0].channel_attention.mlp[0].in_channels
    assert merged == (64 if merge == "cat" else 32)




def test_spatial_attention_is_one_module_used_by_all_four_stages():
    decoder = CascadeDecoder([8, 16, 32, 64])
    spatial = [m for m in decoder.modules() if isinstance(m, SpatialAttention)]
    assert spatial == [decoder.spatial_attention]
    assert sum(p.numel() for p in decoder.spatial_attention.parameters()) == 2 * 7 * 7
    inputs = []
    decoder.spatial_attention.register_forward_hook(lambda module, args, out: inputs.append(args[0].shape))
    decoder(features())
    # stage 4 sees c0 channels, stages 3..1 the concatenation (2 c)
    assert inputs == [(2, 64, 2, 2), (2, 64, 4, 4), (2, 32, 8, 8), (2, 16, 16, 16)]


@pytest.mark.parametrize("channels, merge, millions", [
    ((512, 320, 128, 64), "cat", 10.42),  # PVT-CASCADE
    ((768, 512, 256, 64), "cat", 25.58),  # TransCASCADE
    ((768, 384, 192, 96), "add", 18.48),  # MERIT-small CASCADE_Add
    ((512, 320, 128, 64), "add", 9.27),  # EMCAD's count of the CASCADE decoder on PVTv2-B2
])
def test_decoder_parameter_counts_match_the_spec(channels, merge, millions):
    decoder = CascadeDecoder(list(reversed(channels)), merge=merge)
    assert sum(p.numel() for p in decoder.parameters()) / 1e6 == pytest.approx(millions, abs=0.006)




# ----------------------------------------------------------------------------------------------------------
# losses


def test_ce_and_dice_by_hand():
    """Two classes, three pixels; the third is ignored. Softmax of [0, 0] is (1/2, 1/2), of [ln 3, 0] (3/4, 1/4)."""
    logits = torch.tensor([[0.0, math.log(3.0), 5.0], [0.0, 0.0, -5.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    # CE: (-ln 1/2 - ln 1/4) / 2
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    # class 0: p = (1/2, 3/4), t = (1, 0): 1 - 2 * 1/2 / (1/4 + 9/16 + 1)
    # class 1: p = (1/2, 1/4), t = (0, 1): 1 - 2 * 1/4 / (1/4 + 1/16 + 1)
    expected_dice = ((1 - 1 / 1.8125) + (1 - 0.5 / 1.3125)) / 2
    assert dice_loss(logits, labels).item() == pytest.approx(expected_dice, abs=1e-5)
    losses = stage_losses([logits, 2 * logits], labels, stage_weights=[1.0, 0.5], ce_weight=0.5, dice_weight=0.5)
    ce2, dice2 = cross_entropy_loss(2 * logits, labels), dice_loss(2 * logits, labels)
    assert losses["loss_ce"].item() == pytest.approx(0.5 * (1.5 * math.log(2.0) + 0.5 * ce2.item()), abs=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(0.5 * (expected_dice + 0.5 * dice2.item()), abs=1e-5)


def test_losses_with_every_pixel_ignored_are_finite():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 4, 4), 255)
    total = cross_entropy_loss(logits, labels) + dice_loss(logits, labels)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


def reference_ce(logits, labels):
    valid = labels != 255
    log_probs = logits.log_softmax(dim=1).permute(0, 2, 3, 1)[valid]  # (N, K)
    return -log_probs.gather(1, labels[valid][:, None]).mean()


def reference_dice(logits, labels, smooth=1e-5):
    """Per class over the batch, one class at a time, as the reference's DiceLoss loop; ignored pixels dropped."""
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1)[labels != 255]  # (N, K)
    target = labels[labels != 255]
    losses = []
    for k in range(logits.shape[1]):
        p, t = probs[:, k], (target == k).float()
        losses.append(1 - (2 * (p * t).sum() + smooth) / ((p * p).sum() + (t * t).sum() + smooth))
    return sum(losses) / len(losses)


def test_mutation_loss_is_the_sum_over_the_15_subsets():
    g = torch.Generator().manual_seed(1)
    stage_logits = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(4)]  # p1..p4
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[0, :2] = 255
    subsets = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]
    assert len(subsets) == 15
    ce, dice = 0.0, 0.0
    for subset in subsets:
        prediction = sum(stage_logits[k] for k in subset)  # raw logits summed, no softmax before
        ce += reference_ce(prediction, labels)
        dice += reference_dice(prediction, labels)
    losses = mutation_loss(stage_logits, labels)  # MERIT's weights 0.3 CE + 0.7 Dice
    assert losses["loss_ce"].item() == pytest.approx(0.3 * ce.item(), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(0.7 * dice.item(), rel=1e-5)

    # the four singletons alone are the plain per-head loss
    singles = stage_losses(stage_logits, labels, stage_weights=[1, 1, 1, 1], ce_weight=0.3, dice_weight=0.7)
    expected_ce = sum(reference_ce(p, labels) for p in stage_logits)
    assert singles["loss_ce"].item() == pytest.approx(0.3 * expected_ce.item(), rel=1e-5)
    assert losses["loss_ce"].item() > singles["loss_ce"].item()


# ----------------------------------------------------------------------------------------------------------
# the Segmenter


class StubBackbone(nn.Module):
    out_channels = [1, 1, 1, 1]

    def forward(self, x):
        return [x.new_zeros(x.shape[0], 1, x.shape[2] // s, x.shape[3] // s) for s in (4, 8, 16, 32)]


class StubDecoder(nn.Module):
    out_channels = [1, 1, 1, 1]

    def forward(self, features):
        return list(reversed(features))  # deepest first


def test_inference_takes_the_argmax_of_the_summed_logit_maps():
    """Each head outputs a constant: p1 = p3 = (5, 0, 4), p2 = p4 = (0, 5, 4). Every head alone picks class 0 or
    1, so does the mean of their softmaxes, but the summed logits (10, 10, 16) pick class 2."""
    model = Segmenter(StubBackbone(), StubDecoder(), 3, input=SegInputConfig(size=(64, 64)))
    with torch.no_grad():
        for k, head in enumerate(model.heads):
            head.weight.zero_()
            head.bias.copy_(torch.tensor([5.0, 0.0, 4.0] if k % 2 == 0 else [0.0, 5.0, 4.0]))
    model.eval()
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 64)]
    batch, _ = model.preprocess(images)
    stage_logits = model.stage_logits(batch)
    assert len(stage_logits) == 4 and all(p.shape == (2, 3, 64, 64) for p in stage_logits)
    assert all((p.argmax(1) != 2).all() for p in stage_logits)
    assert (torch.stack([p.softmax(1) for p in stage_logits]).mean(0).argmax(1) != 2).all()
    outputs = model(images)
    assert [o["semantic"].shape for o in outputs] == [(50, 70), (64, 64)]
    assert all((o["semantic"] == 2).all() for o in outputs)


def tiny_segmenter(decoder="cat", mutation=False, keep_ratio=False, num_classes=4):
    from cascadevision.config import BackboneConfig
    from cascadevision.models.backbone import ResNet

    backbone = ResNet(BackboneConfig(depth=18, base_channels=8, frozen_stages=-1, norm_eval=False))
    dec = FPNDecoder(backbone.out_channels, 16) if decoder == "fpn" else CascadeDecoder(backbone.out_channels,
                                                                                       merge=decoder)
    loss = SegLossConfig(mutation=mutation, ce_weight=0.3 if mutation else 0.5, dice_weight=0.7 if mutation else 0.5)
    return Segmenter(backbone, dec, num_classes, input=SegInputConfig(size=(64, 64), keep_ratio=keep_ratio),
                     loss=loss)


@pytest.mark.parametrize("decoder, mutation", [("cat", False), ("add", True), ("fpn", False)])
def test_training_step_reaches_every_parameter(decoder, mutation):
    torch.manual_seed(0)
    model = tiny_segmenter(decoder, mutation).train()
    images = [torch.rand(3, 48, 80), torch.rand(3, 64, 64)]
    targets = [{"semantic": torch.randint(0, 4, image.shape[1:], dtype=torch.uint8)} for image in images]
    losses = model(images, targets)
    assert set(losses) == {"loss_ce", "loss_dice"}
    sum(losses.values()).backward()
    # every parameter is in the graph (a tiny channel-attention MLP may start with dead ReLUs, so some are 0)
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    for head in model.heads:  # every head is trained
        assert head.weight.grad.abs().sum() > 0


def test_keep_ratio_pads_labels_with_ignore():
    model = tiny_segmenter(keep_ratio=True)
    images = [torch.rand(3, 40, 80)]
    batch, sizes = model.preprocess(images)
    assert sizes == [(32, 64)] and batch.shape == (1, 3, 32, 64)
    labels = model.resize_labels([torch.ones(40, 80, dtype=torch.uint8)], sizes, (64, 64))
    assert (labels[0, :32] == 1).all() and (labels[0, 32:] == 255).all()
    model.eval()
    assert model(images)[0]["semantic"].shape == (40, 80)
