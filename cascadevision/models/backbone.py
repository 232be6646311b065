"""ResNet (pytorch style: the stride sits on the 3x3 conv). Parameter names equal torchvision's."""
from __future__ import annotations

from torch import Tensor, nn

from ..config import BackboneConfig
from .layers import FreezableBackbone, build_norm, run_blocks

# depth -> (block type, blocks per stage)
ARCH = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class _Block(nn.Module):
    """Norm layers are named as mmcv names them: bn1, bn2, ... (also torchvision's), gn1, gn2, ... for GroupNorm."""

    def __init__(self):
        super().__init__()
        self.norms: list[str] = []  # their names, in order

    def _add_norm(self, kind: str, channels: int) -> None:
        """Register the next norm layer (right after its conv: torchvision's parameter order)."""
        name, layer = build_norm(kind, channels)
        self.norms.append(f"{name}{len(self.norms) + 1}")
        self.add_module(self.norms[-1], layer)

    def norm(self, i: int, x: Tensor) -> Tensor:
        return getattr(self, self.norms[i])(x)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self._add_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self._add_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.norm(0, self.conv1(x)))
        out = self.norm(1, self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self._add_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self._add_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self._add_norm(norm, planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.norm(0, self.conv1(x)))
        out = self.relu(self.norm(1, self.conv2(out)))
        out = self.norm(2, self.conv3(out))
        return self.relu(out + identity)


class ResNet(FreezableBackbone):
    """Returns the outputs of the stages in `out_indices` (C2..C5 by default, strides 4..32).

    `frozen_stages=k` freezes the stem and layer1..k (no gradients, held in eval mode); `norm_eval` keeps every
    BatchNorm in eval mode during training, as detection fine-tuning with small batches needs. `norm` "gn" puts
    GroupNorm(32) everywhere (stem `gn1`, blocks `gn1..3`, `downsample.1`), as MMDetection's GN ResNets; `with_cp`
    checkpoints every block while training.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.depth not in ARCH:
            raise ValueError(f"backbone.depth must be one of {sorted(ARCH)}, got {cfg.depth}")
        if not -1 <= cfg.frozen_stages <= 4:
            raise ValueError(f"backbone.frozen_stages must be in -1..4, got {cfg.frozen_stages}")
        kind, blocks = ARCH[cfg.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.frozen_stages = cfg.frozen_stages
        self.norm_eval = cfg.norm_eval
        self.out_indices = tuple(cfg.out_indices)
        self.with_cp = cfg.with_cp
        width = cfg.base_channels
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.stem_norm, stem_norm = build_norm(cfg.norm, width)
        self.stem_norm += "1"
        self.add_module(self.stem_norm, stem_norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.out_channels = []
        inplanes = width
        for i, num_blocks in enumerate(blocks):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                    build_norm(cfg.norm, planes * block.expansion)[1],
                )
            layers = [block(inplanes, planes, stride, downsample, cfg.norm)]
            inplanes = planes * block.expansion
            layers += [block(inplanes, planes, norm=cfg.norm) for _ in range(1, num_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(inplanes)
        self.out_channels = [self.out_channels[i] for i in self.out_indices]
        self.strides = [4 * 2 ** i for i in self.out_indices]  # C2..C5
        self._init_weights()
        self._freeze_stages()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stem = [self.conv1, getattr(self, self.stem_norm)]
        return stem + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(getattr(self, self.stem_norm)(self.conv1(x))))
        outs = []
        for i in range(4):
            x = run_blocks(getattr(self, f"layer{i + 1}"), x, self.with_cp)
            if i in self.out_indices:
                outs.append(x)
        return outs
