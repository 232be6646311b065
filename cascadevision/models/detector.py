"""The two-stage detector: handed its parts, it wires them in the order the data flows."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig


class TwoStageDetector(nn.Module):
    """transform -> backbone -> neck -> RPN -> RoI head (-> postprocess at test time).

    train mode: `model(images, targets)` returns a dict of named losses.
    eval mode: `model(images)` returns per image a dict with `boxes` (N,4 x1y1x2y2 in that image's pixels),
    `labels` (N, 0-based), `scores` (N) and, for mask models, `masks` (N,H,W bool), or with
    `cfg.roi_head.test.mask_output = "probs"` instead the unpasted `mask_probs` (N,28,28), `image_size` (H, W) and
    `mask_thr`, for `ops.iter_pasted_masks` to paste a chunk at a time.
    """

    def __init__(self, cfg: ModelConfig, transform: nn.Module, backbone: nn.Module, neck: nn.Module,
                 rpn_head: nn.Module, roi_head: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.transform = transform
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head

    @property
    def class_names(self) -> list[str]:
        names = list(self.cfg.class_names)
        return names if len(names) == self.cfg.num_classes else [f"class_{i}" for i in range(self.cfg.num_classes)]

    def extract_features(self, batch: Tensor) -> list[Tensor]:
        # channels-last all the way: the convolutions are as fast, and RoIAlign gathers pixels (C contiguous
        # numbers each) from these maps without copying them first
        return self.neck(self.backbone(batch.contiguous(memory_format=torch.channels_last)))

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("in train mode the model needs targets; call model.eval() for inference")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, image_sizes, scale_factors, targets = self.transform(images, targets if self.training else None)
        features = self.extract_features(batch)
        if self.training:
            proposals, losses = self.rpn_head(features, image_sizes, targets)
            losses.update(self.roi_head.loss(features, proposals, image_sizes, targets, scale_factors))
            return losses
        proposals, _ = self.rpn_head(features, image_sizes)
        detections = self.roi_head.predict(features, proposals, image_sizes)
        test = self.cfg.roi_head.test
        return self.transform.postprocess(detections, scale_factors, original_sizes, test.mask_thr, test.mask_output)
