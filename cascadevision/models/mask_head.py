"""The FCN mask head (Mask R-CNN), with HTC's optional residual input for mask information flow."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import roi_align
from .layers import ConvModule


class MaskHead(nn.Module):
    """`num_convs` 3x3 convs, a 2x deconv and a 1x1 conv to one logit map per class (14x14 -> 28x28).

    With `with_conv_res` (HTC stages 2..N) the previous stage's mask feature goes through `conv_res` and is
    added to the input. `forward` returns the logits and the feature handed to the next stage (the output
    of the last 3x3 conv, before upsampling). `norm` puts a norm layer after each 3x3 conv (GN configs).
    """

    def __init__(self, in_channels: int, conv_channels: int, num_convs: int, num_classes: int,
                 with_conv_res: bool = False, norm: str = "none"):
        super().__init__()
        # maps the previous stage's feature (conv_channels) onto this head's input (in_channels)
        self.conv_res = ConvModule(conv_channels, in_channels, 1) if with_conv_res else None
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1, norm=norm)
            for i in range(num_convs)
        )
        last = conv_channels if num_convs else in_channels
        self.upsample = nn.ConvTranspose2d(last, conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def features(self, x: Tensor, res_feat: Tensor | None = None) -> Tensor:
        if res_feat is not None:
            if self.conv_res is None:
                raise ValueError("this mask head was built without conv_res; it cannot take a residual feature")
            x = x + self.conv_res(res_feat)
        for conv in self.convs:
            x = conv(x)
        return x

    def forward(self, x: Tensor, res_feat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        feat = self.features(x, res_feat)
        logits = self.conv_logits(F.relu(self.upsample(feat)))  # (K, num_classes, 2S, 2S)
        return logits.float(), feat  # float32 logits under autocast too (a no-op otherwise)


def mask_targets(gt_masks: Tensor, boxes: Tensor, gt_inds: Tensor, scale: tuple[float, float], size: int) -> Tensor:
    """(P, size, size) binary targets: each matched gt mask cropped to its RoI and resized by RoIAlign.

    gt_masks (G, H, W) live at the dataset's resolution; `boxes` are in the network input's pixels, which the
    model reached by scaling the image by `scale` = (sx, sy), so the boxes are mapped back before cropping.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros((0, size, size))
    used, local = torch.unique(gt_inds, return_inverse=True)
    masks = gt_masks[used].to(boxes.dtype if boxes.dtype in (torch.float32, torch.float64) else torch.float32)
    sx, sy = scale
    rois = torch.stack([local.to(masks.dtype), boxes[:, 0] / sx, boxes[:, 1] / sy, boxes[:, 2] / sx, boxes[:, 3] / sy], 1)
    targets = roi_align(masks[:, None], rois, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (targets[:, 0] >= 0.5).to(masks.dtype)


def mask_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel sigmoid BCE on each RoI's gt-class channel, averaged over RoIs and pixels."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    picked = logits[torch.arange(logits.shape[0], device=logits.device), labels]
    return F.binary_cross_entropy_with_logits(picked.float(), targets.float())
