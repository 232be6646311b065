"""Region-level early exit in a trained cascade: bbox/segm AP against RoI-head compute for several thresholds,
next to the full cascade, on the synthetic validation split.

    python benchmarks/bench_detection_exit.py demo_out/htc_r18_fpn/checkpoints/final.pth \
        --ann demo_out/data/annotations/instances_val.json --images demo_out/data/images/val
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    from cascadevision.pipeline import run_evaluation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--ann", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--policy", default="max_prob")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.99, 0.95, 0.9, 0.8, 0.6])
    parser.add_argument("--background", type=float, default=0.99, help="drop RoIs with P(background) >= this")
    parser.add_argument("--prune", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3],
                        help="pruner thresholds: stop refining RoIs whose best class probability is below this")
    parser.add_argument("--combined", type=float, default=0.9,
                        help="policy threshold used together with each prune threshold")
    parser.add_argument("--time-images", type=int, default=20,
                        help="also time the model alone on this many validation images (batch 1), 0 to skip")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    settings = [("full cascade", {"policy": "none", "background_threshold": 0.0})]
    settings += [(f"background >= {args.background} dropped", {"policy": "none",
                                                                "background_threshold": args.background})]
    settings += [(f"{args.policy} {t} + background", {"policy": args.policy, "threshold": t,
                                                        "background_threshold": args.background})
                 for t in args.thresholds]
    settings += [(f"prune < {p} + background", {"policy": "none", "prune_threshold": p,
                                                 "background_threshold": args.background}) for p in args.prune]
    settings += [(f"{args.policy} {args.combined} + prune < {p} + background",
                  {"policy": args.policy, "threshold": args.combined, "prune_threshold": p,
                   "background_threshold": args.background}) for p in args.prune]
    rows = []
    for name, exit_cfg in settings:
        start = time.perf_counter()
        metrics = run_evaluation(args.checkpoint, args.ann, args.images, None,
                                 overrides={"roi_head": {"early_exit": exit_cfg}}, progress=False)
        summary = metrics["early_exit"]
        rows.append({"setting": name, "bbox_AP": metrics["bbox"]["AP"], "segm_AP": metrics.get("segm", {}).get("AP"),
                     "rois": summary["rois"], "gmacs": summary["roi_head_gmacs"],
                     "seconds": time.perf_counter() - start,
                     "ms_per_image": time_model(args, exit_cfg) if args.time_images else None})
        print(json.dumps(rows[-1]), flush=True)
    full = rows[0]["gmacs"]
    print("\n| setting | bbox AP | segm AP | RoIs per stage | RoI-head GMAC | saved vs full | ms/image | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        segm = f"{r['segm_AP']:.1f}" if r["segm_AP"] is not None else "-"
        print(f"| {r['setting']} | {r['bbox_AP']:.1f} | {segm} | {'/'.join(map(str, r['rois']))} | {r['gmacs']:.1f} "
              f"| {100 * (1 - r['gmacs'] / full):.1f}% | {r['ms_per_image'] or 0:.0f} | {r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def time_model(args, exit_cfg: dict) -> float:
    """Median milliseconds per image of the whole detector (batch 1, masks included) with this exit setting."""
    import statistics
    from pathlib import Path

    import torch

    from cascadevision.data.image import load_image
    from cascadevision.pipeline import load_model

    model, _ = load_model(args.checkpoint, {"roi_head": {"early_exit": exit_cfg}})
    device = next(model.parameters()).device
    files = sorted(Path(args.images).iterdir())[: args.time_images]
    images = [load_image(p).to(device).float() / 255 for p in files]
    times = []
    with torch.inference_mode():
        model([images[0]])  # warm-up
        for image in images:
            start = time.perf_counter()
            model([image])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
