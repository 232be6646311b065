"""HAT-Net (Liu et al., "Vision Transformers with Hierarchical Attention", MIR 2024; arXiv 2106.03180).

Its token mixer, hierarchical multi-head self-attention (H-MHSA), first attends locally inside non-overlapping
G x G grids, then lets every token attend globally to the map average-pooled by r. Module names follow the
reference (yun-liu/HAT-Net, `HAT_Net.py`) so its checkpoints load by name:

    patch_embed.{0,1,3}                   3x3 s2 conv (3 -> 16), GroupNorm, SiLU, 3x3 s2 conv (16 -> C1): stride 4
    blocks.{stage}.{j}.attn.*             H-MHSA (norm, qkv, proj, proj_norm; grid_norm, ds_norm, q, kv if G > 1)
    blocks.{stage}.{j}.conv.conv{1,2,3}   the inverted-residual FFN
    ds{2,3,4}.{conv,norm}                 3x3 s2 conv + GroupNorm between stages
    classifier.1                          Linear (after Dropout 0.2)

All norms are GroupNorm(1, C, eps=1e-6), i.e. a LayerNorm over (C, H, W).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .classifier import DropPath


@dataclass
class HATNetConfig:
    """One HAT-Net variant; the shared settings are the paper's (grids 8/7/7/1, pooling 8/4/2/1, IR expansions)."""
    dims: tuple[int, int, int, int] = (48, 96, 240, 384)  # stage widths (strides 4, 8, 16, 32)
    head_dim: int = 48  # heads = dim / head_dim
    depths: tuple[int, int, int, int] = (2, 2, 6, 3)
    kernel_sizes: tuple[int, int, int, int] = (3, 3, 3, 3)  # depthwise kernel of the inverted residual
    grid_sizes: tuple[int, int, int, int] = (8, 7, 7, 1)  # G: local attention in G x G grids (1: global only)
    ds_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)  # r: keys/values of the global step pooled r x r
    expansions: tuple[int, int, int, int] = (8, 8, 4, 4)  # inverted-residual expansion
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, increasing linearly over all blocks


HATNET_CONFIGS = {
    "tiny": HATNetConfig((48, 96, 240, 384), 48, (2, 2, 6, 3)),
    "small": HATNetConfig((64, 128, 320, 512), 64, (2, 3, 8, 3)),
    "medium": HATNetConfig((64, 128, 320, 512), 64, (3, 6, 18, 3), kernel_sizes=(5, 3, 5, 3)),
    "large": HATNetConfig((64, 128, 320, 640), 64, (3, 8, 27, 3)),
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, channels, eps=1e-6)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Softmax attention; q (..., Nq, d), k and v (..., Nk, d) -> (..., Nq, d)."""
    attn = (q * scale) @ k.transpose(-2, -1)  # (..., Nq, Nk)
    return attn.softmax(dim=-1) @ v


class HMHSA(nn.Module):
    """Hierarchical multi-head self-attention on a (B, C, H, W) map.

    1. q, k, v = 1x1 conv(GN(x)); with G > 1, each head attends within G x G grids:  x_g = GN(x + local)
    2. global step: q from x_g, k and v from GN(AvgPool_r(x_g)); each token attends to the (H/r)(W/r) pooled ones
    3. out = Dropout(1x1 proj(global + x_g)).  With G = 1 it is plain global MHSA on the qkv of step 1.
    H and W must be multiples of G (the reference does not pad); average pooling drops any remainder of r.
    """

    def __init__(self, dim: int, head_dim: int, grid_size: int = 1, ds_ratio: int = 1, drop: float = 0.0):
        super().__init__()
        if dim % head_dim:
            raise ConfigError(f"HMHSA: dim {dim} is not divisible by head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.grid_size = grid_size
        self.ds_ratio = ds_ratio
        self.norm = group_norm(dim)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_norm = group_norm(dim)  # unused in forward, as in the reference (its parameters still count)
        self.drop = nn.Dropout2d(drop)
        if grid_size > 1:
            self.grid_norm = group_norm(dim)
            self.avg_pool = nn.AvgPool2d(ds_ratio, stride=ds_ratio)
            self.ds_norm = group_norm(dim)
            self.q = nn.Conv2d(dim, dim, 1)
            self.kv = nn.Conv2d(dim, 2 * dim, 1)

    def _heads(self, x: Tensor, parts: int) -> Tensor:
        """(B, parts*C, H, W) -> (parts, B, heads, H*W, head_dim)."""
        batch = x.shape[0]
        x = x.reshape(batch, parts, self.num_heads, self.head_dim, -1)
        return x.permute(1, 0, 2, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        if self.grid_size == 1:
            q, k, v = self._heads(qkv, 3)
            out = _attend(q, k, v, self.scale)  # (B, heads, N, hd)
            return self.drop(self.proj(out.transpose(-2, -1).reshape(batch, channels, height, width)))
        grid = self.grid_size
        if height % grid or width % grid:
            raise ValueError(f"HMHSA: a {height}x{width} map cannot be cut into {grid}x{grid} grids")
        rows, cols = height // grid, width // grid
        # (3, B, heads, hd, rows, G, cols, G) -> (3, B*heads*rows*cols, G*G tokens, hd)
        qkv = qkv.reshape(batch, 3, self.num_heads, self.head_dim, rows, grid, cols, grid)
        qkv = qkv.permute(1, 0, 2, 4, 6, 5, 7, 3).reshape(3, -1, grid * grid, self.head_dim)
        local = _attend(qkv[0], qkv[1], qkv[2], self.scale)  # (B*heads*rows*cols, G*G, hd)
        local = local.reshape(batch, self.num_heads, rows, cols, grid, grid, self.head_dim)
        local = local.permute(0, 1, 6, 2, 4, 3, 5).reshape(batch, channels, height, width)
        x_grid = self.grid_norm(x + local)  # (B, C, H, W)
        q = self._heads(self.q(x_grid), 1)[0]  # (B, heads, N, hd)
        k, v = self._heads(self.kv(self.ds_norm(self.avg_pool(x_grid))), 2)  # (B, heads, N/r^2, hd) each
        glob = _attend(q, k, v, self.scale).transpose(-2, -1).reshape(batch, channels, height, width)
        return self.drop(self.proj(glob + x_grid))


class InvertedResidual(nn.Module):
    """GN -> 1x1 (C -> eC) -> SiLU -> kxk depthwise -> SiLU -> Dropout -> 1x1 (eC -> C) -> GN -> Dropout."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3, drop: float = 0.0):
        super().__init__()
        self.conv1 = nn.Sequential(group_norm(dim), nn.Conv2d(dim, hidden_dim, 1, bias=False), nn.SiLU(inplace=True))
        self.conv2 = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim, bias=False),
            nn.SiLU(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1, bias=False), group_norm(dim))
        self.drop = nn.Dropout2d(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.conv3(self.drop(self.conv2(self.conv1(x)))))


