"""Calibrating a detector's region-level early exit on a validation split (`cascadevision exits calibrate-detector`).

One pass of the plain model over the split records, per image and per RoI, every stage's class logits and
refined box (the cascade's box heads see one RoI at a time, so a RoI's trajectory does not depend on which other
RoIs are still there). Any exit setting is then replayed from these numbers without running the backbone, FPN,
RPN or box heads again: `RegionExitPolicy` itself (the object the model calls) decides, stage by stage, where
each RoI leaves or is dropped; the detections are the cascade's own NMS on the boxes and mean logits of those
exit stages; masks are computed once per (RoI, exit stage, class) that some setting detects, pasted and
RLE-encoded once, and shared by every setting. So a setting's AP is the AP the model with that setting would
get (up to float rounding of the box heads on different batch sizes), and its RoI-head compute is counted as
`detection.exit_summary` counts it, against the plain model on the same images.

The search: the grid `SEARCH_GRID` (pruner, background drop, max_prob confident exit, box-only masks below a
score) and two goals, as for the classifiers (`calibration.py`):

- `max_ap_drop`: the least RoI-head compute whose AP (segm for mask models, else bbox) is at most this many
  points below the plain model's;
- `budget`: the best AP whose RoI-head compute is at most this fraction of the plain model's.

Settings are scored in order of compute and their box AP first, so most of the grid never needs a mask AP.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import torch

from ..config import EarlyExitConfig, update
from ..data import CocoDataset, match_classes
from ..engine.evaluator import coco_eval, results_to_coco
from ..errors import ConfigError
from ..io.checkpoint import atomic_write
from ..models.bbox_head import multiclass_nms
from ..models.roi_heads import boxes_to_rois
from ..ops import clip_boxes
from ..tasks.detection import checkpoint_classes, load_model
from .detection import COUNTING, StageCounts, exit_policy_for_head, roi_head_macs

#: the settings searched: every combination (policy max_prob at `threshold`, or none). `proposals` is the share of
#: the RPN's proposals the RoI heads get (model.rpn.test_post_nms: the proposals come best first, so fewer is a
#: prefix of the recorded ones and is replayed exactly)
SEARCH_GRID = {
    "threshold": (None, 0.99, 0.95, 0.9),  # None: no confident exit (policy none)
    "prune_threshold": (0.0, 0.05, 0.1, 0.2),
    "background_threshold": (0.0, 0.99, 0.95),
    "mask_score_threshold": (0.0, 0.1, 0.2, 0.3, 0.5),
    "proposals": (1.0, 0.67, 0.33),
}
EXIT_KEYS = ("policy", "threshold", "prune_threshold", "background_threshold", "mask_score_threshold")
SETTING_KEYS = (*EXIT_KEYS, "proposals")  # proposals: a count (model.rpn.test_post_nms), 0 = the model's own


@dataclass
class Trajectories:
    """One image's RoIs through the plain cascade: `boxes[t]` (R, 4) after stage t's refinement (network input
    pixels), `logits[t]` (R, C+1) stage t's raw class logits; what is needed to paste and score its masks."""
    image_id: int
    boxes: list
    logits: list
    image_size: tuple  # network input (h, w)
    original_size: tuple
    scale: tuple  # (sx, sy)


@dataclass
class Candidate:
    exit: dict  # model.roi_head.early_exit values
    macs: float  # RoI-head MACs per image
    fraction: float  # of the plain model's
    bbox_ap: float | None = None
    segm_ap: float | None = None
    rois: list = field(default_factory=list)

    def ap(self, metric: str) -> float | None:
        return self.bbox_ap if metric == "bbox" else self.segm_ap


def exit_config(values: dict) -> EarlyExitConfig:
    values = {k: v for k, v in values.items() if k != "proposals"}
    return update(EarlyExitConfig(), values, prefix="model.roi_head.early_exit.")


def grid_settings(grid: dict | None = None, with_mask: bool = True, max_proposals: int = 0) -> list[dict]:
    """The settings of `grid` (default SEARCH_GRID): model.roi_head.early_exit values, and `proposals` (a count
    out of `max_proposals`, the model's test_post_nms; 0 = all)."""
    grid = grid or SEARCH_GRID
    out = []
    counts = sorted({0 if f >= 1 or not max_proposals else max(1, round(f * max_proposals))
                     for f in grid.get("proposals", (1.0,))}, key=lambda n: -(n or 1e12))
    for threshold, prune, background, proposals in product(grid["threshold"], grid["prune_threshold"],
                                                           grid["background_threshold"], counts):
        roi = {"policy": "none" if threshold is None else "max_prob", "threshold": threshold or 0.9,
               "prune_threshold": prune, "background_threshold": background, "proposals": proposals}
        for mask in grid["mask_score_threshold"] if with_mask else (0.0,):
            out.append({**roi, "mask_score_threshold": mask})
    return out


