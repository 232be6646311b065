"""CASCADE decoder (Rahman & Marculescu, WACV 2023), its additive variant from MERIT (MIDL 2023), a plain
FPN-style decoder as a baseline, and their configs. The `Segmenter` that puts a backbone, a decoder and
per-stage heads together, and its losses, are in `cascadevision.segmentation.model`.

Data flow of the CASCADE decoder, deepest first (channels c0 > c1 > c2 > c3, strides 32/16/8/4):

    x4 -> 1x1 conv -> CAM ------------------------------------> d4 -> head -> p1
    d4 -> UpConv -> gate(skip x3) -> merge -> CAM ------------> d3 -> head -> p2
    d3 -> UpConv -> gate(skip x2) -> merge -> CAM ------------> d2 -> head -> p3
    d2 -> UpConv -> gate(skip x1) -> merge -> CAM ------------> d1 -> head -> p4

CAM = channel attention, then spatial attention (one module shared by all four stages), then a ConvBlock.
"merge" is concat(gated skip, up) for CASCADE, gated skip + up for CASCADE_Add. At inference the class
scores are softmax(p1 + p2 + p3 + p4): the four logit maps are summed before the softmax.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255


@dataclass
class SegInputConfig:
    """Preprocessing inside the model."""
    size: tuple[int, int] = (224, 224)  # (height, width) the network sees: CASCADE's Synapse recipe (MERIT: 256)
    keep_ratio: bool = False  # False: stretch to `size` (the reference); True: fit inside it and pad
    size_divisor: int = 32
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, on the 0-255 scale (ImageNet)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass
class DecoderConfig:
    type: str = "cascade"  # "cascade" (concatenation, CASCADE), "cascade_add" (additive, MERIT), "fpn" (baseline)
    channels: tuple[int, ...] = ()  # cascade: widths deepest first; () = the backbone's, as in the reference
    fpn_channels: int = 256  # fpn only


@dataclass
class SegLossConfig:
    mutation: bool = False  # MERIT's MUTATION: a loss on each of the 15 non-empty subsets of the stage outputs
    ce_weight: float = 0.5  # CASCADE: 0.5 CE + 0.5 Dice per head; MERIT with MUTATION: 0.3 / 0.7
    dice_weight: float = 0.5
    stage_weights: tuple[float, ...] = ()  # per head, deepest first, without MUTATION; () = all 1 (the reference)


# ----------------------------------------------------------------------------------------------------------
# building blocks


class ConvBlock(nn.Sequential):
    """[3x3 conv (with bias) -> BN -> ReLU] x 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class UpConv(nn.Module):
    """Nearest-neighbour upsampling (x2, or to `size`) -> 3x3 conv (with bias) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                  nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class AttentionGate(nn.Module):
    """Attention U-Net's additive gate: skip * psi, psi = sigmoid(BN(1x1(ReLU(BN(1x1 g) + BN(1x1 skip))))).

    `g` is the upsampled decoder feature, `skip` the encoder feature at the same resolution; psi is one
    channel, so it weighs positions, not channels.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int):
        super().__init__()
        self.gate_proj = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels))
        self.skip_proj = nn.Sequential(nn.Conv2d(skip_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels))
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.BatchNorm2d(1))

    def weights(self, g: Tensor, skip: Tensor) -> Tensor:
        return torch.sigmoid(self.psi(F.relu(self.gate_proj(g) + self.skip_proj(skip))))  # (B, 1, H, W)

    def forward(self, g: Tensor, skip: Tensor) -> Tensor:
        return skip * self.weights(g, skip)


class ChannelAttention(nn.Module):
    """CBAM channel attention: x * sigmoid(MLP(avgpool x) + MLP(maxpool x)), one MLP for both pools.

    The MLP is 1x1 conv c -> c/16 -> c, without biases.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def weights(self, x: Tensor) -> Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + peak)  # (B, C, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: x * sigmoid(7x7 conv([mean over channels; max over channels])), no bias."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def weights(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return torch.sigmoid(self.conv(pooled))  # (B, 1, H, W)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


# ----------------------------------------------------------------------------------------------------------
# decoders


class CascadeStage(nn.Module):
    """One upsampling stage of the decoder: UpConv -> attention gate on the skip -> merge -> CAM."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int, gate_channels: int, merge: str):
        super().__init__()
        self.merge = merge
        self.up = UpConv(in_channels, out_channels)
        # the reference's encoders give skips with the decoder's widths; other backbones get a projection
        self.lateral = (nn.Identity() if skip_channels == out_channels
                        else _conv_bn_relu(skip_channels, out_channels))
        self.gate = AttentionGate(out_channels, out_channels, gate_channels)
        merged = 2 * out_channels if merge == "cat" else out_channels
        self.channel_attention = ChannelAttention(merged)
        self.conv = ConvBlock(merged, out_channels)

    def forward(self, x: Tensor, skip: Tensor, spatial_attention: SpatialAttention) -> Tensor:
        x = self.up(x, size=skip.shape[-2:])  # (B, c, h, w)
        skip = self.gate(x, self.lateral(skip))  # (B, c, h, w)
        x = torch.cat([skip, x], dim=1) if self.merge == "cat" else skip + x
        x = spatial_attention(self.channel_attention(x))
        return self.conv(x)


