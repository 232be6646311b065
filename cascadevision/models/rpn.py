"""Region Proposal Network: anchors, the shared head, its training loss and proposal generation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RPNConfig
from ..ops import batched_nms, decode_boxes, encode_boxes
from .assign import MaxIoUAssigner, sample


class AnchorGenerator:
    """Anchors per FPN level, flattened in (H, W, A) order; anchor (x, y) is centred at (x*stride, y*stride)."""

    def __init__(self, strides, ratios, scales):
        self.strides = list(strides)
        self.base_anchors = []
        ratios = torch.as_tensor(ratios, dtype=torch.float32)
        scales = torch.as_tensor(scales, dtype=torch.float32)
        for stride in self.strides:
            h_ratios = ratios.sqrt()
            w_ratios = 1 / h_ratios
            ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
            hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
            self.base_anchors.append(torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1))
        self.num_anchors = len(ratios) * len(scales)

    def grid_anchors(self, sizes: list[tuple[int, int]], device) -> list[Tensor]:
        anchors = []
        for (h, w), stride, base in zip(sizes, self.strides, self.base_anchors):
            ys = torch.arange(h, device=device, dtype=torch.float32) * stride
            xs = torch.arange(w, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + base.to(device)[None]).reshape(-1, 4))  # (H*W*A, 4)
        return anchors


def weighted_box_loss(kind: str, pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed L1 or smooth-L1 loss (the caller divides by its averaging factor)."""
    diff = (pred - target).abs()
    if kind == "l1":
        return diff.sum()
    if kind == "smooth_l1":
        return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).sum()
    raise ValueError(f"unknown box loss '{kind}' (use 'l1' or 'smooth_l1')")


class RPNHead(nn.Module):
    def __init__(self, in_channels: int, cfg: RPNConfig):
        super().__init__()
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator(cfg.anchor_strides, cfg.anchor_ratios, cfg.anchor_scales)
        num_anchors = self.anchor_generator.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, cfg.feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(cfg.feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(cfg.feat_channels, num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.assigner = MaxIoUAssigner(cfg.pos_iou, cfg.neg_iou, cfg.min_pos_iou, match_low_quality=True)

    def forward(self, features: list[Tensor], image_sizes: list[tuple[int, int]], targets: list[dict] | None = None):
        """Returns (proposals per image (n_i, 4), losses dict; empty when targets is None)."""
        scores, deltas = [], []
        for x in features:
            x = F.relu(self.rpn_conv(x))
            b = x.shape[0]
            # float32 outputs under autocast too (a no-op otherwise): scores are ranked and thresholded
            scores.append(self.rpn_cls(x).float().permute(0, 2, 3, 1).reshape(b, -1))  # (B, H*W*A)
            deltas.append(self.rpn_reg(x).float().permute(0, 2, 3, 1).reshape(b, -1, 4))  # (B, H*W*A, 4)
        anchors = self.anchor_generator.grid_anchors([f.shape[-2:] for f in features], features[0].device)
        training = targets is not None
        pre_nms = self.cfg.train_pre_nms if training else self.cfg.test_pre_nms
        post_nms = self.cfg.train_post_nms if training else self.cfg.test_post_nms
        with torch.no_grad():
            proposals = [
                self._proposals([s[i].detach() for s in scores], [d[i].detach() for d in deltas], anchors,
                                image_sizes[i], pre_nms, post_nms)
                for i in range(len(image_sizes))
            ]
        losses = self.loss(scores, deltas, anchors, image_sizes, targets) if training else {}
        return proposals, losses

    def _proposals(self, scores, deltas, anchors, image_size, pre_nms, post_nms) -> Tensor:
        """Per level top-k, decode, drop empty boxes, NMS within each level, then global top-k."""
        boxes_all, scores_all, levels = [], [], []
        for level, (s, d, a) in enumerate(zip(scores, deltas, anchors)):
            if s.numel() > pre_nms:
                s, idx = s.topk(pre_nms)
                d, a = d[idx], a[idx]
            else:
                s, idx = s.sort(descending=True)
                d, a = d[idx], a[idx]
            boxes_all.append(decode_boxes(a, d, max_shape=image_size))
            scores_all.append(s.sigmoid())
            levels.append(torch.full_like(s, level, dtype=torch.long))
        boxes, scores_, levels_ = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(levels)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (w > self.cfg.min_box_size) & (h > self.cfg.min_box_size)
        boxes, scores_, levels_ = boxes[keep], scores_[keep], levels_[keep]
        keep = batched_nms(boxes.float(), scores_.float(), levels_, self.cfg.nms_iou)[:post_nms]
        return boxes[keep]

    def loss(self, scores, deltas, anchors, image_sizes, targets) -> dict[str, Tensor]:
        anchors_flat = torch.cat(anchors)  # (A_total, 4)
        scores_flat = torch.cat(scores, dim=1)  # (B, A_total)
        deltas_flat = torch.cat(deltas, dim=1)  # (B, A_total, 4)
        border = self.cfg.allowed_border
        cls_losses, box_losses, num_samples = [], [], 0
        for i, (h, w) in enumerate(image_sizes):
            gt_boxes = targets[i]["boxes"]
            valid = None
            if border >= 0:
                valid = ((anchors_flat[:, 0] >= -border) & (anchors_flat[:, 1] >= -border)
                         & (anchors_flat[:, 2] < w + border) & (anchors_flat[:, 3] < h + border))
            assign = self.assigner.assign(anchors_flat, gt_boxes, torch.zeros_like(targets[i]["labels"]), valid)
            sampled = sample(assign, self.cfg.num_samples, self.cfg.pos_fraction)
            inds = torch.cat([sampled.pos_inds, sampled.neg_inds])
            labels = torch.cat([torch.ones_like(sampled.pos_inds), torch.zeros_like(sampled.neg_inds)]).float()
            cls_losses.append(F.binary_cross_entropy_with_logits(scores_flat[i, inds].float(), labels, reduction="sum"))
            if sampled.pos_inds.numel():
                target = encode_boxes(anchors_flat[sampled.pos_inds], gt_boxes[sampled.pos_gt_inds])
                box_losses.append(weighted_box_loss(self.cfg.loss_bbox, deltas_flat[i, sampled.pos_inds].float(),
                                                    target, self.cfg.smooth_l1_beta))
            num_samples += inds.numel()
        norm = max(num_samples, 1)
        # the zero term keeps every parameter in the graph (DDP) when no image has a positive anchor
        box_loss = sum(box_losses) if box_losses else deltas_flat.sum() * 0.0
        return {"loss_rpn_cls": sum(cls_losses) / norm, "loss_rpn_bbox": box_loss / norm}

