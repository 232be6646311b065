"""COCO evaluation: run a model over a dataset, convert its outputs to COCO results, score them with COCOeval."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from . import distributed as dist_utils

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six COCOeval stats, in order


def evaluate(model: torch.nn.Module, dataset, *, out_dir: str | Path | None = None, batch_size: int = 1,
             device: str | torch.device | None = None, progress: bool = True,
             iou_types: Sequence[str] | None = None, num_workers: int = 0) -> dict:
    """COCO box (and mask) AP of `model` on `dataset`, in percent: {'bbox': {'AP', ...}, 'segm': {...}}.

    `iou_types=None` evaluates 'bbox', plus 'segm' when the model returned masks. Under DDP each process runs
    every world_size-th image and process 0 scores the gathered results; every process returns the metrics.
    With `out_dir`, process 0 writes results.json (all detections), metrics.json and coco_eval.txt there.
    """
    from ..data import collate

    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()

    indices = list(range(rank, len(dataset), world_size))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=num_workers)
    results: list[dict] = []
    has_masks = False
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(batches), desc="eval", dynamic_ncols=True,
                                          disable=not (progress and rank == 0)) as bar:
            for batch_indices, (images, _targets) in zip(batches, loader):
                outputs = model([image.to(device, non_blocking=True) for image in images])
                image_ids = [dataset.image_ids[i] for i in batch_indices]
                has_masks = has_masks or any("masks" in output for output in outputs)
                results.extend(results_to_coco(outputs, image_ids, dataset.cat_ids))
                bar.update(1)
    finally:
        model.train(was_training)

    gathered = dist_utils.all_gather_object((results, has_masks))
    metrics: dict = {}
    if rank == 0:
        results = [r for part, _ in gathered for r in part]
        has_masks = any(flag for _, flag in gathered)
        if iou_types is None:
            iou_types = ["bbox", "segm"] if has_masks else ["bbox"]
        log = io.StringIO()
        for iou_type in iou_types:
            metrics[iou_type] = coco_eval(dataset.coco, results, iou_type, img_ids=dataset.image_ids, log=log)
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "results.json").write_text(json.dumps(results))
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            (out_dir / "coco_eval.txt").write_text(log.getvalue())
    return dist_utils.broadcast_object(metrics)


def results_to_coco(predictions: Sequence[dict], image_ids: Sequence[int], cat_ids: Sequence[int]) -> list[dict]:
    """Model outputs (one dict per image) -> COCO result dicts.

    bbox is [x, y, w, h] in pixels, category_id = cat_ids[label], and with masks `segmentation` is a compressed
    RLE whose `counts` is a str (so the list can be written as JSON).
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
        rles = encode_masks(prediction["masks"]) if "masks" in prediction else None
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
    # pycocotools wants (H, W, N) uint8 in Fortran order
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_eval(coco_gt, results: list[dict], iou_type: str, *, img_ids: Iterable[int] | None = None,
              log: io.StringIO | None = None) -> dict:
    """COCOeval of `results` against `coco_gt` -> {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} in percent.

    No results gives 0 everywhere. A size range without ground truth keeps COCO's -1 (undefined).
    `img_ids` restricts the evaluation to those images (default: all images of `coco_gt`). COCOeval's printout
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
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (float(value) * 100.0 if value >= 0 else -1.0)
            for name, value in zip(METRIC_NAMES, evaluator.stats)}