class DetectorReplay:
    """The recorded pass of a cascade detector over a dataset, and the exact replay of exit settings on it."""

    def __init__(self, model, dataset: CocoDataset, cat_ids=None, progress=None):
        self.model, self.dataset = model, dataset
        self.head = model.roi_head
        if not hasattr(self.head, "exit_policy"):
            raise ConfigError(f"{model.cfg.roi_head.type}: only cascade RoI heads have region-level early exit")
        self.with_mask = bool(self.head.with_mask)
        self.cat_ids = list(dataset.cat_ids if cat_ids is None else cat_ids)
        self.category_of = [c if c is not None else -1 for c in self.cat_ids]
        self.scored = sorted({c for c in self.cat_ids if c is not None})
        self.box_macs, self.mask_macs = exit_policy_for_head(self.head, EarlyExitConfig()).per_roi_macs
        self.images: list[Trajectories] = []
        self.features: dict[int, tuple] = {}  # index -> (features, semantic_feat), while masks are being made
        self.masks: dict[tuple, dict] = {}  # (image index, roi, stage, label, box_only) -> RLE
        self.seconds = 0.0
        self.plain_macs = 0.0  # RoI-head MACs per image of the plain model, once `calibrate_detector` scored it
        self.max_proposals = int(model.cfg.rpn.test_post_nms)
        self._record(progress)

    @torch.inference_mode()
    def _record(self, progress) -> None:
        model, head = self.model, self.head
        model.eval()
        device = next(model.parameters()).device
        start = time.perf_counter()
        for index in range(len(self.dataset)):
            image, _ = self.dataset[index]
            image = image.to(device)
            batch, image_sizes, scale_factors, _ = model.transform([image], None)
            features = model.extract_features(batch)
            proposals, _ = model.rpn_head(features, image_sizes)
            semantic_feat = head.semantic_head(features)[1] if head.semantic_head is not None else None
            rois, boxes, logits = boxes_to_rois(proposals), [], []
            for t in range(head.num_stages):
                cls_score, _, refined = head._run_stage(t, features, rois, semantic_feat, image_sizes)
                rois = boxes_to_rois(refined)
                boxes.append(rois[:, 1:])
                logits.append(cls_score.float())
            self.images.append(Trajectories(self.dataset.image_ids[index], boxes, logits, tuple(image_sizes[0]),
                                            tuple(image.shape[-2:]), tuple(scale_factors[0])))
            if self.with_mask:
                self.features[index] = (features, semantic_feat)
            if progress:
                progress(index + 1, len(self.dataset))
        self.seconds = time.perf_counter() - start

    # -------------------------------------------------------------------------------------------- one setting

    def replay(self, values: dict) -> tuple[list[list[tuple]], StageCounts]:
        """Per image, the detections (roi, exit stage, label, score) the model with exit setting `values` makes,
        and the stage counts its policy would record."""
        cfg = exit_config(values)
        policy = exit_policy_for_head(self.head, cfg)
        test = self.head.cfg.test
        out = []
        proposals = int(values.get("proposals") or 0)
        for rec in self.images:
            num = len(rec.boxes[0])
            alive = torch.arange(min(num, proposals) if proposals else num, device=rec.logits[0].device)
            logit_sum = None
            exit_stage = torch.full((num,), -1, dtype=torch.long, device=alive.device)  # -1: dropped
            for t in range(self.head.num_stages):
                logit_sum = rec.logits[t][alive] if logit_sum is None else logit_sum + rec.logits[t][alive]
                leave, drop = policy(t, (logit_sum / (t + 1)).softmax(-1))
                exit_stage[alive[leave]] = t
                keep = ~(leave | drop)
                alive, logit_sum = alive[keep], logit_sum[keep]
                if len(alive) == 0:
                    break
            left = (exit_stage >= 0).nonzero()[:, 0]
            order = left[torch.argsort(exit_stage[left] * num + left)]  # the cascade's order: by stage, then index
            stages = exit_stage[order]
            boxes = torch.stack([rec.boxes[t][order] for t in range(self.head.num_stages)])[stages,
                                                                                           torch.arange(len(order))]
            mean = torch.zeros(len(order), rec.logits[0].shape[1], device=boxes.device)
            for t in range(self.head.num_stages):
                mean += torch.where((stages >= t)[:, None], rec.logits[t][order], 0)
            scores = (mean / (stages + 1)[:, None].float()).softmax(-1)
            _, det_scores, labels, index = multiclass_nms(boxes, scores, test.score_thr, test.nms_iou,
                                                          test.max_per_img, return_index=True)
            dets = list(zip(order[index].tolist(), stages[index].tolist(), labels.tolist(), det_scores.tolist()))
            out.append(dets)
        counts = policy.total()
        if self.with_mask:
            counts.masks = self.mask_counts(out, cfg.mask_score_threshold)
        return out, counts

    def mask_counts(self, dets: list[list[tuple]], mask_score_threshold: float) -> list[int]:
        """Detections given a mask by the mask heads, per exit stage (the box-only ones are not)."""
        masks = [0] * self.head.num_stages
        for image_dets in dets:
            for _, stage, _, score in image_dets:
                if not (mask_score_threshold > 0 and score < mask_score_threshold):
                    masks[stage] += 1
        return masks

    def compute(self, counts: StageCounts) -> float:
        """RoI-head MACs per image."""
        return roi_head_macs(counts, self.box_macs, self.mask_macs) / max(len(self.images), 1)

    def results(self, dets: list[list[tuple]], mask_score_threshold: float = 0.0, segm: bool = False) -> list[dict]:
        """COCO results of replayed detections (with `segm`, their masks: computed once, then shared)."""
        if segm:
            self._ensure_masks(dets, mask_score_threshold)
        results = []
        for i, (rec, image_dets) in enumerate(zip(self.images, dets)):
            if not image_dets:
                continue
            rois = torch.as_tensor([d[0] for d in image_dets])
            stages = torch.as_tensor([d[1] for d in image_dets])
            boxes = torch.stack([rec.boxes[t].cpu() for t in range(len(rec.boxes))])[stages, rois]
            sx, sy = rec.scale
            boxes = clip_boxes(boxes / boxes.new_tensor([sx, sy, sx, sy]), rec.original_size)
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            for k, (roi, stage, label, score) in enumerate(image_dets):
                category = self.category_of[label]
                if category < 0:
                    continue
                r = {"image_id": int(rec.image_id), "category_id": category, "bbox": xywh[k], "score": score}
                if segm:
                    box_only = mask_score_threshold > 0 and score < mask_score_threshold
                    r["segmentation"] = self.masks[(i, roi, stage, label, box_only)]
                results.append(r)
        return results

    @torch.inference_mode()
    def _ensure_masks(self, dets: list[list[tuple]], mask_score_threshold: float) -> None:
        head = self.head
        size = head.cfg.mask_head.size
        for i, (rec, image_dets) in enumerate(zip(self.images, dets)):
            wanted = {(roi, stage, label, mask_score_threshold > 0 and score < mask_score_threshold)
                      for roi, stage, label, score in image_dets}
            wanted = sorted(k for k in wanted if (i, *k) not in self.masks)
            if not wanted:
                continue
            rois = torch.as_tensor([k[0] for k in wanted])
            stages = torch.as_tensor([k[1] for k in wanted])
            labels = torch.as_tensor([k[2] for k in wanted])
            box_only = torch.as_tensor([k[3] for k in wanted])
            device = rec.boxes[0].device
            boxes = torch.stack(rec.boxes)[stages.to(device), rois.to(device)]
            probs = boxes.new_ones((len(wanted), size, size))
            features, semantic_feat = self.features[i]
            for stage in stages[~box_only].unique().tolist():  # as CascadeRoIHead._predict_masks does
                group = ((stages == stage) & ~box_only).to(device)
                mask_feats = head._roi_features(features, boxes_to_rois([boxes[group]]), head.cfg.mask_head.roi_size,
                                                semantic_feat)
                index = torch.arange(int(group.sum()), device=device)
                stage_probs = [logits[index, labels.to(device)[group]].float().sigmoid()
                               for logits in head._mask_logits(stage, mask_feats)]
                probs[group] = (torch.stack(stage_probs).mean(0) if head.cfg.test.mask_ensemble == "mean"
                                else stage_probs[-1])
            sx, sy = rec.scale
            pasted_boxes = clip_boxes(boxes / boxes.new_tensor([sx, sy, sx, sy]), rec.original_size)
            prediction = {"boxes": pasted_boxes, "scores": torch.zeros(len(wanted)), "labels": torch.zeros(
                len(wanted), dtype=torch.long), "mask_probs": probs, "image_size": rec.original_size,
                "mask_thr": head.cfg.test.mask_thr}
            for key, r in zip(wanted, results_to_coco([prediction], [rec.image_id], [0])):
                self.masks[(i, *key)] = r["segmentation"]

    def score(self, values: dict, segm: bool | None = None) -> Candidate:
        """One setting, replayed: its AP (bbox; segm too for mask models unless `segm` is False) and compute."""
        dets, counts = self.replay(values)
        segm = self.with_mask if segm is None else segm
        macs = self.compute(counts)
        c = Candidate(dict(values), macs, macs / self.plain_macs if self.plain_macs else 1.0, rois=counts.rois)
        c.bbox_ap = self.bbox_ap(dets)
        if segm:
            c.segm_ap = self.segm_ap(dets, values.get("mask_score_threshold", 0.0))
        return c

    def bbox_ap(self, dets: list[list[tuple]]) -> float:
        return coco_eval(self.dataset.coco, self.results(dets), "bbox", img_ids=self.dataset.image_ids,
                         cat_ids=self.scored)["AP"]

    def segm_ap(self, dets: list[list[tuple]], mask_score_threshold: float = 0.0) -> float:
        return coco_eval(self.dataset.coco, self.results(dets, mask_score_threshold, segm=True), "segm",
                         img_ids=self.dataset.image_ids, cat_ids=self.scored)["AP"]


