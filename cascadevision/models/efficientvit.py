"""EfficientViT M0-M5 (Liu et al., CVPR 2023): a small vision transformer built on cascaded group attention.

Everything runs on NCHW tensors; every "linear" layer is a 1x1 convolution followed by BatchNorm (`Conv2d_BN`),
which `fuse_bn` folds into one convolution for inference. Module names follow the reference implementation
(microsoft/Cream, `EfficientViT/classification/model/efficientvit.py`), so its released checkpoints load by name:

    patch_embed.{0,2,4,6}.{c,bn}          stem: four 3x3 stride-2 Conv2d_BN with ReLUs between (stride 16)
    blocks1.{j}                           stage 1: EfficientViTBlock x depths[0]
    blocks{2,3}.0.{0,1}.m                 DW + FFN at the previous stage's width
    blocks{2,3}.1                         PatchMerging (stride 2)
    blocks{2,3}.2.{0,1}.m                 DW + FFN at the new width
    blocks{2,3}.{3,4,...}                 the stage's EfficientViTBlocks
    head.{bn,l}                           BatchNorm1d + Linear

`cascadevision.io.pretrained.load_efficientvit_weights` also reads the timm port's names (`stages.*`, `.conv.`/`.linear.`) and maps them back.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from ..errors import ConfigError
from .classifier import drop_path
from .layers import FreezableBackbone, run_blocks


@dataclass
class EfficientViTConfig:
    """One EfficientViT variant. Defaults are M0; every released variant keeps key_dim 16 and 7x7 windows."""
    embed_dims: tuple[int, int, int] = (64, 128, 192)  # channels of stages 1..3 (strides 16, 32, 64)
    depths: tuple[int, int, int] = (1, 2, 3)  # EfficientViTBlocks per stage
    num_heads: tuple[int, int, int] = (4, 4, 4)  # value dim per head = embed_dim / num_heads
    kernels: tuple[int, ...] = (5, 5, 5, 5)  # query depthwise kernel of head i (the same list in every stage)
    key_dim: int = 16  # query/key dim per head
    window_size: int = 7
    # sizes the bias tables: a stage whose map is smaller than a window gets a map-sized table (4x4 in stage 3 at
    # 224); None gives every stage window-sized tables, so the model runs on any input size (detection)
    img_size: int | None = 224
    ffn_ratio: int = 2
    drop_path: float = 0.0  # stochastic depth of every residual branch; the released models use 0
    distillation: bool = False  # DeiT-style second head `head_dist` (the released checkpoints have none)


EFFICIENTVIT_CONFIGS = {
    "m0": EfficientViTConfig((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "m1": EfficientViTConfig((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "m2": EfficientViTConfig((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "m3": EfficientViTConfig((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "m4": EfficientViTConfig((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "m5": EfficientViTConfig((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}


# ----------------------------------------------------------------------------------------------------------
# building blocks


class Conv2d_BN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, named `c` and `bn` as in the reference; `fuse()` folds the BN into the conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                       bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


class BN_Linear(nn.Sequential):
    """BatchNorm1d + Linear (the classifier head), named `bn` and `l`; `fuse()` folds the BN into the linear layer."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(in_features))
        self.add_module("l", nn.Linear(in_features, out_features))
        nn.init.trunc_normal_(self.l.weight, std=std)
        nn.init.zeros_(self.l.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, linear = self.bn, self.l
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (in,)
        shift = bn.bias - bn.running_mean * scale  # (in,)
        fused = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                          dtype=linear.weight.dtype)
        fused.weight.copy_(linear.weight * scale[None, :])
        fused.bias.copy_(linear.weight @ shift + linear.bias)
        return fused


def fuse_bn(model: nn.Module) -> nn.Module:
    """Fold every Conv2d_BN / BN_Linear of `model` into a plain Conv2d / Linear, in place; returns `model` in eval
    mode (or the new layer when `model` is itself a Conv2d_BN / BN_Linear). Outputs are unchanged: BatchNorm at
    inference is an affine map. Deep-copy first to keep the original."""
    model.eval()
    if isinstance(model, (Conv2d_BN, BN_Linear)):
        return model.fuse()
    _fuse_children(model)
    return model


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, (Conv2d_BN, BN_Linear)):
            setattr(module, name, child.fuse())
        else:
            _fuse_children(child)


