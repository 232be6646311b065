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
                     "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    full = rows[0]["gmacs"]
    print("\n| setting | bbox AP | segm AP | RoIs per stage | RoI-head GMAC | saved vs full | eval s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        segm = f"{r['segm_AP']:.1f}" if r["segm_AP"] is not None else "-"
        print(f"| {r['setting']} | {r['bbox_AP']:.1f} | {segm} | {'/'.join(map(str, r['rois']))} | {r['gmacs']:.1f} "
              f"| {100 * (1 - r['gmacs'] / full):.1f}% | {r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
