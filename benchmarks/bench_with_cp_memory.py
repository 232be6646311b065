"""Peak resident memory of one detector training step on CPU, with and without `backbone.with_cp`.

    python benchmarks/bench_with_cp_memory.py                                # HTC R-50, one 800x1216 image
    python benchmarks/bench_with_cp_memory.py --preset htc_r18_fpn --size 512 768 --dtype bf16

Each setting runs in its own process (peak RSS, `resource.getrusage(RUSAGE_SELF).ru_maxrss`, only grows): it
builds the model (random weights, 80 classes), runs one warm-up step and one measured step (forward, backward,
SGD), and reports the peak RSS, the RSS after building the model and before the first step (weights, optimizer,
libraries) and the difference, which is what the step itself needed. The backbone is trained as in the preset
(frozen stem and layer1, BatchNorm in eval mode); with_cp checkpoints every ResNet block that gets gradients.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(preset: str, height: int, width: int, with_cp: bool, dtype: str) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cascadevision.models import build_model
    from gpu_check import training_targets

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(preset, num_classes=80, backbone={"with_cp": with_cp}).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    image = torch.rand(3, height, width)
    targets = training_targets(1, height, width, torch.device("cpu"))
    if not model.cfg.roi_head.htc.with_semantic:
        targets = [{k: v for k, v in t.items() if k != "semantic"} for t in targets]

    def rss_now_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            losses = model([image], targets)
        optimizer.zero_grad(set_to_none=True)
        sum(v for k, v in losses.items() if "loss" in k).backward()
        optimizer.step()

    before = rss_now_mib()
    start = time.perf_counter()
    step()  # warm-up: optimizer state, allocator pools
    step()
    seconds = (time.perf_counter() - start) / 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB
    return {"preset": preset, "with_cp": with_cp, "dtype": dtype, "before_MiB": before, "peak_MiB": peak,
            "step_MiB": peak - before, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="htc_r50_fpn_1x")
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        preset, height, width, with_cp, dtype = args.child
        print(json.dumps(child(preset, int(height), int(width), with_cp == "1", dtype)))
        return
    height, width = args.size
    rows = []
    for with_cp in (False, True):
        out = subprocess.run([sys.executable, __file__, "--child", args.preset, str(height), str(width),
                              "1" if with_cp else "0", args.dtype], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.preset}, one {height}x{width} image, {args.dtype}, CPU 1 thread, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| with_cp | RSS before the step (MiB) | peak RSS (MiB) | peak - before (MiB) | step time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['with_cp'] else 'off'} | {r['before_MiB']:.0f} | {r['peak_MiB']:.0f} | "
              f"{r['step_MiB']:.0f} | {r['step_s']:.1f} |")
    saved = rows[0]["step_MiB"] - rows[1]["step_MiB"]
    print(f"with_cp saves {saved:.0f} MiB of the step's {rows[0]['step_MiB']:.0f} MiB "
          f"({100 * saved / rows[0]['step_MiB']:.0f}%)")


if __name__ == "__main__":
    main()
