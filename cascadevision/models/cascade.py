"""Cascade R-CNN, Cascade Mask R-CNN and Hybrid Task Cascade: one RoI head, read top to bottom.

A cascade runs `num_stages` box heads; each refines the boxes of the one before and, in training, relabels
them at its own (higher) IoU threshold. HTC adds three switches on top of Cascade Mask R-CNN (`cfg.htc`):

- `interleaved`: stage t's mask head trains on the boxes stage t's box head has just refined (re-sampled),
  instead of on the boxes stage t was given;
- `mask_info_flow`: stage t's mask head also receives the mask feature of stages 1..t-1 (through `conv_res`);
- `with_semantic`: a semantic segmentation branch whose feature map is pooled and added to every box and
  mask RoI feature.

With all three off this is Cascade Mask R-CNN; without masks it is Cascade R-CNN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RoIHeadConfig
from ..errors import ModelInputError
from ..ops import decode_boxes
from .assign import MaxIoUAssigner
from .bbox_head import BBoxHead, multiclass_nms
from .layers import ConvModule
from .mask_head import MaskHead
from .roi_heads import (
    STANDARD_FPN_STRIDES,
    RoIHead,
    SampledRoIs,
    boxes_to_rois,
    delta_targets,
    sample_rois,
)


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
            raise ModelInputError(f"{t.get('file_name', f'image {i}')}: semantic label {value} is outside the semantic "
                               f"head's {num_classes} classes (0..{num_classes - 1}, 255 = ignore)")
        batch[i, :h, :w] = F.interpolate(sem[None, None].float(), size=(h, w), mode="nearest")[0, 0].to(torch.uint8)
    return F.interpolate(batch[:, None].float(), size=out_size, mode="nearest")[:, 0].long()


class CascadeRoIHead(RoIHead):
    """`num_stages` box heads (and mask heads), each on the boxes the one before refined.

    `exit_policy` (optional, test time only) is any callable `exit_policy(stage, probs) -> (leave, drop)`:
    given the class probabilities (K, C+1) of the RoIs after `stage` (softmax of the mean logits so far,
    background last) it returns two bool masks: RoIs whose box and score are final now, and RoIs that are
    dropped. It may also have `count_masks(exit_stage)`. `cascadevision.early_exit.detection` provides one;
    with none, this is the plain cascade.
    """

    def __init__(self, cfg: RoIHeadConfig, num_classes: int, in_channels: int, strides=STANDARD_FPN_STRIDES,
                 num_feature_levels: int = 5,
                 exit_policy=None):
        super().__init__(cfg, num_classes, strides)
        htc = cfg.type == "htc"
        self.num_stages = cfg.num_stages
        self.in_channels = in_channels
        self.exit_policy = exit_policy
        # HTC's switches: None (the default) means on
        self.interleaved = htc and cfg.htc.interleaved is not False and cfg.with_mask
        self.mask_info_flow = htc and cfg.htc.mask_info_flow is not False and cfg.with_mask
        box, mask = cfg.box_head, cfg.mask_head
        self.bbox_head = nn.ModuleList(
            BBoxHead(in_channels, box.roi_size, box.num_fcs, box.fc_channels, num_classes, box.reg_class_agnostic,
                     num_convs=box.num_convs, conv_channels=box.conv_channels, norm=box.norm)
            for _ in range(self.num_stages))
        if cfg.with_mask:
            self.mask_head = nn.ModuleList(
                MaskHead(in_channels, mask.conv_channels, mask.num_convs, num_classes,
                         with_conv_res=self.mask_info_flow and t > 0, norm=mask.norm)
                for t in range(self.num_stages))
        self.semantic_head = None
        if htc and cfg.htc.with_semantic:
            self.semantic_head = SemanticHead(in_channels, num_feature_levels, cfg.htc.semantic_num_classes,
                                              cfg.htc.semantic_fusion_level)
        self.assigners = [MaxIoUAssigner(iou, iou, iou, cfg.sampler.match_low_quality) for iou in cfg.iou_thresholds]

    # ---------------------------------------------------------------------------------------------- one stage

    def _run_stage(self, stage: int, features, rois: Tensor, semantic_feat, image_sizes, labels: Tensor | None = None,
                   refine: bool = True) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """Box head `stage` on `rois`: class logits (K, C+1), deltas, and (if `refine`) the refined boxes per
        image, which are the next stage's proposals. `labels` (training) pick the deltas of the gt class."""
        cls_score, deltas = self.bbox_head[stage](self._roi_features(features, rois, self.cfg.box_head.roi_size,
                                                                      semantic_feat))
        boxes = None
        if refine:
            with torch.no_grad():
                boxes = self._refine(stage, rois, cls_score, deltas, image_sizes, labels)
        return cls_score, deltas, boxes

    def _refine(self, stage: int, rois: Tensor, cls_score: Tensor, deltas: Tensor, image_sizes,
                labels: Tensor | None = None) -> list[Tensor]:
        """Decode this stage's deltas onto its RoIs, per image, clipped."""
        if labels is None or not self.cfg.box_head.reg_class_agnostic:
            predicted = cls_score[:, :-1].argmax(1)
            labels = predicted if labels is None else torch.where(labels == self.num_classes, predicted, labels)
        deltas = self.bbox_head[stage].select_deltas(deltas, labels)
        out = []
        for i, size in enumerate(image_sizes):
            keep = rois[:, 0] == i
            out.append(decode_boxes(rois[keep, 1:], deltas[keep], stds=self.cfg.bbox_stds[stage], max_shape=size))
        return out

    def _mask_logits(self, stage: int, mask_feats: Tensor) -> list[Tensor]:
        """Logits of stages 0..stage on the same RoI features; with info flow each passes its feature on."""
        logits, last_feat = [], None
        for t in range(stage + 1):
            out, feat = self.mask_head[t](mask_feats, last_feat)
            logits.append(out)
            if self.mask_info_flow:
                last_feat = feat
        return logits

    # ---------------------------------------------------------------------------------------------- training

    def loss(self, features, proposals, image_sizes, targets, scale_factors) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        semantic_feat = None
        if self.semantic_head is not None:
            if any("semantic" not in t for t in targets):
                raise ModelInputError("HTC with the semantic branch needs a 'semantic' label map in every target "
                                      "(give data.train_semantic, or let the dataset derive things-only maps)")
            sem_logits, semantic_feat = self.semantic_head(features)
            padded = tuple(s * self.strides[0] for s in features[0].shape[-2:])
            labels = semantic_targets(targets, image_sizes, padded, sem_logits.shape[-2:], self.semantic_head.num_classes)
            semantic_loss = self.semantic_head.loss(sem_logits, labels, self.cfg.htc.semantic_loss_avg_non_ignore)
            losses["loss_semantic_seg"] = semantic_loss * self.cfg.htc.semantic_loss_weight
        for t in range(self.num_stages):
            sampled = sample_rois(proposals, targets, self.assigners[t], self.cfg.sampler, self.num_classes)
            rois = boxes_to_rois(sampled.boxes)
            labels = torch.cat(sampled.labels)
            last = t == self.num_stages - 1
            cls_score, deltas, refined = self._run_stage(t, features, rois, semantic_feat, image_sizes, labels,
                                                         refine=self.interleaved or not last)
            stage = self.bbox_head[t].loss(cls_score, deltas, labels,
                                           delta_targets(sampled, targets, self.cfg.bbox_stds[t]),
                                           self.cfg.box_head.loss_bbox, self.cfg.box_head.smooth_l1_beta)
            if refined is not None:
                refined = self._drop_gt_proposals(refined, sampled)
            if self.with_mask:
                # interleaved: the mask learns on the boxes this stage has just refined, re-sampled at its IoU
                mask_sampled = (sample_rois(refined, targets, self.assigners[t], self.cfg.sampler, self.num_classes)
                                if self.interleaved else sampled)
                stage["loss_mask"] = self._mask_loss(t, features, mask_sampled, targets, scale_factors, semantic_feat)
            weight = self.cfg.stage_loss_weights[t]
            for name, value in stage.items():
                losses[f"s{t}.{name}"] = value * weight if "loss" in name else value
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

    # ---------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        """Run the stages, each on the boxes the previous one refined, then per-class NMS and the masks.

        Scores are the softmax of the mean of the stages' raw logits; boxes come from the last stage (with an
        exit policy: from the stage each RoI left at, with the mean logits of the stages it went through).
        """
        semantic_feat = self.semantic_head(features)[1] if self.semantic_head is not None else None
        rois = boxes_to_rois(proposals)
        logit_sum = None
        finished = []  # (rois (k, 5) with refined boxes, mean logits (k, C+1), exit stage)
        for t in range(self.num_stages):
            cls_score, _, boxes = self._run_stage(t, features, rois, semantic_feat, image_sizes)
            logit_sum = cls_score.float() if logit_sum is None else logit_sum + cls_score.float()
            rois = boxes_to_rois(boxes)
            if self.exit_policy is not None:
                leave, drop = self.exit_policy(t, (logit_sum / (t + 1)).softmax(-1))
                if leave.any():
                    finished.append((rois[leave], logit_sum[leave] / (t + 1), t))
                keep = ~(leave | drop)
                rois, logit_sum = rois[keep], logit_sum[keep]
                if len(rois) == 0:
                    break
        if self.exit_policy is None:
            finished = [(rois, logit_sum / self.num_stages, self.num_stages - 1)]
        detections = self._detect(finished, image_sizes)
        if self.with_mask:
            self._predict_masks(features, detections, semantic_feat)
        return detections

    def _detect(self, finished, image_sizes) -> list[dict[str, Tensor]]:
        if not finished:
            empty = self.bbox_head[0].fc_cls.weight.new_zeros((0, 5))
            finished = [(empty, empty.new_zeros((0, self.num_classes + 1)), 0)]
        rois = torch.cat([f[0] for f in finished])
        scores = torch.cat([f[1] for f in finished]).softmax(-1)
        stages = torch.cat([torch.full((len(f[0]),), f[2], dtype=torch.long, device=rois.device) for f in finished])
        detections, test = [], self.cfg.test
        for i in range(len(image_sizes)):
            keep = rois[:, 0] == i
            boxes, det_scores, labels, index = multiclass_nms(rois[keep, 1:], scores[keep], test.score_thr,
                                                               test.nms_iou, test.max_per_img, return_index=True)
            detections.append({"boxes": boxes, "scores": det_scores, "labels": labels,
                               "exit_stage": stages[keep][index]})
        return detections

    def _predict_masks(self, features, detections: list[dict], semantic_feat) -> None:
        """Adds `mask_probs` (N, S, S): the ensemble of the mask heads of the stages each detection went through."""
        det_boxes = [d["boxes"] for d in detections]
        size = self.cfg.mask_head.size
        rois = boxes_to_rois(det_boxes)
        labels = torch.cat([d["labels"] for d in detections])
        exit_stage = torch.cat([d["exit_stage"] for d in detections])
        probs = rois.new_zeros((len(rois), size, size))
        # an exit policy's `mask_score_threshold`: detections scoring below it get their box as mask, no mask head run
        box_only = getattr(self.exit_policy, "mask_score_threshold", 0.0) if self.exit_policy is not None else 0.0
        headed = None
        if box_only > 0:
            headed = torch.cat([d["scores"] for d in detections]) >= box_only
            probs[~headed] = 1.0
        for stage in (exit_stage if headed is None else exit_stage[headed]).unique().tolist():  # <= num_stages groups
            group = exit_stage == stage if headed is None else (exit_stage == stage) & headed
            mask_feats = self._roi_features(features, rois[group], self.cfg.mask_head.roi_size, semantic_feat)
            index = torch.arange(int(group.sum()), device=rois.device)
            stage_probs = [logits[index, labels[group]].float().sigmoid()
                           for logits in self._mask_logits(stage, mask_feats)]
            probs[group] = torch.stack(stage_probs).mean(0) if self.cfg.test.mask_ensemble == "mean" else stage_probs[-1]
        if self.exit_policy is not None and hasattr(self.exit_policy, "count_masks"):
            self.exit_policy.count_masks(exit_stage if headed is None else exit_stage[headed])
        for d, p in zip(detections, probs.split([len(b) for b in det_boxes])):
            d["mask_probs"] = p

    # ------------------------------------------------------------------------- early-exit statistics, delegated

    def exit_summary(self) -> dict:
        """RoIs per stage and RoI-head compute since `reset_exit_stats()` (kept by the attached exit policy)."""
        if self.exit_policy is None:
            raise RuntimeError("this cascade has no exit policy attached, so nothing was counted; build it with "
                               "cascadevision.early_exit.detection.build_from_config (or attach_exit_policy)")
        return self.exit_policy.summary()

    def reset_exit_stats(self) -> None:
        if self.exit_policy is not None:
            self.exit_policy.reset()
