"""Small building blocks shared by the backbones and heads."""
from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

GN_GROUPS = 32  # GroupNorm's groups, as MMDetection's GN configs (`dict(type='GN', num_groups=32)`)


def build_norm(kind: str, channels: int) -> tuple[str, nn.Module]:
    """(name, layer) of a norm layer as mmcv's `build_norm_layer` names it: "bn" for BatchNorm (SyncBN too: it is
    plain BatchNorm until `engine.distributed.convert_sync_batchnorm` swaps it under DDP), "gn" for GroupNorm(32)."""
    if kind in ("bn", "syncbn"):
        return "bn", nn.BatchNorm2d(channels)
    if kind == "gn":
        if channels % GN_GROUPS:
            raise ValueError(f"GroupNorm({GN_GROUPS}) needs a channel count divisible by {GN_GROUPS}, got {channels}")
        return "gn", nn.GroupNorm(GN_GROUPS, channels)
    raise ValueError(f"unknown norm '{kind}'; valid: bn, syncbn, gn")


def run_blocks(blocks: nn.Sequential, x, with_cp: bool):
    """`blocks(x)`, or with `with_cp` while training each block under activation checkpointing: its inner
    activations are freed after forward and recomputed in backward (same gradients, less memory). A BatchNorm
    in training mode inside a block updates its running statistics twice then (as MMDetection's with_cp)."""
    if not (with_cp and blocks.training and x.requires_grad):
        return blocks(x)
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


class ConvModule(nn.Module):
    """A conv with an optional norm and ReLU, named like mmcv's ConvModule so checkpoints load
    (`<name>.conv.weight`, `<name>.gn.weight`); with a norm the conv has no bias (mmcv's bias="auto")."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, relu: bool = True,
                 norm: str = "none"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=norm == "none")
        self.norm_name = None
        if norm != "none":
            self.norm_name, layer = build_norm(norm, out_channels)
            self.add_module(self.norm_name, layer)
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return x.relu_() if self.relu else x


class FreezableBackbone(nn.Module):
    """`frozen_stages` (the listed modules get no gradients and stay in eval mode) and `norm_eval` (every
    BatchNorm stays in eval mode while training), shared by the backbones. Subclasses list their frozen
    modules in `_frozen_modules` and set `frozen_stages` and `norm_eval`."""

    frozen_stages: int = -1
    norm_eval: bool = False

    def _frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
