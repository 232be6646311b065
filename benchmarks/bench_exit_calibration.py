"""Calibrated region-level early exit, planned on one split and realised on another, with the whole detector's
wall time: one command, one table.

    python benchmarks/bench_exit_calibration.py demo_out/htc_r18_fpn/checkpoints/final.pth \
        --val-ann demo_out/data/annotations/instances_val.json --val-images demo_out/data/images/val \
        --test-ann test_seed1/annotations/instances_val.json --test-images test_seed1/images/val

The test split is synthetic data made with another seed (same classes and size as the demo's):
`cascadevision synth test_seed1 --num-images 100 --size 256 --seed 1 --val-fraction 0.8` (80 images).

For each target (max AP drop 0.5 and 1.0, budgets 0.5 and 0.3 of the plain model's RoI-head compute) the
calibrator chooses a setting on the validation split (one recorded pass, every setting replayed); then on the
test split the real model runs with that setting (`evaluate`, exactly what `cascadevision eval --exit-config`
runs) and with none (the plain model, once): realised AP and RoI-head compute beside the planned ones. Wall
time: the whole detector (transform, backbone, FPN, RPN, RoI heads, masks, pasting at full size), batch 1,
`--threads` threads, on the first `--time-images` test images; each distinct setting is timed image by image in
turn with the others (so a load change hits them alike) and the table gives the median over repeats of the mean
ms/image. A breakdown
of where the time goes (plain vs the max-AP-drop-0.5 setting) follows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--val-ann", required=True)
    parser.add_argument("--val-images", required=True)
    parser.add_argument("--test-ann", required=True)
    parser.add_argument("--test-images", required=True)
    parser.add_argument("--drops", type=float, nargs="*", default=[0.5, 1.0])
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--timing-only", action="store_true",
                        help="with --reuse: also take the realised AP and compute from it, only time")
    parser.add_argument("--reuse", default=None, metavar="JSON",
                        help="take the settings and planned numbers from an earlier run's --json (no calibration)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cascadevision.config import EarlyExitConfig
    from cascadevision.data import CocoDataset
    from cascadevision.early_exit.detection import exit_policy_for_head
    from cascadevision.early_exit.detector_calibration import calibrate_detector, load_replay
    from cascadevision.engine import evaluate

    t0 = time.perf_counter()
    if args.reuse:
        chosen = reused(args.reuse)
    else:
        replay = load_replay(args.checkpoint, args.val_ann, args.val_images, device="cpu")
        print(f"recorded {len(replay.images)} validation images in {replay.seconds:.0f} s", flush=True)
        targets = [("max AP drop", d, {"max_ap_drop": d}) for d in args.drops]
        targets += [("budget", b, {"budget": b}) for b in args.budgets]
        chosen = []
        for name, value, goal in targets:
            start = time.perf_counter()
            calibration, _ = calibrate_detector(replay, **goal)
            chosen.append((f"{name} {value:g}", calibration))
            print(f"{name} {value:g}: {calibration.model_overrides} planned {calibration.metric} AP "
                  f"{calibration.planned_ap:.2f} (plain {calibration.plain_ap:.2f}), compute "
                  f"{100 * calibration.planned['compute_fraction']:.1f}% ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        del replay

    from cascadevision.tasks.detection import load_model
    model, _ = load_model(args.checkpoint, None, "cpu")
    head, rpn = model.roi_head, model.rpn_head
    base_rpn = rpn.cfg
    dataset = CocoDataset(args.test_ann, args.test_images, train=False)

    def configure(calibration, count: bool = False) -> None:
        """The model with `calibration`'s setting, or plain (no exit policy at all; with `count` one that exits
        nothing and counts)."""
        cfg = EarlyExitConfig() if calibration is None else dataclasses.replace(EarlyExitConfig(), **calibration.exit)
        head.exit_policy = exit_policy_for_head(head, cfg) if calibration is not None or count else None
        proposals = 0 if calibration is None else calibration.proposals
        rpn.cfg = dataclasses.replace(base_rpn, test_post_nms=proposals) if proposals else base_rpn

    def run_eval(calibration):
        configure(calibration, count=True)
        metrics = evaluate(model, dataset, progress=False)
        summary = head.exit_policy.summary()
        return metrics, summary["roi_head_gmacs"] / len(dataset)

    if args.timing_only:  # the realised numbers of the earlier run
        earlier = json.loads(Path(args.reuse).read_text())
        rows, plain_metrics, plain_gmacs = earlier["rows"], earlier["plain"]["metrics"], earlier["plain"]["gmacs"]
    else:
        plain_metrics, plain_gmacs = run_eval(None)
        print(f"test split, plain model: bbox AP {plain_metrics['bbox']['AP']:.2f}"
              + (f", segm AP {plain_metrics['segm']['AP']:.2f}" if "segm" in plain_metrics else "")
              + f", {plain_gmacs:.2f} RoI-head GMAC/image", flush=True)
        rows = []
        for label, calibration in chosen:
            metrics, gmacs = run_eval(calibration)
            rows.append({"target": label, "setting": calibration.model_overrides, "metric": calibration.metric,
                         "planned_ap": calibration.planned_ap, "planned_plain_ap": calibration.plain_ap,
                         "planned_fraction": calibration.planned["compute_fraction"],
                         "realised_ap": metrics[calibration.metric]["AP"],
                         "realised_plain_ap": plain_metrics[calibration.metric]["AP"],
                         "realised_bbox_ap": metrics["bbox"]["AP"], "realised_fraction": gmacs / plain_gmacs,
                         "realised_gmacs": gmacs, "met": calibration.met})
            print(json.dumps(rows[-1]), flush=True)

    # wall time: each distinct setting once, interleaved image by image (a load change hits them alike)
    from cascadevision.data.image import load_image
    files = sorted(Path(args.test_images).iterdir())[: args.time_images]
    images = [load_image(p).float() / 255 for p in files]
    distinct = {"plain": None}
    key_of = {"plain": "plain"}
    for label, calibration in chosen:
        key = json.dumps(calibration.model_overrides, sort_keys=True)
        distinct.setdefault(key, calibration)
        key_of[label] = key
    totals = {key: [] for key in distinct}
    with torch.inference_mode():
        for key, calibration in distinct.items():  # warm-up
            configure(calibration)
            model([images[0]])
        for _ in range(args.repeats):
            spent = dict.fromkeys(distinct, 0.0)
            for image in images:
                for key, calibration in distinct.items():
                    configure(calibration)
                    start = time.perf_counter()
                    model([image])
                    spent[key] += time.perf_counter() - start
            for key in distinct:
                totals[key].append(1000 * spent[key] / len(images))
    times = {label: totals[key] for label, key in key_of.items()}
    settings = [("plain", None)] + chosen
    ms = {label: statistics.median(v) for label, v in times.items()}
    breakdown = {label: profile(model, images, configure, calibration, args.repeats)
                 for label, calibration in settings[:2]}

    metric = rows[0]["metric"] if rows else "bbox"
    load = os.getloadavg()
    print(f"\n### Calibrated early exit: {Path(args.checkpoint).name}, planned on {args.val_ann}, realised on "
          f"{args.test_ann}")
    print(f"AP is {metric} AP (the calibration target); compute is RoI-head MACs against the plain model on the same "
          "images; ms/image: whole detector, batch 1, "
          f"{args.threads} threads, {len(images)} test images, median of {args.repeats} interleaved repeats; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print(f"| target | setting | planned AP (drop) | realised AP (drop) | realised bbox AP | planned compute | "
          f"realised compute | ms/image | wall saved |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| plain model | - | {rows[0]['planned_plain_ap']:.1f} | {rows[0]['realised_plain_ap']:.1f} | "
          f"{plain_metrics['bbox']['AP']:.1f} | 100% | 100% ({plain_gmacs:.2f} GMAC) | {ms['plain']:.0f} | - |")
    for row in rows:
        setting = describe(row["setting"])
        print(f"| {row['target']} | {setting} | {row['planned_ap']:.1f} ({row['planned_plain_ap'] - row['planned_ap']:+.1f}) | "
              f"{row['realised_ap']:.1f} ({row['realised_plain_ap'] - row['realised_ap']:+.1f}) | "
              f"{row['realised_bbox_ap']:.1f} | {100 * row['planned_fraction']:.1f}% | "
              f"{100 * row['realised_fraction']:.1f}% | {ms[row['target']]:.0f} | "
              f"{100 * (1 - ms[row['target']] / ms['plain']):.1f}% |")
        row["ms_per_image"] = ms[row["target"]]
    print("\nwhere the time goes (ms/image, median over repeats):\n")
    parts = list(next(iter(breakdown.values())))
    print("| setting | " + " | ".join(parts) + " |")
    print("|---|" + "---|" * len(parts))
    for label, part in breakdown.items():
        print(f"| {label} | " + " | ".join(f"{part[p]:.1f}" for p in parts) + " |")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ms": ms, "breakdown": breakdown,
                                               "plain": {"metrics": plain_metrics, "gmacs": plain_gmacs},
                                               "load": load}, indent=2))


def reused(path: str) -> list:
    """(label, calibration-like) pairs from an earlier run's --json: settings and planned numbers."""
    from types import SimpleNamespace

    out = []
    for row in json.loads(Path(path).read_text())["rows"]:
        setting = row["setting"]
        out.append((row["target"], SimpleNamespace(
            model_overrides=setting, exit=setting["roi_head"]["early_exit"],
            proposals=setting.get("rpn", {}).get("test_post_nms", 0), metric=row["metric"],
            planned_ap=row["planned_ap"], plain_ap=row["planned_plain_ap"],
            planned={"compute_fraction": row["planned_fraction"]}, met=row["met"])))
    return out