class CascadeDecoder(nn.Module):
    """The CASCADE decoder over four backbone levels (strides 4, 8, 16, 32).

    in_channels: the backbone's widths, shallowest first (C2..C5), as the backbones return them.
    channels: the decoder's widths, deepest first ([c0, c1, c2, c3]); empty means the backbone's own widths
        reversed, as in the reference (PVTv2-b2: [512, 320, 128, 64]). Skips whose width differs get a
        1x1 conv + BN + ReLU projection.
    merge: "cat" (CASCADE: concatenate gated skip and upsampled feature) or "add" (MERIT's CASCADE_Add).
    last_gate_channels: width inside the last attention gate; default 32 for "cat" (CASCADE) and c3 / 2 for
        "add" (MERIT). The other gates use c2 (stage 3) and c3 (stage 2).

    `forward(features)` takes the four maps shallowest first and returns [d4, d3, d2, d1], deepest first.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int] = (), merge: str = "cat",
                 last_gate_channels: int | None = None):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"the CASCADE decoder needs 4 backbone levels, got {len(in_channels)}")
        channels = list(channels) or list(reversed(in_channels))
        if len(channels) != 4:
            raise ValueError(f"decoder channels must have 4 values (deepest first), got {channels}")
        if merge not in ("cat", "add"):
            raise ValueError(f"merge must be 'cat' or 'add', got {merge!r}")
        if last_gate_channels is None:
            last_gate_channels = 32 if merge == "cat" else max(channels[3] // 2, 1)
        self.merge = merge
        self.out_channels = channels
        skip_channels = list(reversed(in_channels[:3]))  # C4, C3, C2
        gate_channels = [channels[2], channels[3], last_gate_channels]

        self.input_conv = nn.Conv2d(in_channels[3], channels[0], 1)
        self.top_channel_attention = ChannelAttention(channels[0])
        self.top_conv = ConvBlock(channels[0], channels[0])
        self.stages = nn.ModuleList(
            CascadeStage(channels[i], channels[i + 1], skip_channels[i], gate_channels[i], merge) for i in range(3))
        self.spatial_attention = SpatialAttention()  # one module, shared by all four stages

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        *skips, deepest = features
        x = self.input_conv(deepest)
        x = self.top_conv(self.spatial_attention(self.top_channel_attention(x)))  # d4, stride 32
        outputs = [x]
        for stage, skip in zip(self.stages, reversed(skips)):
            x = stage(x, skip, self.spatial_attention)  # d3, d2, d1
            outputs.append(x)
        return outputs


class FPNDecoder(nn.Module):
    """A plain FPN-style decoder, the baseline: lateral 1x1 convs, top-down nearest upsampling and addition,
    a 3x3 conv per level, every level upsampled to stride 4 and summed, then a ConvBlock. One output map,
    so one head and no multi-stage aggregation. `channels` sets its size (about 54 * channels^2 parameters).
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in in_channels)
        self.fuse = ConvBlock(channels, channels)
        self.out_channels = [channels]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        laterals = [lateral(f) for lateral, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        size = laterals[0].shape[-2:]
        fused = sum(F.interpolate(smooth(x), size=size, mode="bilinear", align_corners=False) if i else smooth(x)
                    for i, (smooth, x) in enumerate(zip(self.smooth, laterals)))
        return [self.fuse(fused)]


def build_decoder(cfg: DecoderConfig, in_channels: Sequence[int]) -> nn.Module:
    if cfg.type == "cascade":
        return CascadeDecoder(in_channels, cfg.channels, merge="cat")
    if cfg.type == "cascade_add":
        return CascadeDecoder(in_channels, cfg.channels, merge="add")
    if cfg.type == "fpn":
        return FPNDecoder(in_channels, cfg.fpn_channels)
    raise ValueError(f"decoder.type must be 'cascade', 'cascade_add' or 'fpn', got {cfg.type!r}")


# ----------------------------------------------------------------------------------------------------------
# the Segmenter and its losses moved to `cascadevision.segmentation.model`

_MOVED_TO_SEGMENTATION = ("Segmenter", "cross_entropy_loss", "dice_loss", "stage_losses", "mutation_loss")


def __getattr__(name: str):
    # Lazy on purpose, to keep the old names importable from here: the one import of this file from the
    # segmentation package, exempt (by name) in tests/test_layering.py.
    if name in _MOVED_TO_SEGMENTATION:
        warnings.warn(f"cascadevision.models.cascade_decoder.{name} moved to cascadevision.segmentation.model.{name}",
                      DeprecationWarning, stacklevel=2)
        from ..segmentation import model
        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