class Residual(nn.Module):
    """x + m(x), with optional stochastic depth on the branch."""

    def __init__(self, m: nn.Module, drop_prob: float = 0.0):
        super().__init__()
        self.m = m
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return x + drop_path(self.m(x), self.drop_prob, self.training)


class FFN(nn.Module):
    """1x1 expand -> ReLU -> 1x1 project; the projection's BN starts at zero so the residual starts as identity."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.pw1 = Conv2d_BN(dim, hidden_dim)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(hidden_dim, dim, bn_weight_init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.act(self.pw1(x)))


def depthwise_conv_bn(dim: int, bn_weight_init: float = 0.0) -> Conv2d_BN:
    """The 3x3 depthwise "token interaction" layer (DW) placed before every FFN."""
    return Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=bn_weight_init)


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite (SEModule): global mean -> 1x1 (+bias) -> ReLU -> 1x1 (+bias) -> sigmoid gate."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, rd_divisor: int = 8):
        super().__init__()
        rd_channels = max(rd_divisor, int(channels * rd_ratio + rd_divisor / 2) // rd_divisor * rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * gate.sigmoid()


class PatchMerging(nn.Module):
    """Stride-2 downsampling: 1x1 (C -> 4C) -> ReLU -> 3x3 s2 depthwise -> ReLU -> SE -> 1x1 (4C -> C_out)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden_dim = 4 * dim
        self.conv1 = Conv2d_BN(dim, hidden_dim)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hidden_dim, hidden_dim, 3, 2, 1, groups=hidden_dim)
        self.se = SqueezeExcite(hidden_dim, 0.25)
        self.conv3 = Conv2d_BN(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


def relative_offset_index(height: int, width: int, table_size: int) -> Tensor:
    """(N, N) index of the bias for query i and key j of an height x width map, N = height*width: the table holds
    one entry per (|row offset|, |column offset|) pair of a table_size x table_size map, at |dr|*table_size + |dc|
    (the order in which the reference enumerates them)."""
    # row and column of every token, row-major (broadcasts rather than repeat_interleave, which exports badly)
    rows = torch.arange(height)[:, None].expand(height, width).reshape(-1)  # (N,)
    cols = torch.arange(width)[None, :].expand(height, width).reshape(-1)  # (N,)
    d_row = (rows[:, None] - rows[None, :]).abs()
    d_col = (cols[:, None] - cols[None, :]).abs()
    return d_row * table_size + d_col


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over all tokens of a map of at most resolution x resolution.

    The input's channels are cut into `num_heads` equal splits. Head i sees split i plus the output of head i-1
    (the cascade), projects it to q, k (key_dim each) and v (dim / num_heads, so it can be added to the next
    split), passes q alone through a depthwise conv with its own kernel, and attends with scale key_dim^-0.5 plus
    its own relative-position bias table. The heads' outputs are concatenated, ReLU'd and projected back to dim.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, kernels: tuple[int, ...]):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CascadedGroupAttention: dim {dim} is not divisible by num_heads {num_heads}")
        if len(kernels) < num_heads:
            raise ValueError(f"CascadedGroupAttention: {num_heads} heads need {num_heads} kernels, got {kernels}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = dim // num_heads  # equals the split width: the cascade adds head i-1's output to split i
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.qkvs = nn.ModuleList(Conv2d_BN(dim // num_heads, 2 * key_dim + self.value_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(Conv2d_BN(key_dim, key_dim, k, 1, k // 2, groups=key_dim) for k in kernels[:num_heads])
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.value_dim * num_heads, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", relative_offset_index(resolution, resolution, resolution))
        self._index_cache: dict[tuple, Tensor] = {}

    def _bias_index(self, height: int, width: int) -> Tensor:
        """(N, N) table index for an height x width map (the stored buffer when the map is resolution^2)."""
        if height == width == self.resolution:
            return self.attention_bias_idxs
        if height > self.resolution or width > self.resolution:
            raise ValueError(f"CascadedGroupAttention: a {height}x{width} map needs a bias table of at least that "
                             f"size, this one is {self.resolution}x{self.resolution}")
        if torch.compiler.is_compiling():  # symbolic sizes (torch.export / compile) are no dictionary keys
            return relative_offset_index(height, width, self.resolution).to(self.attention_bias_idxs.device)
        device = self.attention_bias_idxs.device
        key = (height, width, device)
        if key not in self._index_cache:
            self._index_cache[key] = relative_offset_index(height, width, self.resolution).to(device)
        return self._index_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        biases = self.attention_biases[:, self._bias_index(height, width)]  # (heads, N, N)
        splits = x.chunk(self.num_heads, dim=1)  # heads x (B, C/heads, H, W)
        head_outputs = []
        for i in range(self.num_heads):
            head_input = splits[i] if i == 0 else head_outputs[-1] + splits[i]  # the cascade
            q, k, v = self.qkvs[i](head_input).split([self.key_dim, self.key_dim, self.value_dim], dim=1)
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, kd, N), (B, kd, N), (B, d, N)
            attn = (q.transpose(1, 2) @ k) * self.scale + biases[i]  # (B, N queries, N keys)
            attn = attn.softmax(dim=-1)
            head_outputs.append((v @ attn.transpose(1, 2)).view(batch, self.value_dim, height, width))
        return self.proj(torch.cat(head_outputs, dim=1))  # (B, C, H, W)


class LocalWindowAttention(nn.Module):
    """CascadedGroupAttention inside non-overlapping window x window windows (no shift, no padding mask).

    A map no larger than one window is attended as a whole. Otherwise it is zero-padded at the bottom/right to
    a multiple of the window, cut into windows (batched), attended, merged and cropped back, as the reference does.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int | None, window_size: int = 7,
                 kernels: tuple[int, ...] = (5, 5, 5, 5)):
        super().__init__()
        self.window_size = window_size
        table = window_size if resolution is None else min(window_size, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, table, kernels)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height <= self.window_size and width <= self.window_size:
            return self.attn(x)
        return self.windowed(x)

    def windowed(self, x: Tensor) -> Tensor:
        """Attention within windows (also callable on maps that fit one window, for testing)."""
        window = self.window_size
        if self.attn.resolution < window:
            raise ValueError(
                f"LocalWindowAttention: the bias tables are {self.attn.resolution}x{self.attn.resolution} (the model "
                f"was built for a smaller img_size), too small for {window}x{window} windows on a "
                f"{x.shape[-2]}x{x.shape[-1]} map; build with img_size=None or the input size you use")
        batch, channels, height, width = x.shape
        pad_bottom, pad_right = -height % window, -width % window
        x = F.pad(x, (0, pad_right, 0, pad_bottom))
        rows, cols = (height + pad_bottom) // window, (width + pad_right) // window
        windows = (x.view(batch, channels, rows, window, cols, window).permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch * rows * cols, channels, window, window))  # (B*rows*cols, C, w, w)
        windows = self.attn(windows)
        x = (windows.view(batch, rows, cols, channels, window, window).permute(0, 3, 1, 4, 2, 5)
             .reshape(batch, channels, rows * window, cols * window))
        return x[:, :, :height, :width]


class EfficientViTBlock(nn.Module):
    """The sandwich: Res(DW) -> Res(FFN) -> Res(window attention) -> Res(DW) -> Res(FFN)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int | None, window_size: int,
                 kernels: tuple[int, ...], ffn_ratio: int = 2, drop_path: float = 0.0):
        super().__init__()
        self.dw0 = Residual(depthwise_conv_bn(dim), drop_path)
        self.ffn0 = Residual(FFN(dim, ffn_ratio * dim), drop_path)
        attention = LocalWindowAttention(dim, key_dim, num_heads, resolution, window_size, kernels)
        self.mixer = Residual(attention, drop_path)
        self.dw1 = Residual(depthwise_conv_bn(dim), drop_path)
        self.ffn1 = Residual(FFN(dim, ffn_ratio * dim), drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


# ----------------------------------------------------------------------------------------------------------
# the network


class EfficientViT(nn.Module):
    """The EfficientViT classifier: stem (/16) -> 3 stages (/16, /32, /64) -> global average pool -> BN + Linear."""

    def __init__(self, cfg: EfficientViTConfig | None = None, num_classes: int = 1000):
        super().__init__()
        cfg = cfg or EfficientViTConfig()
        dims = cfg.embed_dims
        for dim, heads in zip(dims, cfg.num_heads):
            if dim % heads:
                raise ConfigError(f"EfficientViT: embed_dim {dim} is not divisible by its {heads} heads")
        self.cfg = cfg
        self.num_classes = num_classes
        self.patch_embed = nn.Sequential(
            Conv2d_BN(3, dims[0] // 8, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(dims[0] // 8, dims[0] // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(dims[0] // 4, dims[0] // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(dims[0] // 2, dims[0], 3, 2, 1))
        resolution = None if cfg.img_size is None else cfg.img_size // 16
        for i, (dim, depth, heads) in enumerate(zip(dims, cfg.depths, cfg.num_heads)):
            layers: list[nn.Module] = []
            if i > 0:  # DW + FFN, PatchMerging, DW + FFN (the reference's subsample DWs keep BN weight 1)
                prev = dims[i - 1]
                layers.append(nn.Sequential(Residual(depthwise_conv_bn(prev, 1.0), cfg.drop_path),
                                            Residual(FFN(prev, cfg.ffn_ratio * prev), cfg.drop_path)))
                layers.append(PatchMerging(prev, dim))
                layers.append(nn.Sequential(Residual(depthwise_conv_bn(dim, 1.0), cfg.drop_path),
                                            Residual(FFN(dim, cfg.ffn_ratio * dim), cfg.drop_path)))
                resolution = None if resolution is None else (resolution - 1) // 2 + 1
            layers += [EfficientViTBlock(dim, cfg.key_dim, heads, resolution, cfg.window_size, cfg.kernels,
                                         cfg.ffn_ratio, cfg.drop_path) for _ in range(depth)]
            self.add_module(f"blocks{i + 1}", nn.Sequential(*layers))
        self.head = BN_Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if cfg.distillation:
            self.head_dist = BN_Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (the relative-position bias tables)."""
        return {name for name, _ in self.named_parameters() if "attention_biases" in name}

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, C1, H/16, W/16)
        return self.blocks3(self.blocks2(self.blocks1(x)))  # (B, C3, H/64, W/64)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        pooled = self.forward_features(x).mean((2, 3))  # (B, C3)
        if not self.cfg.distillation:
            return self.head(pooled)  # (B, num_classes)
        logits, logits_dist = self.head(pooled), self.head_dist(pooled)
        return (logits, logits_dist) if self.training else (logits + logits_dist) / 2

    def fuse(self) -> EfficientViT:
        """Fold all BatchNorms (in place); the model is put in eval mode."""
        return fuse_bn(self)


def _variant(name: str) -> str:
    key = name.lower().removeprefix("efficientvit_").removeprefix("efficientvit-")
    if key not in EFFICIENTVIT_CONFIGS:
        valid = ", ".join(f"efficientvit_{k}" for k in EFFICIENTVIT_CONFIGS)
        raise ConfigError(f"unknown EfficientViT variant '{name}'; valid: {valid}")
    return key


def build_efficientvit(name: str, num_classes: int = 1000, weights: str | Path | None = None,
                       **overrides) -> EfficientViT:
    """`build_efficientvit("m4")` (or "efficientvit_m4"); `overrides` replace EfficientViTConfig fields;
    `weights` is a reference checkpoint (path or URL) to load, or "imagenet" for the released one of this variant
    (see `cascadevision.io.pretrained.load_efficientvit_weights`)."""
    variant = _variant(name)
    model = EfficientViT(dataclasses.replace(EFFICIENTVIT_CONFIGS[variant], **overrides), num_classes)
    if weights:  # deprecated here: `cascadevision.io.pretrained.pretrained_efficientvit(name, weights=...)`
        pretrained = _pretrained()
        pretrained.load_efficientvit_weights(
            model, pretrained.EFFICIENTVIT_WEIGHT_URLS[variant] if weights == "imagenet" else weights)
    return model


# ----------------------------------------------------------------------------------------------------------
# detection backbone


class EfficientViTBackbone(FreezableBackbone, EfficientViT):
    """EfficientViT M0-M5 feeding an FPN: up to five maps, one per level, chosen by `cfg.out_indices`.

        level 0: stride 4,  the stem after its 2nd conv + ReLU   (C1/4 channels)
        level 1: stride 8,  the stem after its 3rd conv + ReLU   (C1/2)
        level 2: stride 16, stage 1                              (C1)
        level 3: stride 32, stage 2                              (C2)
        level 4: stride 64, stage 3                              (C3)

    With out_indices (0, 1, 2, 3, 4) and a 5-output FPN the pyramid has the same strides (4..64) and the same
    levels for RPN (all five) and RoI heads (the first four) as the reference's detectors, whose EfficientViTFPN
    takes levels 2-4 and makes the stride-8 and stride-4 levels by transposed convs; here those two levels come
    from the stem through ordinary FPN laterals instead. out_indices (2, 3, 4) gives the reference's three maps.

    Bias tables are window-sized in every stage (as in the reference's downstream model), so any input size
    works: maps are zero-padded to whole windows. `frozen_stages`: -1 nothing, 0 the stem, k the stem and stages
    1..k. `norm_eval` keeps every BatchNorm in eval mode while training. Classifier checkpoints load with
    `load_efficientvit_weights(backbone, path)` (the head is dropped, 4x4 bias tables are resized to 7x7).
    """

    LEVEL_STRIDES = (4, 8, 16, 32, 64)

    def __init__(self, cfg: BackboneConfig):
        vit_cfg = dataclasses.replace(EFFICIENTVIT_CONFIGS[_variant(cfg.type)], img_size=None)
        super().__init__(vit_cfg, num_classes=0)
        out_indices = tuple(cfg.out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not set(out_indices) <= set(range(5)):
            raise ConfigError(f"backbone.out_indices for {cfg.type} must be increasing levels in 0..4 "
                              f"(strides 4, 8, 16, 32, 64), got {list(out_indices)}")
        if not -1 <= cfg.frozen_stages <= 3:
            raise ConfigError(f"backbone.frozen_stages for {cfg.type} must be in -1..3, got {cfg.frozen_stages}")
        self.out_indices = out_indices
        self.frozen_stages = cfg.frozen_stages
        self.norm_eval = cfg.norm_eval
        self.with_cp = cfg.with_cp  # training: each block of blocks1..3 under activation checkpointing
        dims = vit_cfg.embed_dims
        level_channels = (dims[0] // 4, dims[0] // 2, dims[0], dims[1], dims[2])
        self.out_channels = [level_channels[i] for i in out_indices]
        self.strides = [self.LEVEL_STRIDES[i] for i in out_indices]
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.patch_embed] + [getattr(self, f"blocks{i}") for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: Tensor) -> list[Tensor]:
        levels: list[Tensor] = []
        last = self.out_indices[-1]
        for i, layer in enumerate(self.patch_embed):
            x = layer(x)
            if i in (3, 5):  # after the ReLUs of the stride-4 and stride-8 convs
                levels.append(x)
                if len(levels) > last:
                    break
        else:
            for stage in (self.blocks1, self.blocks2, self.blocks3):
                x = run_blocks(stage, x, self.with_cp)
                levels.append(x)
                if len(levels) > last:
                    break
        return [levels[i] for i in self.out_indices]


# ----------------------------------------------------------------------------------------------------------
# the checkpoint loaders moved to `cascadevision.io.pretrained` (weights I/O sits on the floor above the models)

_MOVED_TO_IO = ("EFFICIENTVIT_WEIGHT_URLS", "load_efficientvit_weights", "timm_to_reference_names")


def _pretrained():
    # The one upward import of this file, lazy on purpose: it keeps the old names importable from here and is
    # exempt (by name) in tests/test_layering.py. New code imports `cascadevision.io.pretrained`.
    from ..io import pretrained
    return pretrained


def __getattr__(name: str):
    if name in _MOVED_TO_IO:
        warnings.warn(f"cascadevision.models.efficientvit.{name} moved to cascadevision.io.pretrained.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(_pretrained(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
