"""COCO evaluation: run a model over a dataset, convert its outputs to COCO results, score them with COCOeval."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ..data.transforms import collate
from ..errors import DatasetError
from ..outputs import ensure_writable_dir
from ..ops.masks import MASK_CHUNK_PIXELS, iter_pasted_masks
from . import distributed as dist_utils
from .amp import autocast

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six COCOeval stats, in order


def evaluate(model: torch.nn.Module, dataset, *, out_dir: str | Path | None = None, batch_size: int = 1,
             device: str | torch.device | None = None, progress: bool = True,
             iou_types: Sequence[str] | None = None, num_workers: int = 0,
             cat_ids: Sequence[int | None] | None = None, dtype: torch.dtype | None = None) -> dict:
    """COCO box (and mask) AP of `model` on `dataset`, in percent: {'bbox': {'AP', ...}, 'segm': {...}}.

    `cat_ids[k]` is the dataset category id of model label k (see `data.match_classes`; default: the
    dataset's own `cat_ids`, for a model trained on this very category list); a None entry drops that label's
    detections, and only the categories some label maps to are scored.
    `iou_types=None` evaluates 'bbox', plus 'segm' when the model returned masks and every annotation has a
    segmentation (otherwise segm is skipped with a note). Under DDP each process runs every world_size-th
    image and process 0 scores the gathered results; every process returns the metrics.
    `dtype` (torch.bfloat16 or torch.float16) runs the model under autocast (see `engine.amp`).
    With `out_dir`, process 0 writes results.json (all detections), metrics.json and coco_eval.txt there.
    Problems with the dataset or `out_dir` are raised before any inference.
    """
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    cat_ids = list(dataset.cat_ids if cat_ids is None else cat_ids)
    scored = sorted({c for c in cat_ids if c is not None})
    notes = []
    annotations = [a for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd", 0)]
    if not annotations:
        raise DatasetError(f"{getattr(dataset, 'ann_file', 'the dataset')}: no annotations to evaluate against "
                           f"({len(dataset)} images, 0 instance annotations)")
    without_masks = sum(1 for a in dataset.coco.dataset["annotations"] if not a.get("segmentation"))
    if without_masks:
        if iou_types is not None and "segm" in iou_types:
            raise DatasetError(f"{getattr(dataset, 'ann_file', 'the dataset')}: mask AP needs a segmentation for "
                               f"every annotation, and {without_masks} have none")
        notes.append(f"segm AP skipped: {without_masks} annotations of {getattr(dataset, 'ann_file', 'the dataset')} "
                     "have no segmentation (box AP only)")
    if out_dir is not None and rank == 0:
        ensure_writable_dir(out_dir, "evaluation output directory")

    indices = list(range(rank, len(dataset), world_size))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=num_workers)
    category_of = [c if c is not None else -1 for c in cat_ids]  # -1: a label whose results are dropped
    results: list[dict] = []
    has_masks = False
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), deferred_mask_pasting(model), autocast(device, dtype), \
                tqdm(total=len(batches), desc="eval", dynamic_ncols=True, disable=not (progress and rank == 0)) as bar:
            for batch_indices, (images, _targets) in zip(batches, loader):
                outputs = model([image.to(device, non_blocking=True) for image in images])
                image_ids = [dataset.image_ids[i] for i in batch_indices]
                has_masks = has_masks or any("masks" in output or "mask_probs" in output for output in outputs)
                results.extend(r for r in results_to_coco(outputs, image_ids, category_of) if r["category_id"] >= 0)
                bar.update(1)
    finally:
        model.train(was_training)

    gathered = dist_utils.all_gather_object((results, has_masks))
    metrics: dict = {}
    if rank == 0:
        results = [r for part, _ in gathered for r in part]
        has_masks = any(flag for _, flag in gathered)
        if iou_types is None:
            iou_types = ["bbox", "segm"] if has_masks and not without_masks else ["bbox"]
        log = io.StringIO()
        for iou_type in iou_types:
            metrics[iou_type] = coco_eval(dataset.coco, results, iou_type, img_ids=dataset.image_ids, log=log,
                                          cat_ids=scored)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if out_dir is not None:
            out_dir = Path(out_dir)
            (out_dir / "results.json").write_text(json.dumps(results))
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            (out_dir / "coco_eval.txt").write_text(log.getvalue())
    return dist_utils.broadcast_object(metrics)


@contextlib.contextmanager
def deferred_mask_pasting(model: torch.nn.Module):
    """Within the block, a detector with masks returns the unpasted `mask_probs` instead of full-image `masks`
    (see `TwoStageDetector`), so that `results_to_coco` and `draw_predictions` paste a bounded chunk at a time:
    memory O(H x W), not detections x H x W, on large photos. Other models are left as they are."""
    test_cfg = getattr(getattr(getattr(model, "cfg", None), "roi_head", None), "test", None)
    if test_cfg is None or not hasattr(test_cfg, "mask_output"):
        yield model
        return
    before = test_cfg.mask_output
    test_cfg.mask_output = "probs"
    try:
        yield model
    finally:
        test_cfg.mask_output = before


def results_to_coco(predictions: Sequence[dict], image_ids: Sequence[int], cat_ids: Sequence[int], *,
                    max_pixels: int = MASK_CHUNK_PIXELS) -> list[dict]:
    """Model outputs (one dict per image) -> COCO result dicts.

    bbox is [x, y, w, h] in pixels, category_id = cat_ids[label], and with masks `segmentation` is a compressed
    RLE whose `counts` is a str (so the list can be written as JSON). Masks come as `masks` (N, H, W), or as
    the model's `mask_output="probs"` form: `mask_probs` (N, h, w) with `image_size` (H, W) and `mask_thr`
    (default 0.5), pasted at the prediction's `boxes` and encoded a chunk of at most `max_pixels` pixels at a
    time (`ops.iter_pasted_masks`), so no (N, H, W) tensor is made; the RLEs equal those of `masks`.
    """
    cat_ids_tensor = torch.as_tensor(list(cat_ids), dtype=torch.int64)
    results = []
    for prediction, image_id in zip(predictions, image_ids, strict=True):
        boxes = prediction["boxes"].detach().float().cpu()  # (N, 4) x1y1x2y2
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = prediction["scores"].detach().float().cpu().tolist()
        categories = cat_ids_tensor[prediction["labels"].detach().cpu()].tolist()
        rles = None
        if "masks" in prediction:
            rles = encode_masks(prediction["masks"])
        elif "mask_probs" in prediction:
            if "image_size" not in prediction:
                raise ValueError(f"image {image_id}: a prediction with 'mask_probs' needs the 'image_size' (H, W) "
                                 "to paste them at")
            rles = [None] * len(boxes)
            for indices, chunk in iter_pasted_masks(prediction["mask_probs"].detach(), prediction["boxes"].detach(),
                                                    prediction["image_size"], prediction.get("mask_thr", 0.5),
                                                    max_pixels):
                for index, rle in zip(indices.tolist(), encode_masks(chunk)):
                    rles[index] = rle
        for k, (box, score, category) in enumerate(zip(xywh, scores, categories)):
            result = {"image_id": int(image_id), "category_id": category, "bbox": box, "score": score}
            if rles is not None:
                result["segmentation"] = rles[k]
            results.append(result)
    return results


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """(N, H, W) masks (bool, or probabilities thresholded at 0.5) -> N compressed RLEs with str counts."""
    masks = masks.detach().cpu()
    if masks.dim() == 4:  # (N, 1, H, W)
        masks = masks[:, 0]
    if masks.dtype != torch.bool:
        masks = masks >= 0.5
    # pycocotools wants (H, W, N) uint8 in Fortran order: the memory of a C-order (N, W, H) array, made in one copy
    columns_first = masks.transpose(1, 2).contiguous().numpy().view(np.uint8)  # (N, W, H)
    rles = mask_util.encode(columns_first.transpose(2, 1, 0))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_eval(coco_gt, results: list[dict], iou_type: str, *, img_ids: Iterable[int] | None = None,
              log: io.StringIO | None = None, cat_ids: Iterable[int] | None = None) -> dict:
    """COCOeval of `results` against `coco_gt` -> {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} in percent.

    No results gives 0 everywhere. A size range without ground truth keeps COCO's -1 (undefined).
    `img_ids` restricts the evaluation to those images (default: all images of `coco_gt`), `cat_ids` to those
    categories (default: all). COCOeval's printout
    goes to `log` if given, else nowhere.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if not results:
        if log is not None:
            log.write(f"{iou_type}: no detections, AP = 0\n")
        return dict.fromkeys(METRIC_NAMES, 0.0)
    # loadRes modifies its input and, when a result has a bbox, uses the box area even for mask AP: give it
    # fresh dicts holding only the geometry this iou_type scores.
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    if geometry not in results[0]:
        raise ValueError(f"cannot compute {iou_type} AP: the results have no '{geometry}' (the model gave no masks?)")
    detections = [{"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
                   geometry: r[geometry]} for r in results]
    with contextlib.redirect_stdout(log if log is not None else io.StringIO()):
        print(f"---- {iou_type} ----")
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = list(img_ids)
        if cat_ids is not None:
            evaluator.params.catIds = sorted(cat_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (float(value) * 100.0 if value >= 0 else -1.0)
            for name, value in zip(METRIC_NAMES, evaluator.stats)}
