"""Per-class IoU and Dice from a confusion matrix, and the table the CLI prints.

IoU_c = TP / (TP + FP + FN), Dice_c = 2 TP / (2 TP + FP + FN), over all pixels of the split (not averaged per
image). Pixels labelled 255 are ignored. A class that appears neither in the labels nor in the predictions has
no score (None) and is left out of mIoU / mDice, as MMSegmentation does. Values are percentages.
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Counts (label, prediction) pixel pairs: `matrix[label, prediction]`, int64 (K, K)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, prediction: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one image (or a batch): integer tensors of the same shape."""
        if prediction.shape != labels.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and labels {tuple(labels.shape)} differ in shape")
        labels = labels.flatten().long().cpu()
        prediction = prediction.flatten().long().cpu()
        valid = labels != self.ignore_index
        labels, prediction = labels[valid], prediction[valid]
        k = self.num_classes
        if labels.numel() and (labels.min() < 0 or labels.max() >= k or prediction.min() < 0 or prediction.max() >= k):
            raise ValueError(f"labels and predictions must be in 0..{k - 1} (or {self.ignore_index} for labels)")
        self.matrix += torch.bincount(labels * k + prediction, minlength=k * k).reshape(k, k)

    def merge(self, other: "ConfusionMatrix | torch.Tensor") -> None:
        self.matrix += other.matrix if isinstance(other, ConfusionMatrix) else other

    def scores(self, class_names: Sequence[str] | None = None) -> dict:
        """{'mIoU', 'mDice', 'aAcc', 'IoU': {class: value or None}, 'Dice': {...}}, in percent."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        matrix = self.matrix.double()
        tp = matrix.diag()
        fp = matrix.sum(dim=0) - tp  # predicted as c, labelled otherwise
        fn = matrix.sum(dim=1) - tp  # labelled c, predicted otherwise
        present = (tp + fp + fn) > 0
        iou = torch.where(present, tp / (tp + fp + fn).clamp_min(1), torch.nan)
        dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.nan)
        total = matrix.sum()

        def mean(values: torch.Tensor) -> float | None:
            return round(100 * float(values[present].mean()), 4) if present.any() else None

        def per_class(values: torch.Tensor) -> dict:
            return {name: (round(100 * float(v), 4) if ok else None) for name, v, ok in zip(names, values, present)}

        return {"mIoU": mean(iou), "mDice": mean(dice),
                "aAcc": round(100 * float(tp.sum() / total), 4) if total > 0 else None,
                "IoU": per_class(iou), "Dice": per_class(dice)}


def format_scores(scores: dict, title: str = "") -> str:
    """A markdown table: one row per class with IoU and Dice, then the means."""
    def cell(value) -> str:
        return f"{value:6.2f}" if value is not None else "     -"

    names = list(scores["IoU"])
    width = max([len(n) for n in names] + [len(title or "class"), 5])
    lines = [f"| {title or 'class':<{width}} |    IoU |   Dice |", f"|{'-' * (width + 2)}|--------|--------|"]
    for name in names:
        lines.append(f"| {name:<{width}} | {cell(scores['IoU'][name])} | {cell(scores['Dice'][name])} |")
    lines.append(f"| {'mean':<{width}} | {cell(scores['mIoU'])} | {cell(scores['mDice'])} |")
    lines.append(f"\npixel accuracy (aAcc): {cell(scores['aAcc']).strip()}")
    return "\n".join(lines)
