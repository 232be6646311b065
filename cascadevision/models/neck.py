"""Feature Pyramid Network: P2..P5 from C2..C5 plus P6 by stride-2 subsampling of P5."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NeckConfig
from .layers import ConvModule


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], cfg: NeckConfig, in_strides: list[int] | None = None):
        super().__init__()
        if cfg.num_outs < len(in_channels):
            raise ValueError(f"neck.num_outs must be >= {len(in_channels)}, got {cfg.num_outs}")
        out = cfg.out_channels
        self.num_outs = cfg.num_outs
        in_strides = list(in_strides or [4 * 2 ** i for i in range(len(in_channels))])
        # each level's stride in input pixels, finest first: the inputs', then x2 per extra (subsampled) level
        self.strides = in_strides + [in_strides[-1] * 2 ** k for k in range(1, cfg.num_outs - len(in_channels) + 1)]
        self.out_channels = out
        self.lateral_convs = nn.ModuleList(ConvModule(c, out, 1, relu=False, norm=cfg.norm) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out, out, 3, padding=1, relu=False, norm=cfg.norm)
                                       for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
