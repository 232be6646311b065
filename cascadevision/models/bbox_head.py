"""The box head (MMDetection's Shared2FCBBoxHead), its loss, and per-class NMS of its detections."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import batched_nms
from .layers import ConvModule
from .rpn import weighted_box_loss


class BBoxHead(nn.Module):
    """`num_convs` shared 3x3 conv(+norm)+ReLU layers (none by default), flatten the RoI feature, `num_fcs`
    shared FC+ReLU layers, then class logits and box deltas (MMDetection's ConvFCBBoxHead; Shared2FC by
    default, Shared4Conv1FC with GN for the GN configs).

    The class logits have `num_classes + 1` entries, background last, as in the reference checkpoints. Both
    outputs are float32, under autocast too.
    """

    def __init__(self, in_channels: int, roi_size: int, num_fcs: int, fc_channels: int, num_classes: int,
                 reg_class_agnostic: bool, *, num_convs: int = 0, conv_channels: int = 256, norm: str = "none"):
        super().__init__()
        self.num_classes = num_classes
        self.reg_class_agnostic = reg_class_agnostic
        self.shared_convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1, norm=norm)
            for i in range(num_convs))
        in_features = (conv_channels if num_convs else in_channels) * roi_size * roi_size
        self.shared_fcs = nn.ModuleList()
        for _ in range(num_fcs):
            self.shared_fcs.append(nn.Linear(in_features, fc_channels))
            in_features = fc_channels
        self.fc_cls = nn.Linear(in_features, num_classes + 1)
        self.fc_reg = nn.Linear(in_features, 4 if reg_class_agnostic else 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        # (K, num_classes + 1), (K, 4) or (K, 4 * num_classes); .float() is a no-op outside autocast
        return self.fc_cls(x).float(), self.fc_reg(x).float()

    def select_deltas(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """The (K, 4) deltas of each RoI's class (class-specific heads) or the shared ones."""
        if self.reg_class_agnostic:
            return deltas
        return deltas.view(deltas.shape[0], -1, 4)[torch.arange(deltas.shape[0], device=deltas.device), labels]

    def loss(self, cls_score: Tensor, deltas: Tensor, labels: Tensor, delta_targets: Tensor, loss_kind: str,
             beta: float) -> dict[str, Tensor]:
        """Softmax CE over all sampled RoIs and the box loss of the positives, both averaged over all sampled RoIs.

        `delta_targets` (num_pos, 4) are the encoded targets of the RoIs with a foreground label, in order.
        """
        num = max(labels.numel(), 1)
        loss_cls = F.cross_entropy(cls_score.float(), labels, reduction="sum") / num
        pos = labels < self.num_classes
        if pos.any():
            pred = self.select_deltas(deltas[pos], labels[pos]).float()
            loss_bbox = weighted_box_loss(loss_kind, pred, delta_targets, beta) / num
        else:
            loss_bbox = deltas.sum() * 0.0
        acc = (cls_score.argmax(1) == labels).float().mean() * 100 if labels.numel() else cls_score.new_zeros(())
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "acc": acc.detach()}


def multiclass_nms(boxes: Tensor, scores: Tensor, score_thr: float, iou_threshold: float, max_num: int,
                   return_index: bool = False):
    """Per-class NMS over every (box, class) pair scoring above `score_thr`.

    boxes: (K, 4) shared by all classes or (K, C, 4); scores: (K, C + 1) probabilities, background last.
    Returns boxes (N, 4), scores (N,), labels (N,) sorted by decreasing score, N <= max_num, and with
    `return_index` the row of `boxes` each detection came from.
    """
    num_classes = scores.shape[1] - 1
    scores = scores[:, :num_classes]
    if boxes.dim() == 2:
        boxes = boxes[:, None].expand(-1, num_classes, 4)
    valid = scores > score_thr
    rows, labels = valid.nonzero(as_tuple=True)
    boxes, scores = boxes[rows, labels], scores[rows, labels]
    keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)[:max_num]
    if return_index:
        return boxes[keep], scores[keep], labels[keep], rows[keep]
    return boxes[keep], scores[keep], labels[keep]
