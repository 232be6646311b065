"""CASCADE decoder (Rahman & Marculescu, WACV 2023), its additive variant from MERIT (MIDL 2023), a plain
FPN-style decoder as a baseline, the `Segmenter` that puts a backbone, a decoder and per-stage heads together,
and the losses: per-head CE + Dice (CASCADE) and MUTATION (MERIT, every non-empty subset of the stage outputs).

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

import math
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


# ----------------------------------------------------------------------------------------------------------
# losses (pure functions)


def cross_entropy_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean pixel cross-entropy over the pixels whose label is not `ignore_index` (0 when there are none)."""
    valid = (labels != ignore_index).sum()
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / valid.clamp_min(1)


def dice_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss of softmax(logits), per class over the whole batch, averaged over every class
    (background included), in the reference's form: 1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s).

    logits: (B, K, H, W); labels: (B, H, W) int64. Ignored pixels count in none of the sums.
    """
    num_classes = logits.shape[1]
    valid = (labels != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.float().softmax(dim=1) * valid  # (B, K, H, W)
    target = F.one_hot(torch.where(valid[:, 0], labels, 0), num_classes).permute(0, 3, 1, 2) * valid
    target = target.float()
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)  # (K,)
    denominator = (probs * probs).sum(dims) + (target * target).sum(dims)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


def stage_losses(stage_logits: Sequence[Tensor], labels: Tensor, *, stage_weights: Sequence[float],
                 ce_weight: float = 0.5, dice_weight: float = 0.5) -> dict[str, Tensor]:
    """CASCADE's deep supervision: sum_k w_k (ce_weight CE(p_k) + dice_weight Dice(p_k)), one term per head."""
    if len(stage_weights) != len(stage_logits):
        raise ValueError(f"{len(stage_weights)} stage weights for {len(stage_logits)} stage outputs")
    ce = sum(w * cross_entropy_loss(p, labels) for w, p in zip(stage_weights, stage_logits))
    dice = sum(w * dice_loss(p, labels) for w, p in zip(stage_weights, stage_logits))
    return {"loss_ce": ce_weight * ce, "loss_dice": dice_weight * dice}


def mutation_loss(stage_logits: Sequence[Tensor], labels: Tensor, *, ce_weight: float = 0.3,
                  dice_weight: float = 0.7) -> dict[str, Tensor]:
    """MERIT's MUTATION loss: for every non-empty subset S of the n stage outputs (15 for n = 4), the
    prediction P_S is the sum of the subset's raw logit maps, and the loss adds ce_weight CE(P_S) +
    dice_weight Dice(P_S); the subsets are summed without weights. Singletons alone give the per-head loss.
    """
    n = len(stage_logits)
    ce, dice = 0.0, 0.0
    for members in range(1, 2 ** n):  # bit k set: stage k is in the subset
        combined = sum(stage_logits[k] for k in range(n) if members >> k & 1)
        ce = ce + cross_entropy_loss(combined, labels)
        dice = dice + dice_loss(combined, labels)
    return {"loss_ce": ce_weight * ce, "loss_dice": dice_weight * dice}


# ----------------------------------------------------------------------------------------------------------
# the model