class HATBlock(nn.Module):
    """x + DropPath(H-MHSA(x)), then x + DropPath(InvertedResidual(x))."""

    def __init__(self, dim: int, head_dim: int, grid_size: int, ds_ratio: int, expansion: int, kernel_size: int,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.attn = HMHSA(dim, head_dim, grid_size, ds_ratio, drop)
        self.conv = InvertedResidual(dim, expansion * dim, kernel_size, drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.conv(x))


class Downsample(nn.Module):
    """3x3 stride-2 conv (+bias) + GroupNorm between stages."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = group_norm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class HATNet(nn.Module):
    """Stem (/4) -> 4 stages of HAT blocks (/4, /8, /16, /32) -> global average pool -> Dropout 0.2 -> Linear."""

    def __init__(self, cfg: HATNetConfig | None = None, num_classes: int = 1000):
        super().__init__()
        cfg = cfg or HATNetConfig()
        self.cfg = cfg
        dims = cfg.dims
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), group_norm(16), nn.SiLU(inplace=True),
            nn.Conv2d(16, dims[0], 3, stride=2, padding=1))
        num_blocks = sum(cfg.depths)
        drop_paths = [cfg.drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.blocks = nn.ModuleList()
        first = 0
        for stage, depth in enumerate(cfg.depths):
            self.blocks.append(nn.ModuleList(
                HATBlock(dims[stage], cfg.head_dim, cfg.grid_sizes[stage], cfg.ds_ratios[stage], cfg.expansions[stage],
                         cfg.kernel_sizes[stage], cfg.drop_rate, drop_paths[first + j]) for j in range(depth)))
            first += depth
        self.ds2 = Downsample(dims[0], dims[1])
        self.ds3 = Downsample(dims[1], dims[2])
        self.ds4 = Downsample(dims[2], dims[3])
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(dims[3], num_classes))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, C1, H/4, W/4)
        for stage, downsample in enumerate((None, self.ds2, self.ds3, self.ds4)):
            if downsample is not None:
                x = downsample(x)
            for block in self.blocks[stage]:
                x = block(x)
        return x  # (B, C4, H/32, W/32)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1))  # (B, num_classes)


def build_hatnet(name: str, num_classes: int = 1000, **overrides) -> HATNet:
    """`build_hatnet("tiny")` (also "hat_net_tiny", "HAT-Net-Tiny"); `overrides` replace HATNetConfig fields."""
    key = name.lower().replace("-", "_").removeprefix("hat_net_").removeprefix("hatnet_")
    if key not in HATNET_CONFIGS:
        raise ConfigError(f"unknown HAT-Net variant '{name}'; valid: {', '.join(HATNET_CONFIGS)}")
    return HATNet(dataclasses.replace(HATNET_CONFIGS[key], **overrides), num_classes)


def __getattr__(name: str):
    # `load_hatnet_weights` moved to `cascadevision.io.pretrained` (weights I/O sits on the floor above the
    # models). Lazy on purpose, to keep the old name importable; exempt (by name) in tests/test_layering.py.
    if name == "load_hatnet_weights":
        warnings.warn("cascadevision.models.hatnet.load_hatnet_weights moved to "
                      "cascadevision.io.pretrained.load_hatnet_weights", DeprecationWarning, stacklevel=2)
        from ..io import pretrained
        return pretrained.load_hatnet_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
