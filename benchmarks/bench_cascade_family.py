"""Same-budget comparison on the synthetic dataset: Mask R-CNN vs Cascade Mask R-CNN vs HTC without semantic
vs HTC, plus HTC's ablation switches added one at a time to Cascade Mask R-CNN (as in the HTC paper's Table 2).

Every variant uses the demo's small model (half-width ResNet-18 FPN), the same data, seed, schedule and number
of iterations. Prints a markdown table and writes it as JSON.

    python benchmarks/bench_cascade_family.py --iters 600 --out /tmp/family
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cascadevision.config import update
from cascadevision.demo import DEMO_SIZE, demo_config

VARIANTS = {
    "Mask R-CNN": ("mask_rcnn_r18_fpn", {}),
    "Cascade Mask R-CNN": ("cascade_mask_rcnn_r18_fpn", {}),
    # rows 3-5 use HTC's own settings (low-quality matching on, score_thr 0.001), so the step from row 2
    # to row 3 includes those two differences besides interleaving
    "+ interleaved": ("htc_without_semantic_r18_fpn", {"htc": {"mask_info_flow": False}}),
    "+ mask info flow (HTC w/o semantic)": ("htc_without_semantic_r18_fpn", {}),
    "+ semantic fusion (HTC)": ("htc_r18_fpn", {}),
}


def main() -> None:
    from cascadevision.data import generate_synthetic
    from cascadevision.pipeline import run_training

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--out", default="/tmp/cascade_family")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "annotations" / "instances_val.json").exists():
        generate_synthetic(data, num_images=args.num_images, size=DEMO_SIZE, seed=0)
    rows = []
    for name in args.variants:
        preset, head = VARIANTS[name]
        cfg = demo_config(data, preset, args.iters)
        cfg = update(cfg, {"model": {"roi_head": head}, "train": {"checkpoint_interval": 0}})
        start = time.time()
        metrics = run_training(cfg, out / name.replace(" ", "_").replace("/", ""), progress=False)
        row = {"variant": name, "preset": preset, **{f"{k}_{m}": metrics[k][m] for k in ("bbox", "segm")
                                                     for m in ("AP", "AP50", "AP75")},
               "train_min": (time.time() - start) / 60}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "family.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{args.iters} iterations, batch 4, {args.num_images} synthetic images ({DEMO_SIZE}px)\n")
    print("| variant | bbox AP | segm AP | segm AP50 | segm AP75 | train+eval min |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['bbox_AP']:.1f} | {r['segm_AP']:.1f} | {r['segm_AP50']:.1f} | "
              f"{r['segm_AP75']:.1f} | {r['train_min']:.1f} |")


if __name__ == "__main__":
    main()