def describe(setting: dict) -> str:
    e = setting["roi_head"]["early_exit"]
    parts = []
    if e.get("policy", "none") != "none":
        parts.append(f"{e['policy']} {e['threshold']:g}")
    for key, name in (("prune_threshold", "prune"), ("background_threshold", "bg"),
                      ("mask_score_threshold", "mask>=")):
        if e.get(key):
            parts.append(f"{name} {e[key]:g}")
    if "rpn" in setting:
        parts.append(f"{setting['rpn']['test_post_nms']} proposals")
    return ", ".join(parts) or "none"


def profile(model, images, configure, calibration, repeats) -> dict:
    """ms/image per part of the detector: the stages called one by one, as TwoStageDetector.forward does."""
    import torch

    head = model.roi_head
    configure(calibration)
    parts = ["transform", "backbone+FPN", "RPN", "semantic", "box stages", "masks", "pasting", "total"]
    samples = {p: [] for p in parts}
    original_masks = head._predict_masks
    clock = {"masks": 0.0}

    def timed_masks(*a, **k):
        start = time.perf_counter()
        out = original_masks(*a, **k)
        clock["masks"] += time.perf_counter() - start
        return out

    head._predict_masks = timed_masks
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                sums = dict.fromkeys(parts, 0.0)
                for image in images:
                    clock["masks"] = 0.0
                    t0 = time.perf_counter()
                    batch, sizes, scales, _ = model.transform([image], None)
                    t1 = time.perf_counter()
                    features = model.extract_features(batch)
                    t2 = time.perf_counter()
                    proposals, _ = model.rpn_head(features, sizes)
                    t3 = time.perf_counter()
                    if head.semantic_head is not None:
                        head.semantic_head(features)
                    t4 = time.perf_counter()
                    detections = head.predict(features, proposals, sizes)  # runs the semantic head again
                    t5 = time.perf_counter()
                    test = model.cfg.roi_head.test
                    model.transform.postprocess(detections, scales, [tuple(image.shape[-2:])], test.mask_thr, "full")
                    t6 = time.perf_counter()
                    sums["transform"] += t1 - t0
                    sums["backbone+FPN"] += t2 - t1
                    sums["RPN"] += t3 - t2
                    sums["semantic"] += t4 - t3
                    sums["box stages"] += t5 - t4 - clock["masks"] - (t4 - t3)
                    sums["masks"] += clock["masks"]
                    sums["pasting"] += t6 - t5
                    sums["total"] += t6 - t0 - (t4 - t3)
                for p in parts:
                    samples[p].append(1000 * sums[p] / len(images))
    finally:
        head._predict_masks = original_masks
    return {p: statistics.median(v) for p, v in samples.items()}


if __name__ == "__main__":
    sys.exit(main())
