"""The CASCADE decoder's building blocks and the FPN baseline decoder, value for value against naive
re-implementations written here: convolutions as loops over output positions, batch norm from its formula,
nearest and bilinear resizing from their index arithmetic. Nothing here calls torch.nn.functional."""
import math

import pytest
import torch
from torch import nn

from cascadevision.models.cascade_decoder import (
    AttentionGate, CascadeDecoder, ChannelAttention, ConvBlock, FPNDecoder, SpatialAttention, UpConv)

torch.set_num_threads(1)


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and BN statistic random (BN variances positive), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.dtype.is_floating_point:
                value = torch.rand(tensor.shape, generator=g) + 0.5 if name.endswith("running_var") else \
                    torch.randn(tensor.shape, generator=g) * 0.5
                tensor.copy_(value)
    return module.eval()


def conv(x, layer: nn.Conv2d):
    """Zero-padded 'same' convolution, stride 1, as a loop over output positions."""
    weight, k = layer.weight, layer.weight.shape[-1]
    pad = k // 2
    batch, channels, height, width = x.shape
    padded = torch.zeros(batch, channels, height + 2 * pad, width + 2 * pad, dtype=x.dtype)
    padded[:, :, pad:pad + height, pad:pad + width] = x
    out = torch.zeros(batch, weight.shape[0], height, width, dtype=x.dtype)
    for i in range(height):
        for j in range(width):
            patch = padded[:, :, i:i + k, j:j + k]  # (B, C, k, k)
            out[:, :, i, j] = (patch[:, None] * weight[None]).sum(dim=(2, 3, 4))
    if layer.bias is not None:
        out = out + layer.bias[None, :, None, None]
    return out


def bn(x, layer: nn.BatchNorm2d):
    shape = (1, -1, 1, 1)
    return (x - layer.running_mean.view(shape)) / (layer.running_var.view(shape) + layer.eps) ** 0.5 \
        * layer.weight.view(shape) + layer.bias.view(shape)


def relu(x):
    return x * (x > 0)


def sigmoid(x):
    return 1 / (1 + (-x).exp())


def nearest(x, size):
    """Nearest resize: output row i reads input row floor(i * in / out) (PyTorch's 'nearest')."""
    rows = [math.floor(i * x.shape[-2] / size[0]) for i in range(size[0])]
    cols = [math.floor(j * x.shape[-1] / size[1]) for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def bilinear(x, size):
    """Bilinear resize with align_corners=False: source = (dst + 0.5) * in / out - 0.5, clamped at 0."""
    def taps(out_len, in_len):
        result = []
        for d in range(out_len):
            s = max((d + 0.5) * in_len / out_len - 0.5, 0.0)
            lo = min(int(math.floor(s)), in_len - 1)
            hi = min(lo + 1, in_len - 1)
            result.append((lo, hi, s - lo))
        return result
    out = torch.zeros(*x.shape[:2], *size, dtype=x.dtype)
    for i, (r0, r1, fr) in enumerate(taps(size[0], x.shape[-2])):
        for j, (c0, c1, fc) in enumerate(taps(size[1], x.shape[-1])):
            out[:, :, i, j] = ((1 - fr) * (1 - fc) * x[:, :, r0, c0] + (1 - fr) * fc * x[:, :, r0, c1]
                               + fr * (1 - fc) * x[:, :, r1, c0] + fr * fc * x[:, :, r1, c1])
    return out


def conv_bn_relu(x, seq):
    return relu(bn(conv(x, seq[0]), seq[1]))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


X = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(1))


def test_conv_block_is_two_conv_bn_relu():
    block = randomised(ConvBlock(6, 4))
    with torch.no_grad():
        layers = list(block)
        close(block(X), conv_bn_relu(conv_bn_relu(X, layers[0:3]), layers[3:6]))


@pytest.mark.parametrize("size", [None, (11, 13)])
def test_up_conv_is_nearest_resize_then_conv_bn_relu(size):
    block = randomised(UpConv(6, 4))
    target = size or (10, 14)
    with torch.no_grad():
        close(block(X, size=size), conv_bn_relu(nearest(X, target), block.conv))


def test_attention_gate_weighs_the_skip_by_one_sigmoid_map():
    gate = randomised(AttentionGate(6, 3, 2))
    skip = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(2))
    hidden = relu(bn(conv(X, gate.gate_proj[0]), gate.gate_proj[1]) + bn(conv(skip, gate.skip_proj[0]), gate.skip_proj[1]))
    psi = sigmoid(bn(conv(hidden, gate.psi[0]), gate.psi[1]))  # (2, 1, 5, 7)
    with torch.no_grad():
        close(gate(X, skip), skip * psi)


def test_channel_attention_shares_one_mlp_for_both_pools():
    attention = randomised(ChannelAttention(32))
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(3))
    w1, w2 = attention.mlp[0].weight[:, :, 0, 0], attention.mlp[2].weight[:, :, 0, 0]  # (2, 32), (32, 2)

    def mlp(v):  # (B, 32) -> (B, 32)
        return relu(v @ w1.T) @ w2.T

    avg = x.sum(dim=(2, 3)) / 35
    peak = x.flatten(2).max(dim=2).values
    with torch.no_grad():
        close(attention(x), x * sigmoid(mlp(avg) + mlp(peak))[:, :, None, None])


def test_spatial_attention_is_a_7x7_conv_over_channel_mean_and_max():
    attention = randomised(SpatialAttention())
    pooled = torch.stack([X.sum(dim=1) / 6, X.max(dim=1).values], dim=1)
    with torch.no_grad():
        close(attention(X), X * sigmoid(conv(pooled, attention.conv)))


def features(channels=(8, 16, 32, 64), size=32):
    g = torch.Generator().manual_seed(4)
    return [torch.randn(1, c, size // s, size // s, generator=g) for c, s in zip(channels, (4, 8, 16, 32))]


def test_fpn_decoder_top_down_then_sum_at_stride_4():
    decoder = randomised(FPNDecoder([8, 16, 32, 64], channels=6))
    feats = features()
    laterals = [conv_bn_relu(f, lateral) for f, lateral in zip(feats, decoder.lateral)]
    for i in (3, 2, 1):
        laterals[i - 1] = laterals[i - 1] + nearest(laterals[i], laterals[i - 1].shape[-2:])
    size = laterals[0].shape[-2:]
    smoothed = [conv_bn_relu(x, smooth) for x, smooth in zip(laterals, decoder.smooth)]
    fused = smoothed[0] + sum(bilinear(x, size) for x in smoothed[1:])
    fuse = list(decoder.fuse)
    expected = conv_bn_relu(conv_bn_relu(fused, fuse[0:3]), fuse[3:6])
    with torch.no_grad():
        (out,) = decoder(feats)
    assert decoder.out_channels == [6]
    close(out, expected)


def test_cascade_decoder_projects_skips_of_other_widths_by_a_1x1_conv_bn_relu():
    """The first upsampling stage's lateral maps the C4 skip's 32 channels to that stage's width (24)."""
    decoder = randomised(CascadeDecoder([8, 16, 32, 64], channels=(40, 24, 16, 12), merge="add"))
    feats = features()
    stage = decoder.stages[0]
    with torch.no_grad():
        projected = stage.lateral(feats[2])
        outputs = decoder(feats)
    close(projected, conv_bn_relu(feats[2], stage.lateral))
    assert [o.shape[1] for o in outputs] == [40, 24, 16, 12]
