"""Time the hot ops on realistic sizes and print a markdown table: median (and min) over several runs.

    python benchmarks/bench_ops.py            # all cores, then 1 thread
    python benchmarks/bench_ops.py --quick    # fewer runs

RoIAlign: 1000 RoIs of one 800x1216 image with log-uniform sizes 16-800 px, pooled from 4 FPN levels
(strides 4/8/16/32, 256 channels) at 7x7 and 14x14 with sampling_ratio=0, as the box and mask heads do.
Mask targets: 128 large RoIs cropped from 10 full-resolution gt masks at 28x28 (one channel).
NMS: random boxes around N / 20 objects (many overlaps), IoU 0.5 and 0.7, and 80-class batched NMS.
Other processes on the machine inflate the numbers (the load average is printed); compare the min column.
OMP_WAIT_POLICY defaults to PASSIVE here: on a shared machine, OpenMP threads that spin between parallel regions
fight other processes for the cores and make multi-threaded runs of small ops up to 1000x slower. Run with
OMP_WAIT_POLICY=ACTIVE to measure the default policy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cascadevision.ops import batched_nms, multi_scale_roi_align, nms, paste_masks, roi_align  # noqa: E402

IMAGE_H, IMAGE_W = 800, 1216
STRIDES = (4, 8, 16, 32)


def median_ms(fn, runs: int) -> tuple[float, float]:
    """(median, min) wall time of `fn` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def random_rois(num: int, generator: torch.Generator) -> torch.Tensor:
    """(num, 5) RoIs of image 0: log-uniform scale 16-800 px, aspect ratio 1:2 to 2:1, clipped to the image."""
    scale = torch.exp(torch.empty(num).uniform_(0, 1, generator=generator) * (torch.log(torch.tensor(800 / 16)))) * 16
    ratio = torch.exp(torch.empty(num).uniform_(-0.69, 0.69, generator=generator))
    w, h = scale * ratio.sqrt(), scale / ratio.sqrt()
    cx = torch.rand(num, generator=generator) * IMAGE_W
    cy = torch.rand(num, generator=generator) * IMAGE_H
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, IMAGE_W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, IMAGE_H)
    return torch.cat([torch.zeros(num, 1), boxes], 1)


def clustered_boxes(num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes jittered around num // 20 objects, like pre-NMS detections; scores uniform."""
    objects = random_rois(max(num // 20, 1), generator)[:, 1:]
    pick = torch.randint(0, objects.shape[0], (num,), generator=generator)
    size = (objects[pick, 2:] - objects[pick, :2]).repeat(1, 2)
    boxes = objects[pick] + torch.randn(num, 4, generator=generator) * 0.1 * size
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes, torch.rand(num, generator=generator)


def run(runs: int) -> list[tuple[str, float]]:
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(1, 256, IMAGE_H // s, IMAGE_W // s, generator=generator) for s in STRIDES]
    features_cl = [f.contiguous(memory_format=torch.channels_last) for f in features]
    rois = random_rois(1000, generator)
    rows = []
    for size in (7, 14):
        rows.append((f"multi_scale_roi_align 1000 RoIs, 256 ch, {size}x{size} (NCHW features)",
                     median_ms(lambda: multi_scale_roi_align(features, rois, size, STRIDES), runs)))
        rows.append((f"multi_scale_roi_align 1000 RoIs, 256 ch, {size}x{size} (channels_last features)",
                     median_ms(lambda: multi_scale_roi_align(features_cl, rois, size, STRIDES), runs)))
    for name, maps in (("NCHW", features), ("channels_last", features_cl)):
        leaves = [f.clone().requires_grad_() for f in maps]  # clone keeps the memory format

        def forward_backward():
            for f in leaves:
                f.grad = None
            multi_scale_roi_align(leaves, rois[:512], 7, STRIDES).sum().backward()
        rows.append((f"multi_scale_roi_align 512 RoIs 7x7, forward + backward ({name} features)",
                     median_ms(forward_backward, runs)))
    gt_masks = (torch.rand(10, 1, IMAGE_H, IMAGE_W, generator=generator) > 0.5).float()
    mask_rois = random_rois(128, generator)
    mask_rois[:, 0] = torch.randint(0, 10, (128,), generator=generator).float()
    rows.append(("roi_align mask targets: 128 RoIs, 28x28, from 10 gt masks 800x1216",
                 median_ms(lambda: roi_align(gt_masks, mask_rois, 28), runs)))
    for num in (2000, 10000):
        boxes, scores = clustered_boxes(num, generator)
        for iou in (0.5, 0.7):
            rows.append((f"nms {num} boxes, IoU {iou}", median_ms(lambda: nms(boxes, scores, iou), runs)))
        classes = torch.randint(0, 80, (num,), generator=generator)
        rows.append((f"batched_nms {num} boxes, 80 classes, IoU 0.5",
                     median_ms(lambda: batched_nms(boxes, scores, classes, 0.5), runs)))
    masks = torch.rand(100, 28, 28, generator=generator)
    boxes = random_rois(100, generator)[:, 1:]
    rows.append(("paste_masks 100 masks 28x28 into 800x1216",
                 median_ms(lambda: paste_masks(masks, boxes, (IMAGE_H, IMAGE_W)), runs)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 runs per op instead of 10")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the 1-thread column")
    args = parser.parse_args()
    runs = 3 if args.quick else 10
    threads = torch.get_num_threads()
    results = run(runs)
    single = None
    if not args.no_single_thread and threads > 1:
        torch.set_num_threads(1)
        single = run(runs)
        torch.set_num_threads(threads)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, CPU with {os.cpu_count()} cores{load}, OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}; ms, median (min) of {runs} runs\n")
    print(f"| op | {threads} threads |" + (" 1 thread |" if single else ""))
    print("|---|---:|" + ("---:|" if single else ""))
    for i, (name, times) in enumerate(results):
        cells = [times] + ([single[i][1]] if single else [])
        print(f"| {name} | " + " | ".join(f"{median:.1f} ({best:.1f})" for median, best in cells) + " |")


if __name__ == "__main__":
    main()