@dataclass
class DetectorCalibration:
    """What `calibrate_detector` chose and what it plans."""
    exit: dict
    metric: str
    planned_ap: float
    plain_ap: float
    planned: dict  # bbox_ap, segm_ap, roi_head_gmacs per image, compute_fraction
    plain: dict
    target: dict
    met: bool
    num_images: int
    settings_scored: int
    seconds: float
    proposals: int = 0  # model.rpn.test_post_nms to run with; 0: the model's own

    @property
    def model_overrides(self) -> dict:
        """The model-section values the chosen setting is (what --exit-config applies)."""
        out: dict = {"roi_head": {"early_exit": dict(self.exit)}}
        if self.proposals:
            out["rpn"] = {"test_post_nms": self.proposals}
        return out

    def to_yaml(self, source: str = "") -> str:
        """The file `eval`/`predict --exit-config` read: model.roi_head.early_exit values, the plan as meta."""
        import yaml

        goal = ", ".join(f"{k} {v:g}" for k, v in self.target.items())
        head = [f"# cascadevision exits calibrate-detector ({goal}) on {source or 'the validation split'}",
                f"# planned {self.metric} AP {self.planned_ap:.1f} (plain model {self.plain_ap:.1f}); RoI-head compute "
                f"{100 * self.planned['compute_fraction']:.1f}% of the plain model's"
                f"{'' if self.met else ' -- TARGET NOT MET: the cheapest setting closest to it'}",
                "# use: cascadevision eval CKPT --exit-config THIS_FILE ... (or predict)"]
        body = {"model": self.model_overrides,
                "planned": {"metric": self.metric, "ap": round(self.planned_ap, 3), "plain_ap": round(self.plain_ap, 3),
                            **{k: round(v, 4) for k, v in self.planned.items()},
                            **{f"plain_{k}": round(v, 4) for k, v in self.plain.items()},
                            "target": self.target, "met": self.met, "images": self.num_images,
                            "split": source, "counting": COUNTING}}
        return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False)


