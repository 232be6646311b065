"""CPU bf16 autocast against fp32: training-step and inference time of detectors, and the AP of a checkpoint.

    python benchmarks/bench_precision.py                                  # HTC R-50 and the demo model, 800x1216
    python benchmarks/bench_precision.py --presets htc_r18_fpn --size 512 768 --repeats 5
    python benchmarks/bench_precision.py --skip-timing --checkpoint runs/demo/htc_r18_fpn/checkpoints/final.pth \\
        --ann DATA/annotations/instances_val.json --images DATA/images/val

Timing: random weights, 80 classes, one image of --size (each model first resizes it to fit its
`model.input.scale`: 1333x800 for the R-50 presets, 512x320 for the small ones), score threshold 0 at inference
(every model keeps its 100 detections, as a trained one would); a training step is forward + backward + SGD step on 3 gt objects (HTC
also gets a semantic map). Each number is the median of --repeats after one warm-up, on --threads threads.
AP: `cascadevision eval` of --checkpoint in fp32 and in bf16 (`--dtype bf16`), bbox and segm AP.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cascadevision.models import build_model  # noqa: E402
from gpu_check import training_targets  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
DEMO = Path("demo_out")


def time_preset(preset: str, height: int, width: int, repeats: int) -> dict:
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(preset, num_classes=80, roi_head={"test": {"score_thr": 0.0}})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    image = torch.rand(3, height, width)
    targets = training_targets(1, height, width, device)
    if not model.cfg.roi_head.htc.with_semantic:
        targets = [{k: v for k, v in t.items() if k != "semantic"} for t in targets]
    result = {"scale": model.cfg.input.scale}  # the model resizes the image to fit this (long, short) first
    for name, dtype in DTYPES.items():
        def train_step():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                losses = model([image], targets)
            optimizer.zero_grad(set_to_none=True)
            sum(v for k, v in losses.items() if "loss" in k).backward()
            optimizer.step()

        def infer():
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                model([image])

        model.train()
        result[("train", name)] = median_seconds(train_step, repeats)
        model.eval()
        result[("infer", name)] = median_seconds(infer, repeats)
    return result




def ap_by_dtype(checkpoint: str, ann: str, images: str) -> dict:
    from cascadevision.tasks.detection import run_evaluation
    return {name: run_evaluation(checkpoint, ann, images, None, device="cpu", progress=False, dtype=name)
            for name in ("fp32", "bf16")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["htc_r50_fpn_1x", "htc_r18_fpn"])
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-ap", action="store_true")
    parser.add_argument("--checkpoint", default=str(DEMO / "htc_r18_fpn/checkpoints/final.pth"))
    parser.add_argument("--ann", default=str(DEMO / "data/annotations/instances_val.json"))
    parser.add_argument("--images", default=str(DEMO / "data/images/val"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if not args.skip_timing:
        height, width = args.size
        print(f"CPU, {args.threads} thread(s), one {height}x{width} image, median of {args.repeats}, "
              f"load average at start {load:.1f}")
        print("| model | resized to fit | what | fp32 s | bf16 s | bf16 speed-up |")
        print("|---|---|---|---|---|---|")
        for preset in args.presets:
            result = time_preset(preset, height, width, args.repeats)
            for what in ("train", "infer"):
                fp32, bf16 = result[(what, "fp32")], result[(what, "bf16")]
                label = "training step" if what == "train" else "inference"
                fit = "x".join(map(str, result["scale"]))
                print(f"| {preset} | {fit} | {label} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x |", flush=True)
        print(f"(load average at the end {os.getloadavg()[0]:.1f})")
    if not args.skip_ap:
        metrics = ap_by_dtype(args.checkpoint, args.ann, args.images)
        print(f"\nAP of {args.checkpoint} on {args.ann}, evaluated in fp32 and under bf16 autocast")
        print("| dtype | bbox AP | bbox AP50 | segm AP | segm AP50 |")
        print("|---|---|---|---|---|")
        for name, m in metrics.items():
            segm = m.get("segm", {})
            print(f"| {name} | {m['bbox']['AP']:.1f} | {m['bbox']['AP50']:.1f} | {segm.get('AP', float('nan')):.1f} "
                  f"| {segm.get('AP50', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
