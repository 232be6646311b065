"""Inference time per image for detector presets (80 classes, random weights).

Each preset runs in its own subprocess so the peak resident memory is its own. The score threshold is set to
0 so every model keeps its full 100 detections (and runs its mask heads on them), as a trained model would;
with random weights and the default thresholds some models would otherwise detect nothing.

    python benchmarks/bench_inference.py                       # Mask R-CNN, Cascade Mask R-CNN, HTC (R-50)
    python benchmarks/bench_inference.py --presets htc_r18_fpn --size 800 1216 --threads 1
    python benchmarks/bench_inference.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

DEFAULT = ["mask_rcnn_r50_fpn_1x", "cascade_mask_rcnn_r50_fpn_1x", "htc_r50_fpn_1x"]


def measure(preset: str, height: int, width: int, runs: int, device: str, dtype: str, threads: int) -> dict:
    import resource

    import torch

    from cascadevision import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset, num_classes=80, roi_head={"test": {"score_thr": 0.0}}).eval().to(device)
    image = torch.rand(3, height, width, device=device)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype),
                              enabled=dtype != "float32")
    times = []
    with torch.inference_mode(), autocast:
        for i in range(runs + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model([image])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:  # the first run is warm-up
                times.append(time.perf_counter() - start)
    result = {"preset": preset, "size": f"{height}x{width}", "device": device, "dtype": dtype,
              "threads": torch.get_num_threads(), "median_s": statistics.median(times), "min_s": min(times),
              "detections": len(out[0]["boxes"]),
              "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
              "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.startswith("cuda"):
        result["peak_cuda_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=DEFAULT)
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.presets[0], *args.size, args.runs, args.device, args.dtype, args.threads)))
        return
    rows = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--child", "--presets", preset, "--size", *map(str, args.size),
               "--runs", str(args.runs), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mem = "peak_cuda_GiB" if args.device.startswith("cuda") else "peak_rss_GiB"
    print(f"| preset | image | device | dtype | threads | median s (of {args.runs}) | min s | params M | {mem} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['size']} | {r['device']} | {r['dtype']} | {r['threads']} | {r['median_s']:.3f} "
              f"| {r['min_s']:.3f} | {r['params_M']:.2f} | {r[mem]:.2f} |")


if __name__ == "__main__":
    main()