def _roi_key(values: dict) -> tuple:
    """A setting's RoI-head part: settings equal here replay to the same detections (the mask threshold only
    changes which of them get a mask head)."""
    return tuple(values.get(k, 0) for k in SETTING_KEYS if k != "mask_score_threshold")


def calibrate_detector(replay: DetectorReplay, *, max_ap_drop: float | None = None, budget: float | None = None,
                       grid: dict | None = None, screen: float = 0.5, top: int = 6,
                       log=None) -> tuple[DetectorCalibration, list[Candidate]]:
    """Search `grid` on a recorded split for the goal (exactly one of `max_ap_drop` in AP points, `budget` as a
    fraction of the plain model's RoI-head compute). For mask models the metric is segm AP, and two screens keep
    the number of mask APs small: a setting whose box AP drops more than `max_ap_drop + screen`, or whose mask score
    threshold alone (on the plain RoIs) costs more than `max_ap_drop + screen` segm AP, is not given a mask AP;
    with a budget, only the `top` RoI settings by box AP are. Returns the choice and every candidate scored."""
    if (max_ap_drop is None) == (budget is None):
        raise ConfigError("give exactly one of max_ap_drop and budget")
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"budget is a fraction of the plain model's RoI-head compute in (0, 1], got {budget}")
    if max_ap_drop is not None and max_ap_drop < 0:
        raise ConfigError(f"max_ap_drop is in AP points, at least 0, got {max_ap_drop}")
    start = time.perf_counter()
    metric = "segm" if replay.with_mask else "bbox"
    plain_values = {"policy": "none", "threshold": EarlyExitConfig.threshold, "prune_threshold": 0.0,
                    "background_threshold": 0.0, "mask_score_threshold": 0.0, "proposals": 0}
    plain = replay.score(plain_values)
    replay.plain_macs = plain.macs
    plain.fraction = 1.0
    settings = grid_settings(grid, replay.with_mask, replay.max_proposals)
    # compute needs no AP: every setting's, cheaply (one replay each, no COCOeval)
    cands, replayed = [], {}
    for values in settings:
        key = _roi_key(values)
        if key not in replayed:  # the mask threshold changes only which detections get a mask head
            replayed[key] = replay.replay({**values, "mask_score_threshold": 0.0})
        dets, counts = replayed[key]
        counts = StageCounts(counts.num_stages, counts.rois, counts.exits, counts.dropped,
                             replay.mask_counts(dets, values["mask_score_threshold"]) if replay.with_mask else [])
        macs = replay.compute(counts)
        cands.append((Candidate(values, macs, macs / plain.macs, rois=counts.rois), dets))
    cands.sort(key=lambda c: (c[0].macs, -c[0].exit["mask_score_threshold"]))
    box_ap: dict = {}

    def bbox(c: Candidate, dets) -> float:
        key = _roi_key(c.exit)
        if key not in box_ap:
            box_ap[key] = replay.bbox_ap(dets)
        c.bbox_ap = box_ap[key]
        return c.bbox_ap

    def segm(c: Candidate, dets) -> float:
        c.segm_ap = replay.segm_ap(dets, c.exit["mask_score_threshold"])
        return c.segm_ap

    scored, chosen = [plain], None
    if max_ap_drop is not None:
        floor = plain.ap(metric) - max_ap_drop
        mask_ok = {}
        if metric == "segm":  # each mask score threshold alone, on the plain model's RoIs
            plain_dets = replay.replay(plain_values)[0]
            for m in sorted({c.exit["mask_score_threshold"] for c, _ in cands}):
                mask_ok[m] = m == 0 or replay.segm_ap(plain_dets, m) >= plain.segm_ap - max_ap_drop - screen
        for c, dets in cands:
            if c.macs >= plain.macs:
                break
            if metric == "segm" and not mask_ok[c.exit["mask_score_threshold"]]:
                continue
            if bbox(c, dets) < (plain.bbox_ap - max_ap_drop - (screen if metric == "segm" else 0)):
                continue
            if metric == "segm":
                segm(c, dets)
            scored.append(c)
            if log:
                log(c)
            if c.ap(metric) >= floor - 1e-9:
                chosen = c
                break
        met = chosen is not None
        if chosen is None:  # nothing cheaper meets it: the plain model does
            chosen = plain
    else:
        within = [(c, d) for c, d in cands if c.macs <= budget * plain.macs]
        for c, dets in within:
            bbox(c, dets)
        keys = sorted({_roi_key(c.exit) for c, _ in within}, key=lambda k: -box_ap[k])[:top] if metric == "segm" else None
        for c, dets in within:
            if metric == "segm" and _roi_key(c.exit) in keys:
                segm(c, dets)
            if c.ap(metric) is not None:
                scored.append(c)
                if log:
                    log(c)
        pool = [c for c in scored[1:] if c.ap(metric) is not None]
        met = bool(pool)
        if pool:
            chosen = max(pool, key=lambda c: (round(c.ap(metric), 6), -c.macs))
        else:  # nothing within the budget: the cheapest setting there is
            chosen, dets = cands[0]
            bbox(chosen, dets)
            if metric == "segm":
                segm(chosen, dets)
    if metric == "segm" and chosen.segm_ap is None:
        chosen = replay.score(chosen.exit)
    exit_values = {k: (float(v) if k != "policy" else v) for k, v in chosen.exit.items() if k != "proposals"}
    if exit_values["policy"] == "none":
        exit_values.pop("threshold")
    proposals = int(chosen.exit.get("proposals") or 0)
    target = {"max_ap_drop": max_ap_drop} if max_ap_drop is not None else {"budget": budget}
    planned = {"bbox_ap": chosen.bbox_ap, "roi_head_gmacs": chosen.macs / 1e9, "compute_fraction": chosen.fraction}
    plain_numbers = {"bbox_ap": plain.bbox_ap, "roi_head_gmacs": plain.macs / 1e9}
    if metric == "segm":
        planned["segm_ap"], plain_numbers["segm_ap"] = chosen.segm_ap, plain.segm_ap
    calibration = DetectorCalibration(exit_values, metric, chosen.ap(metric), plain.ap(metric), planned, plain_numbers,
                                      target, met, len(replay.images), len(scored),
                                      replay.seconds + time.perf_counter() - start, proposals)
    return calibration, scored


