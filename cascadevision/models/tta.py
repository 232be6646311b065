"""Test-time augmentation: run a detector on flipped and rescaled copies of each image and merge the results.

    model = TTADetector(detector, scales=[(1333, 640), (1333, 800), (1333, 960)], flip=True).eval()
    predictions = model(images)  # the detector's eval-mode interface and output keys

Boxes are merged as MMDetection's `DetTTAModel` does: every augmentation's detections, mapped back to the
original image (flipped boxes mirrored back), go into one per-class NMS (the detector's own
`roi_head.test.nms_iou`), which keeps at most `roi_head.test.max_per_img`. Masks are averaged in image space:
the mask probabilities of each kept detection and of the detections it suppressed (from each other
augmentation the highest-scoring one of its class overlapping it by more than `nms_iou`, so at most one per
augmentation) are pasted into the original image, averaged, and thresholded at `roi_head.test.mask_thr`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..config import ModelConfig, TTAConfig
from ..ops import batched_nms, box_iou, paste_masks
from ..ops.masks import MASK_CHUNK_PIXELS


class TTADetector(nn.Module):
    """Wraps a `TwoStageDetector` (anything with its `transform.scale` and `cfg.roi_head.test`) for inference.

    `scales`: (long, short) keep-ratio test scales, as `model.input.scale`; empty: the model's own scale.
    `flip`: also run each scale on the left-right mirrored image. One augmentation in all (one scale, no flip)
    returns the detector's output unchanged. Outputs carry full-image `masks` (N, H, W) bool whatever the
    detector's `mask_output`, since averaged masks exist only in image space.
    """

    def __init__(self, model: nn.Module, scales=(), flip: bool = True):
        super().__init__()
        self.model = model
        self.scales = [tuple(int(v) for v in scale) for scale in scales] or [tuple(model.transform.scale)]
        if any(len(scale) != 2 for scale in self.scales):
            raise ValueError(f"TTA scales are (long, short) pairs, got {self.scales}")
        self.flip = flip
        self.training = model.training  # in step with the detector it wraps (eval mode for inference)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: TTAConfig | None = None) -> "TTADetector":
        cfg = cfg if cfg is not None else model.cfg.tta
        return cls(model, cfg.scales, cfg.flip)

    # the wrapped detector's description, for the code that reads it (class names, exit statistics)
    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def roi_head(self) -> nn.Module:
        return self.model.roi_head

    @property
    def augmentations(self) -> list[tuple[tuple[int, int], bool]]:
        """(scale, flipped) for every run of the detector, in the order they are run."""
        return [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training:
            raise RuntimeError("TTADetector is for inference; call .eval() (train the wrapped model itself)")
        augmentations = self.augmentations
        if len(augmentations) == 1:
            with _test_scale(self.model, augmentations[0][0]):
                return self.model(images)
        runs = []  # per augmentation: per image the detector's output, mask probabilities unpasted
        with _mask_output(self.model, "probs"):
            for scale, flipped in augmentations:
                with _test_scale(self.model, scale):
                    runs.append(self.model([img.flip(-1) if flipped else img for img in images]))
        test = self.model.cfg.roi_head.test
        flips = [flipped for _, flipped in augmentations]
        return [merge_augmentations([run[i] for run in runs], flips, tuple(img.shape[-2:]), test.nms_iou,
                                    test.max_per_img, test.mask_thr)
                for i, img in enumerate(images)]


def merge_augmentations(predictions: list[dict], flipped: list[bool], image_size: tuple[int, int],
                        nms_iou: float, max_per_img: int, mask_thr: float) -> dict:
    """One image's detections from several augmentations -> one set (see the module docstring).

    predictions[a]: augmentation a's output (boxes in the pixels of the image it saw, which is the original
    mirrored when flipped[a]; with masks as `mask_probs` (N, h, w)). Returns `boxes`, `labels`, `scores`
    (by decreasing score) and, when the inputs have masks, `masks` (N, H, W) bool.
    """
    width = image_size[1]
    boxes, aug_of = [], []
    for a, (pred, flip) in enumerate(zip(predictions, flipped)):
        b = pred["boxes"]
        boxes.append(torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1) if flip else b)
        aug_of.append(torch.full((len(b),), a, dtype=torch.long, device=b.device))
    boxes = torch.cat(boxes)  # (N_all, 4) in the original image
    seen_boxes = torch.cat([p["boxes"] for p in predictions])  # as each run predicted them (mirrored if flipped)
    scores = torch.cat([p["scores"] for p in predictions])
    labels = torch.cat([p["labels"] for p in predictions])
    aug_of = torch.cat(aug_of)
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_per_img]
    out = {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
    if all("mask_probs" in p for p in predictions) and not len(keep):
        out["masks"] = torch.zeros((0, *image_size), dtype=torch.bool, device=boxes.device)
    elif all("mask_probs" in p for p in predictions):
        probs = torch.cat([p["mask_probs"] for p in predictions])
        # the members averaged into kept detection k: per augmentation, its best same-class box overlapping k by
        # more than nms_iou (k itself for k's own augmentation: nothing there outscores it)
        overlap = (box_iou(boxes[keep], boxes) > nms_iou) & (labels[keep, None] == labels[None])  # (K, N_all)
        overlap[torch.arange(len(keep), device=boxes.device), keep] = True
        members = []  # per augmentation: (K,) index into the N_all detections, -1 where none
        for a in range(len(predictions)):
            candidates = overlap & (aug_of == a)[None]
            ranked = torch.where(candidates, scores[None], scores.new_tensor(-1.0))
            best = ranked.max(1)
            members.append(torch.where(best.values >= 0, best.indices, torch.full_like(best.indices, -1)))
        out["masks"] = _averaged_masks(probs, seen_boxes, members, flipped, image_size, mask_thr)
    return out


def _averaged_masks(probs: Tensor, seen_boxes: Tensor, members: list[Tensor], flipped: list[bool],
                    image_size: tuple[int, int], mask_thr: float) -> Tensor:
    """(K, H, W) bool: per kept detection, the mean of its members' pasted probabilities >= mask_thr, computed a
    chunk of detections at a time. A flipped run's masks are pasted at its own boxes in its mirrored frame, then
    the pasted image is mirrored back (exact: no box arithmetic)."""
    height, width = image_size
    num = len(members[0])  # K
    out = torch.zeros((num, height, width), dtype=torch.bool, device=probs.device)
    step = max(1, MASK_CHUNK_PIXELS // (4 * max(1, height * width)))
    for start in range(0, num, step):
        rows = slice(start, min(num, start + step))
        total = torch.zeros((rows.stop - start, height, width), dtype=torch.float32, device=probs.device)
        count = torch.zeros((rows.stop - start, 1, 1), dtype=torch.float32, device=probs.device)
        for index, flip in zip(members, flipped):
            index = index[rows]
            present = (index >= 0).nonzero().flatten()
            if not len(present):
                continue
            chosen = index[present]
            pasted = paste_masks(probs[chosen], seen_boxes[chosen], image_size).float()
            total[present] += pasted.flip(-1) if flip else pasted
            count[present] += 1
        out[rows] = total / count.clamp_min(1) >= mask_thr
    return out


@contextlib.contextmanager
def _test_scale(model: nn.Module, scale: tuple[int, int]):
    before = model.transform.scale
    model.transform.scale = tuple(scale)
    try:
        yield
    finally:
        model.transform.scale = before


@contextlib.contextmanager
def _mask_output(model: nn.Module, mode: str):
    test = model.cfg.roi_head.test
    before = test.mask_output
    test.mask_output = mode
    try:
        yield
    finally:
        test.mask_output = before


