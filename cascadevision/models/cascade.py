"""Cascade R-CNN, Cascade Mask R-CNN and Hybrid Task Cascade: one RoI head, read top to bottom.

A cascade runs `num_stages` box heads; each refines the boxes of the one before and, in training, relabels
them at its own (higher) IoU threshold. HTC adds three switches on top of Cascade Mask R-CNN:

- `interleaved`: stage t's mask head trains on the boxes stage t's box head has just refined (re-sampled),
  instead of on the boxes stage t was given;
- `mask_info_flow`: stage t's mask head also receives the mask feature of stages 1..t-1 (through `conv_res`);
- `with_semantic`: a semantic segmentation branch whose feature map is pooled and added to every box and
  mask RoI feature.

With all three off this is Cascade Mask R-CNN; without masks it is Cascade R-CNN.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RoIHeadConfig
from ..errors import DatasetError
from ..ops import decode_boxes, multi_scale_roi_align, roi_align
from .assign import MaxIoUAssigner
from .bbox_head import BBoxHead, multiclass_nms
from .layers import ConvModule
from .mask_head import MaskHead, mask_loss
from .roi_heads import SampledRoIs, boxes_to_rois, delta_targets, positive_mask_targets, sample_rois


class SemanticHead(nn.Module):
    """MMDetection's FusedSemanticHead: all FPN levels fused at one level (stride 8), 4 convs, then
    per-pixel class logits (for the loss) and an embedding (the feature fused into the RoI features)."""

    def __init__(self, channels: int, num_levels: int, num_classes: int, fusion_level: int = 1, num_convs: int = 4):
        super().__init__()
        self.fusion_level = fusion_level
        self.num_classes = num_classes
        self.lateral_convs = nn.ModuleList(ConvModule(channels, channels, 1) for _ in range(num_levels))
        self.convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in range(num_convs))
        self.conv_embedding = ConvModule(channels, channels, 1)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        nn.init.kaiming_normal_(self.conv_logits.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv_logits.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = self.lateral_convs[self.fusion_level](features[self.fusion_level])
        size = x.shape[-2:]
        for i, feat in enumerate(features):
            if i != self.fusion_level:
                feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=True)
                x = x + self.lateral_convs[i](feat)  # the lateral conv comes after the resize, as in the reference
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(x), self.conv_embedding(x)  # (B, classes, H/8, W/8), (B, C, H/8, W/8)

    def loss(self, logits: Tensor, labels: Tensor, avg_non_ignore: bool = False) -> Tensor:
        """Cross-entropy (255 = ignore), labels already at the logits' size, summed over the labelled pixels and
        divided by all pixels, ignored and padding included (MMDetection v3's default `avg_non_ignore=False`), or
        with `avg_non_ignore` by the labelled pixels only (MMDetection v2, torch's mean)."""
        if avg_non_ignore:
            return F.cross_entropy(logits.float(), labels, ignore_index=255)
        return F.cross_entropy(logits.float(), labels, ignore_index=255, reduction="sum") / labels.numel()


def semantic_targets(targets: list[dict], image_sizes, padded_size, out_size, num_classes: int) -> Tensor:
    """(B, h, w) long labels at the semantic logits' size: each map resized like its image, padded with 255."""
    device = targets[0]["semantic"].device
    batch = torch.full((len(targets), *padded_size), 255, dtype=torch.uint8, device=device)
    for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
        sem = t["semantic"]
        bad = (sem != 255) & (sem >= num_classes)
        if bad.any():
            value = int(sem[bad][0])
            raise DatasetError(f"{t.get('file_name', f'image {i}')}: semantic label {value} is outside the semantic "
                               f"head's {num_classes} classes (0..{num_classes - 1}, 255 = ignore)")
        batch[i, :h, :w] = F.interpolate(sem[None, None].float(), size=(h, w), mode="nearest")[0, 0].to(torch.uint8)
    return F.interpolate(batch[:, None].float(), size=out_size, mode="nearest")[:, 0].long()


class CascadeRoIHead(nn.Module):
    def __init__(self, cfg: RoIHeadConfig, num_classes: int, in_channels: int, strides=(4, 8, 16, 32),
                 num_feature_levels: int = 5):
        super().__init__()
        htc = cfg.type == "htc"
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_stages = cfg.num_stages
        self.strides = tuple(strides)
        self.in_channels = in_channels
        self.exit_counts: StageCounts | None = None  # what the last forward computed
        self.exit_totals: StageCounts | None = None  # summed over forwards since reset_exit_stats()
        self._per_roi_macs = None
        self.interleaved = htc and cfg.interleaved and cfg.with_mask
        self.mask_info_flow = htc and cfg.mask_info_flow and cfg.with_mask
        self.bbox_head = nn.ModuleList(
            BBoxHead(in_channels, cfg.roi_size, cfg.num_fcs, cfg.fc_channels, num_classes, cfg.reg_class_agnostic)
            for _ in range(self.num_stages))
        self.mask_head = None
        if cfg.with_mask:
            self.mask_head = nn.ModuleList(
                MaskHead(in_channels, cfg.mask_conv_channels, cfg.mask_num_convs, num_classes,
                         with_conv_res=self.mask_info_flow and t > 0)
                for t in range(self.num_stages))
        self.semantic_head = None
        if htc and cfg.with_semantic:
            self.semantic_head = SemanticHead(in_channels, num_feature_levels, cfg.semantic_num_classes,
                                              cfg.semantic_fusion_level)
        self.assigners = [MaxIoUAssigner(iou, iou, iou, cfg.match_low_quality) for iou in cfg.iou_thresholds]

    @property
    def with_mask(self) -> bool:
        return self.mask_head is not None

    # ---------------------------------------------------------------------------------------------- features

    def _roi_features(self, features, rois: Tensor, size: int, semantic_feat: Tensor | None) -> Tensor:
        feats = multi_scale_roi_align(features[: len(self.strides)], rois, size, self.strides,
                                      finest_scale=self.cfg.finest_scale, sampling_ratio=0, aligned=True)
        if semantic_feat is not None:
            # the semantic map (stride 8) is pooled at 14x14 for both branches, then averaged down for boxes
            stride = self.strides[self.cfg.semantic_fusion_level]
            sem = roi_align(semantic_feat, rois, self.cfg.mask_roi_size, spatial_scale=1.0 / stride,
                            sampling_ratio=0, aligned=True)
            if sem.shape[-1] != size:
                # 14 -> 7 is a plain 2x2 average (much faster to backpropagate than the adaptive pool)
                factor = sem.shape[-1] // size
                sem = (F.avg_pool2d(sem, factor) if factor * size == sem.shape[-1]
                       else F.adaptive_avg_pool2d(sem, size))
            feats = feats + sem
        return feats

    def _bbox_forward(self, stage: int, features, rois: Tensor, semantic_feat) -> tuple[Tensor, Tensor]:
        return self.bbox_head[stage](self._roi_features(features, rois, self.cfg.roi_size, semantic_feat))

    def _mask_logits(self, stage: int, mask_feats: Tensor) -> list[Tensor]:
        """Logits of stages 0..stage on the same RoI features; with info flow each passes its feature on."""
        logits, last_feat = [], None
        for t in range(stage + 1):
            out, feat = self.mask_head[t](mask_feats, last_feat)
            logits.append(out)
            if self.mask_info_flow:
                last_feat = feat
        return logits

    def _refine(self, stage: int, rois: Tensor, cls_score: Tensor, deltas: Tensor, image_sizes,
                labels: Tensor | None = None) -> list[Tensor]:
        """Decode this stage's deltas onto its RoIs, per image, clipped: the next stage's boxes."""
        if labels is None or not self.cfg.reg_class_agnostic:
            predicted = cls_score[:, :-1].argmax(1)
            labels = predicted if labels is None else torch.where(labels == self.num_classes, predicted, labels)
        deltas = self.bbox_head[stage].select_deltas(deltas, labels)
        out = []
        for i, size in enumerate(image_sizes):
            keep = rois[:, 0] == i
            out.append(decode_boxes(rois[keep, 1:], deltas[keep], stds=self.cfg.bbox_stds[stage], max_shape=size))
        return out

    # ---------------------------------------------------------------------------------------------- training

    def loss(self, features, proposals, image_sizes, targets, scale_factors) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        semantic_feat = None
        if self.semantic_head is not None:
            if any("semantic" not in t for t in targets):
                raise DatasetError("HTC with the semantic branch needs a 'semantic' label map in every target "
                                   "(give data.train_semantic, or let the dataset derive things-only maps)")
            sem_logits, semantic_feat = self.semantic_head(features)
            padded = tuple(s * 4 for s in features[0].shape[-2:])  # P2 has stride 4
            labels = semantic_targets(targets, image_sizes, padded, sem_logits.shape[-2:], self.semantic_head.num_classes)
            semantic_loss = self.semantic_head.loss(sem_logits, labels, self.cfg.semantic_loss_avg_non_ignore)
            losses["loss_semantic_seg"] = semantic_loss * self.cfg.semantic_loss_weight
        for t in range(self.num_stages):
            sampled = sample_rois(proposals, targets, self.assigners[t], self.cfg, self.num_classes)
            rois = boxes_to_rois(sampled.boxes)
            labels = torch.cat(sampled.labels)
            cls_score, deltas = self._bbox_forward(t, features, rois, semantic_feat)
            stage = self.bbox_head[t].loss(cls_score, deltas, labels,
                                           delta_targets(sampled, targets, self.cfg.bbox_stds[t]),
                                           self.cfg.loss_bbox, self.cfg.smooth_l1_beta)
            last = t == self.num_stages - 1
            refined = None
            if self.interleaved or not last:
                with torch.no_grad():
                    refined = self._drop_gt_proposals(
                        self._refine(t, rois, cls_score, deltas, image_sizes, labels), sampled)
            if self.with_mask:
                # interleaved: the mask learns on the boxes this stage has just refined, re-sampled at its IoU
                mask_sampled = (sample_rois(refined, targets, self.assigners[t], self.cfg, self.num_classes)
                                if self.interleaved else sampled)
                stage["loss_mask"] = self._mask_loss(t, features, mask_sampled, targets, scale_factors, semantic_feat)
            weight = self.cfg.stage_loss_weights[t]
            for name, value in stage.items():
                losses[f"s{t}.{name}"] = value * weight if "loss" in name else value
            if not last:
                proposals = refined
        return losses

    @staticmethod
    def _drop_gt_proposals(refined: list[Tensor], sampled: SampledRoIs) -> list[Tensor]:
        """The gt boxes that were added as proposals are not passed on to the next stage."""
        out = []
        for boxes, is_gt, num in zip(refined, sampled.pos_is_gt, sampled.num_pos):
            keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
            keep[:num] = ~is_gt
            out.append(boxes[keep])
        return out

    def _mask_loss(self, stage, features, sampled: SampledRoIs, targets, scale_factors, semantic_feat) -> Tensor:
        pos_boxes = sampled.pos_boxes()
        mask_feats = self._roi_features(features, boxes_to_rois(pos_boxes), self.cfg.mask_roi_size, semantic_feat)
        logits = self._mask_logits(stage, mask_feats)[-1]
        target = positive_mask_targets(pos_boxes, sampled.pos_gt_inds, targets, scale_factors, logits.shape[-1])
        labels = torch.cat([l[:p] for l, p in zip(sampled.labels, sampled.num_pos)])
        return mask_loss(logits, labels, target)

    # ---------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(self, features, proposals, image_sizes, deadline: float | None = None) -> list[dict[str, Tensor]]:
        """Run the stages, each on the boxes the previous one refined, then per-class NMS and the masks.

        Scores are the softmax of the mean of the stages' raw logits; boxes come from the last stage. With
        `cfg.early_exit` a RoI may leave after any stage (confident: its box and score so far are final;
        confidently background: dropped), and past `deadline` (a `time.perf_counter()` value) every RoI
        leaves at the current stage. Only the RoIs still in the cascade are computed by the next stage.
        """
        exit_cfg = self.cfg.early_exit
        semantic_feat = self.semantic_head(features)[1] if self.semantic_head is not None else None
        rois = boxes_to_rois(proposals)
        logit_sum = None
        finished = []  # (rois (k,5) with refined boxes, mean logits (k, C+1), exit stage)
        stats = StageCounts(self.num_stages)
        for t in range(self.num_stages):
            stats.rois[t] += len(rois)
            cls_score, deltas = self._bbox_forward(t, features, rois, semantic_feat)
            logit_sum = cls_score.float() if logit_sum is None else logit_sum + cls_score.float()
            mean_logits = logit_sum / (t + 1)
            refined = boxes_to_rois(self._refine(t, rois, cls_score, deltas, image_sizes))
            if t == self.num_stages - 1 or (deadline is not None and time.perf_counter() > deadline):
                finished.append((refined, mean_logits, t))
                stats.exits[t] += len(refined)
                break
            # the next stage refines the boxes this stage produced (its own stds apply to them)
            done, dropped = exit_decisions(mean_logits.softmax(-1), exit_cfg)
            if done.any():
                finished.append((refined[done], mean_logits[done], t))
            stats.exits[t] += int(done.sum())
            stats.dropped[t] += int(dropped.sum())
            keep = ~(done | dropped)
            rois, logit_sum = refined[keep], logit_sum[keep]
            if len(rois) == 0:
                break
        self.exit_counts = stats
        detections = self._detect(finished, image_sizes)
        if self.with_mask:
            self._predict_masks(features, detections, semantic_feat)
        self.exit_totals = stats if self.exit_totals is None else self.exit_totals + stats
        return detections

    def _detect(self, finished, image_sizes) -> list[dict[str, Tensor]]:
        if not finished:
            empty = self.bbox_head[0].fc_cls.weight.new_zeros((0, 5))
            finished = [(empty, empty.new_zeros((0, self.num_classes + 1)), 0)]
        rois = torch.cat([f[0] for f in finished])
        scores = torch.cat([f[1] for f in finished]).softmax(-1)
        stages = torch.cat([torch.full((len(f[0]),), f[2], dtype=torch.long, device=rois.device) for f in finished])
        detections = []
        for i in range(len(image_sizes)):
            keep = rois[:, 0] == i
            boxes, det_scores, labels, index = multiclass_nms(rois[keep, 1:], scores[keep], self.cfg.score_thr,
                                                               self.cfg.nms_iou, self.cfg.max_per_img,
                                                               return_index=True)
            detections.append({"boxes": boxes, "scores": det_scores, "labels": labels,
                               "exit_stage": stages[keep][index]})
        return detections

    def _predict_masks(self, features, detections: list[dict], semantic_feat) -> None:
        """Adds `mask_probs` (N, S, S): the ensemble of the mask heads of the stages each detection went through."""
        det_boxes = [d["boxes"] for d in detections]
        size = self.cfg.mask_size
        rois = boxes_to_rois(det_boxes)
        labels = torch.cat([d["labels"] for d in detections])
        exit_stage = torch.cat([d["exit_stage"] for d in detections])
        probs = rois.new_zeros((len(rois), size, size))
        for stage in exit_stage.unique().tolist():  # at most num_stages groups
            group = exit_stage == stage
            mask_feats = self._roi_features(features, rois[group], self.cfg.mask_roi_size, semantic_feat)
            index = torch.arange(int(group.sum()), device=rois.device)
            stage_probs = [logits[index, labels[group]].float().sigmoid()
                           for logits in self._mask_logits(stage, mask_feats)]
            if self.cfg.mask_ensemble == "mean":
                probs[group] = torch.stack(stage_probs).mean(0)
            elif self.cfg.mask_ensemble == "last":
                probs[group] = stage_probs[-1]
            else:
                raise ValueError(f"roi_head.mask_ensemble must be 'mean' or 'last', got '{self.cfg.mask_ensemble}'")
            self.exit_counts.masks[stage] += int(group.sum())
        for d, p in zip(detections, probs.split([len(b) for b in det_boxes])):
            d["mask_probs"] = p

    # ---------------------------------------------------------------------------------------------- accounting

    def reset_exit_stats(self) -> None:
        self.exit_totals = None

    def per_roi_macs(self) -> tuple[list[int], list[int]]:
        """Multiply-accumulates one RoI costs in each stage's box head and mask head (RoIAlign not counted)."""
        if self._per_roi_macs is None:
            from ..macs import count_macs

            param, channels = self.bbox_head[0].fc_cls.weight, self.in_channels
            box_in = param.new_zeros((1, channels, self.cfg.roi_size, self.cfg.roi_size))
            box = [count_macs(head, box_in) for head in self.bbox_head]
            mask = []
            if self.with_mask:
                mask_in = param.new_zeros((1, channels, self.cfg.mask_roi_size, self.cfg.mask_roi_size))
                res = param.new_zeros((1, self.cfg.mask_conv_channels, self.cfg.mask_roi_size, self.cfg.mask_roi_size))
                mask = [count_macs(head, mask_in, res if head.conv_res is not None else None) for head in self.mask_head]
            self._per_roi_macs = (box, mask)
        return self._per_roi_macs

    def exit_summary(self, counts: StageCounts | None = None) -> dict:
        """RoIs per stage and the RoI-head compute spent, against the full cascade on the same proposals."""
        counts = counts or self.exit_totals or StageCounts(self.num_stages)
        box, mask = self.per_roi_macs()
        spent = sum(r * c for r, c in zip(counts.rois, box))
        spent += sum(m * sum(mask[: t + 1]) for t, m in enumerate(counts.masks)) if mask else 0
        full = counts.rois[0] * sum(box) + (sum(counts.masks) * sum(mask) if mask else 0)
        return {"rois": counts.rois, "exits": counts.exits, "dropped": counts.dropped, "masks": counts.masks,
                "roi_head_gmacs": spent / 1e9, "full_cascade_gmacs": full / 1e9,
                "saved_fraction": 1 - spent / full if full else 0.0}


@dataclass
class StageCounts:
    """What one forward pass of the cascade computed: RoIs entering each stage, leaving after it
    (confident), dropped after it (background), and detections whose masks used stages 0..t."""
    num_stages: int
    rois: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("rois", "exits", "dropped", "masks"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_stages)

    def __add__(self, other: "StageCounts") -> "StageCounts":
        add = lambda a, b: [x + y for x, y in zip(a, b)]  # noqa: E731
        return StageCounts(self.num_stages, add(self.rois, other.rois), add(self.exits, other.exits),
                           add(self.dropped, other.dropped), add(self.masks, other.masks))


def exit_decisions(probs: Tensor, cfg) -> tuple[Tensor, Tensor]:
    """(leave, drop) masks for RoIs with class probabilities `probs` (K, C+1), background last.

    A RoI leaves when the policy finds it confident, or when the pruner finds it not worth refining (its best
    class probability is below `cfg.prune_threshold`); it is dropped when P(background) >= the background
    threshold. Dropping wins over leaving.
    """
    no = probs.new_zeros(len(probs), dtype=torch.bool)
    drop = probs[:, -1] >= cfg.background_threshold if cfg.background_threshold > 0 else no
    fg = probs[:, :-1]
    pruned = fg.max(1).values < cfg.prune_threshold if cfg.prune_threshold > 0 else no
    if cfg.policy == "none":
        return pruned & ~drop, drop
    if cfg.policy == "max_prob":
        leave = fg.max(1).values >= cfg.threshold
    elif cfg.policy == "margin":
        top2 = probs.topk(2, dim=1).values
        leave = (top2[:, 0] - top2[:, 1] >= cfg.threshold) & (probs.argmax(1) < fg.shape[1])
    elif cfg.policy == "entropy":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])
        leave = (entropy <= cfg.threshold) & (probs.argmax(1) < fg.shape[1])
    else:
        raise ValueError(f"roi_head.early_exit.policy must be none, max_prob, entropy or margin, got '{cfg.policy}'")
    return (leave | pruned) & ~drop, drop


def build_cascade_head(cfg: RoIHeadConfig, num_classes: int, in_channels: int, num_feature_levels: int = 5):
    return CascadeRoIHead(cfg, num_classes, in_channels, num_feature_levels=num_feature_levels)