def write_calibration(calibration: DetectorCalibration, path: str | Path, source: str = "") -> Path:
    path = Path(path)
    text = calibration.to_yaml(source).encode()
    atomic_write(path, lambda f: f.write(text))
    return path


def read_exit_config(path: str | Path) -> tuple[dict, dict]:
    """(model-section overrides, planned meta) of a file `calibrate-detector` wrote (or any YAML with a
    model.roi_head.early_exit section, and optionally model.rpn.test_post_nms); a one-line ConfigError naming the
    file otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--exit-config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"--exit-config {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    section = (((data or {}).get("model") or {}).get("roi_head") or {}).get("early_exit") if isinstance(data, dict) \
        else None
    if not isinstance(section, dict):
        raise ConfigError(f"--exit-config {path}: needs a model.roi_head.early_exit section (as "
                          "`cascadevision exits calibrate-detector` writes)")
    rpn = data["model"].get("rpn", {})
    extra = set(data) - {"model", "planned"}
    if (extra or set(data["model"]) - {"roi_head", "rpn"} or set(data["model"]["roi_head"]) != {"early_exit"}
            or not isinstance(rpn, dict) or set(rpn) - {"test_post_nms"}):
        raise ConfigError(f"--exit-config {path}: only model.roi_head.early_exit.*, model.rpn.test_post_nms (and "
                          "planned) belong there")
    exit_config(section)  # unknown keys and bad values: a ConfigError now, before any model is loaded
    if rpn and (not isinstance(rpn["test_post_nms"], int) or rpn["test_post_nms"] < 1):
        raise ConfigError(f"--exit-config {path}: model.rpn.test_post_nms must be a positive count")
    return dict(data["model"]), data.get("planned") or {}


def format_candidates(cands: list[Candidate], metric: str) -> str:
    lines = ["| proposals | policy | thr | prune | background | mask score | bbox AP | segm AP | RoIs/stage | "
             "RoI GMAC/img | % plain |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cands:
        e = c.exit
        thr = f"{e['threshold']:g}" if e["policy"] != "none" else "-"
        seg = "-" if c.segm_ap is None else f"{c.segm_ap:.1f}"
        box = "-" if c.bbox_ap is None else f"{c.bbox_ap:.1f}"
        lines.append(f"| {e.get('proposals') or 'all'} | {e['policy']} | {thr} | {e['prune_threshold']:g} | {e['background_threshold']:g} | "
                     f"{e['mask_score_threshold']:g} | {box} | {seg} | {'/'.join(map(str, c.rois))} | "
                     f"{c.macs / 1e9:.2f} | {100 * c.fraction:.1f}% |")
    return "\n".join(lines)


def load_replay(checkpoint: str, ann: str, images: str, overrides: dict | None = None, device: str = "auto",
                progress=None, class_map=None) -> DetectorReplay:
    """Record `checkpoint` (ours, or a preset with model.weights in `overrides`) on a COCO split."""
    dataset = CocoDataset(ann, images, train=False)
    model, meta = load_model(checkpoint, overrides, device)
    names, ids = checkpoint_classes(model, meta)
    mapping = match_classes(names, ids, dataset.class_names, dataset.cat_ids, class_map=class_map,
                            model_source=f"checkpoint ({checkpoint})", dataset_source=f"annotation file ({ann})",
                            num_model_classes=model.cfg.num_classes)
    return DetectorReplay(model, dataset, mapping.cat_ids, progress=progress)


__all__ = ["SEARCH_GRID", "DetectorReplay", "DetectorCalibration", "Candidate", "calibrate_detector",
           "write_calibration", "read_exit_config", "format_candidates", "grid_settings", "load_replay"]
