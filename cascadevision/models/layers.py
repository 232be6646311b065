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
