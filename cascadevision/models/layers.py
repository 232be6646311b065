"""Small building blocks shared by the heads."""
from __future__ import annotations

from torch import nn


class ConvModule(nn.Module):
    """A conv with an optional ReLU, named like mmcv's ConvModule so checkpoints load (`<name>.conv.weight`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = self.conv(x)
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
