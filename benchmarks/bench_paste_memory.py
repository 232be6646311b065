"""Peak memory of turning 100 detections' 28x28 mask probabilities into full-image masks on big photos.

    python benchmarks/bench_paste_memory.py            # 12 MP and 24 MP
    python benchmarks/bench_paste_memory.py --quick    # 12 MP only, and 'before' with fewer detections

Each case runs in its own subprocess and reports its peak resident memory (VmHWM) above what the process held
once torch was loaded and the inputs were made, and its wall time:

- before: the float paste of all detections, then `>= mask_thr` (what the model did before: N x H x W float32);
- bool masks: `paste_masks(..., threshold=mask_thr)`, the model's default output now (N x H x W bool, pasted a
  float chunk at a time);
- RLE, chunked: `results_to_coco` on the model's `mask_output="probs"` output (paste + encode one chunk at a
  time, never N x H x W).

'before' at 24 MP would need about 12 GB, too much on a shared machine: it is measured with 10 and 25
detections and extrapolated linearly to 100 (marked "extrapolated"). Detections: boxes with log-uniform sides
from 2% to 80% of the image, masks a soft blob each (so RLEs have realistic lengths), one thread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cascadevision.engine.evaluator import results_to_coco  # noqa: E402
from cascadevision.ops import paste_masks  # noqa: E402

NUM_DETECTIONS = 100
SIZES = {"12 MP": (3000, 4000), "24 MP": (4000, 6000)}
MASK_THR = 0.5


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def detections(num: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sides = torch.empty(num, 2).uniform_(math.log(0.02), math.log(0.8), generator=generator).exp()
    wh = sides * torch.tensor([width, height])
    xy = torch.rand(num, 2, generator=generator) * (torch.tensor([width, height]) - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    grid = (torch.arange(28) + 0.5) / 28
    centre = 0.3 + 0.4 * torch.rand(num, 2, generator=generator)
    spread = 0.15 + 0.2 * torch.rand(num, 1, 1, generator=generator)
    dist = (grid[None, :, None] - centre[:, 1, None, None]) ** 2 + (grid[None, None, :] - centre[:, 0, None, None]) ** 2
    return torch.exp(-dist / (2 * spread ** 2)), boxes  # (N, 28, 28), (N, 4)


def child(case: str, num: int, height: int, width: int) -> None:
    torch.set_num_threads(1)
    masks, boxes = detections(num, height, width)
    prediction = {"boxes": boxes, "labels": torch.zeros(num, dtype=torch.long), "scores": torch.ones(num),
                  "mask_probs": masks, "image_size": (height, width), "mask_thr": MASK_THR}
    base = peak_kib()
    start = time.perf_counter()
    if case == "before":
        out = paste_masks(masks, boxes, (height, width)) >= MASK_THR
    elif case == "bool":
        out = paste_masks(masks, boxes, (height, width), threshold=MASK_THR)
    else:
        out = results_to_coco([prediction], [1], [1])
    seconds = time.perf_counter() - start
    del out
    print(json.dumps({"peak_mib": (peak_kib() - base) / 1024, "seconds": seconds}))


def measure(case: str, num: int, height: int, width: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", case, str(num), str(height), str(width)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, num, height, width = args.child
        child(case, int(num), int(height), int(width))
        return
    sizes = {"12 MP": SIZES["12 MP"]} if args.quick else SIZES
    print(f"{NUM_DETECTIONS} detections, 28x28 masks, mask_thr {MASK_THR}; peak RSS above the inputs (MiB), "
          "wall time (s), one thread\n")
    print("| image | path | peak MiB | time s |")
    print("|---|---|---:|---:|")
    for name, (height, width) in sizes.items():
        if name == "24 MP" or args.quick:  # too big to run in full on a shared machine: extrapolate
            few, more = measure("before", 10, height, width), measure("before", 25, height, width)
            per = {k: (more[k] - few[k]) / 15 for k in ("peak_mib", "seconds")}
            before = {k: more[k] + per[k] * (NUM_DETECTIONS - 25) for k in per}
            label = "before: float paste + threshold (extrapolated from 10 and 25)"
        else:
            before, label = measure("before", NUM_DETECTIONS, height, width), "before: float paste + threshold"
        print(f"| {name} {height}x{width} | {label} | {before['peak_mib']:.0f} | {before['seconds']:.1f} |")
        for case, label in (("bool", "bool masks, chunked paste"), ("rle", "RLE, chunked paste + encode")):
            result = measure(case, NUM_DETECTIONS, height, width)
            print(f"| {name} {height}x{width} | {label} | {result['peak_mib']:.0f} | {result['seconds']:.1f} |")


if __name__ == "__main__":
    main()