class Segmenter(nn.Module):
    """backbone -> decoder -> a 1x1 conv head per decoder output -> logits upsampled to the input size.

    `forward(images, targets)`: images is a list of float (3, H, W) tensors in [0, 1], of any sizes. Each is
    resized to `input.size` (stretched, as the reference does; or fitted inside it and padded when
    `input.keep_ratio`) and normalised. Training: `targets[i]["semantic"]` is an (H, W) label map
    (255 = ignore); returns {'loss_ce', 'loss_dice'}. Inference: one dict per image with `semantic`, an int64
    (H, W) label map at the image's own size: the argmax of the sum of the heads' logits, bilinearly resized.
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module, num_classes: int, *,
                 input: SegInputConfig | None = None, loss: SegLossConfig | None = None,
                 class_names: Sequence[str] = ()):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in decoder.out_channels)
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.input_cfg = input or SegInputConfig()
        self.loss_cfg = loss or SegLossConfig()
        self.stage_weights = tuple(self.loss_cfg.stage_weights) or (1.0,) * len(self.heads)
        if not self.loss_cfg.mutation and len(self.stage_weights) != len(self.heads):
            raise ValueError(f"loss.stage_weights has {len(self.stage_weights)} values but the decoder has "
                             f"{len(self.heads)} outputs")
        # images arrive in [0, 1]; mean and std are on the 0-255 scale
        self.register_buffer("mean", torch.tensor(self.input_cfg.mean).view(3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(self.input_cfg.std).view(3, 1, 1) / 255.0, persistent=False)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        batch, sizes = self.preprocess(images)  # (B, 3, Hp, Wp)
        stage_logits = self.stage_logits(batch)  # [(B, K, Hp, Wp)] deepest first
        if self.training:
            if targets is None:
                raise ValueError("in training mode the model needs targets with a 'semantic' label map")
            labels = self.resize_labels([t["semantic"] for t in targets], sizes, batch.shape[-2:])
            return self.loss(stage_logits, labels)
        logits = torch.stack(stage_logits).sum(dim=0)  # (B, K, Hp, Wp): p1 + p2 + p3 + p4
        return [{"semantic": self._to_image_size(l, size, image.shape[-2:]).argmax(dim=0)}
                for l, size, image in zip(logits, sizes, images)]

    def stage_logits(self, batch: Tensor) -> list[Tensor]:
        """Each head's logits, bilinearly upsampled to the batch's size; deepest stage first."""
        features = self.decoder(self.backbone(batch))
        return [F.interpolate(head(x), size=batch.shape[-2:], mode="bilinear", align_corners=False)
                for head, x in zip(self.heads, features)]

    def loss(self, stage_logits: list[Tensor], labels: Tensor) -> dict[str, Tensor]:
        cfg = self.loss_cfg
        if cfg.mutation:
            return mutation_loss(stage_logits, labels, ce_weight=cfg.ce_weight, dice_weight=cfg.dice_weight)
        return stage_losses(stage_logits, labels, stage_weights=self.stage_weights, ce_weight=cfg.ce_weight,
                            dice_weight=cfg.dice_weight)

    # -- resizing -------------------------------------------------------------------------------------------

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an image of this size is resized to before padding."""
        target_h, target_w = self.input_cfg.size
        if not self.input_cfg.keep_ratio:
            return target_h, target_w
        factor = min(target_h / height, target_w / width)
        return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """(normalised batch (B, 3, Hp, Wp) padded to the size divisor, resized (h, w) of each image)."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("model input must be a non-empty list of (3, H, W) float tensors")
        sizes = [self.network_size(*image.shape[-2:]) for image in images]
        d = self.input_cfg.size_divisor
        pad_h = math.ceil(max(h for h, _ in sizes) / d) * d
        pad_w = math.ceil(max(w for _, w in sizes) / d) * d
        batch = images[0].new_zeros((len(images), 3, pad_h, pad_w))
        for i, (image, (h, w)) in enumerate(zip(images, sizes)):
            if image.shape[-2:] != (h, w):
                image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            batch[i, :, :h, :w] = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        return batch, sizes

    @staticmethod
    def resize_labels(label_maps: list[Tensor], sizes: list[tuple[int, int]], padded: tuple[int, int]) -> Tensor:
        """Label maps resized (nearest) like their images and padded with the ignore label: (B, Hp, Wp) int64."""
        labels = label_maps[0].new_full((len(label_maps), *padded), IGNORE_INDEX, dtype=torch.int64)
        for i, (label_map, (h, w)) in enumerate(zip(label_maps, sizes)):
            resized = F.interpolate(label_map[None, None].float(), size=(h, w), mode="nearest")[0, 0]
            labels[i, :h, :w] = resized.long()
        return labels

    @staticmethod
    def _to_image_size(logits: Tensor, size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        logits = logits[:, :size[0], :size[1]]  # drop the padding
        if tuple(logits.shape[-2:]) == tuple(image_size):
            return logits
        return F.interpolate(logits[None], size=tuple(image_size), mode="bilinear", align_corners=False)[0]


def build_decoder(cfg: DecoderConfig, in_channels: Sequence[int]) -> nn.Module:
    if cfg.type == "cascade":
        return CascadeDecoder(in_channels, cfg.channels, merge="cat")
    if cfg.type == "cascade_add":
        return CascadeDecoder(in_channels, cfg.channels, merge="add")
    if cfg.type == "fpn":
        return FPNDecoder(in_channels, cfg.fpn_channels)
    raise ValueError(f"decoder.type must be 'cascade', 'cascade_add' or 'fpn', got {cfg.type!r}")
