"""The segmentation model: a backbone, a decoder (`models.cascade_decoder`) and a 1x1 head per decoder output
(`Segmenter`), its losses (per-head CE + Dice as in CASCADE, and MERIT's MUTATION over every non-empty subset of
the stage outputs), and building one from a `SegModelConfig`. It sits on the models floor: it imports only
configs, ops and models.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from ..errors import ConfigError
from ..models.backbone import ResNet
from ..models.cascade_decoder import IGNORE_INDEX, SegInputConfig, SegLossConfig, build_decoder
from ..models.efficientvit import EfficientViTBackbone
from .config import SegModelConfig


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


# ----------------------------------------------------------------------------------------------------------
# building


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """ResNet (`type: resnet`) or EfficientViT (`type: efficientvit_m0` .. `efficientvit_m5`); both return four
    maps at strides 4, 8, 16, 32 and list their widths in `out_channels`."""
    if cfg.type == "resnet":
        return ResNet(cfg)
    if cfg.type.startswith("efficientvit_"):
        return EfficientViTBackbone(cfg)
    raise ConfigError(f"backbone.type must be 'resnet' or 'efficientvit_m0'..'efficientvit_m5', got '{cfg.type}'")


def build_segmenter(cfg: SegModelConfig) -> Segmenter:
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be at least 1, got {cfg.num_classes}")
    if any(s % cfg.input.size_divisor for s in cfg.input.size):
        raise ConfigError(f"model.input.size {list(cfg.input.size)} must be a multiple of "
                          f"model.input.size_divisor ({cfg.input.size_divisor})")
    backbone = build_backbone(cfg.backbone)
    try:
        decoder = build_decoder(cfg.decoder, backbone.out_channels)
        return Segmenter(backbone, decoder, cfg.num_classes, input=cfg.input, loss=cfg.loss,
                         class_names=cfg.class_names)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
