"""One GPU check: the numbers a person with one GPU pastes into an issue, in one table, in under 8 minutes.

    python benchmarks/gpu_check.py              # on CUDA: full sizes (HTC R-50 at 1333x800, EfficientViT batch 2048)
    python benchmarks/gpu_check.py --small      # tiny sizes, seconds (the default when there is no CUDA)

Rows (random weights; inference keeps every RoI the test config allows, score threshold 0 as a trained model
would have 100 detections per image):
  1. HTC R-50 inference img/s at batch 1 and 8 in fp32, bf16 and fp16 (autocast; fp16 is CUDA only).
  2. One HTC R-50 training iteration at batch 2 (3 gt objects per image): seconds and peak memory
     (torch.cuda.max_memory_allocated; on CPU not measured here, see bench_with_cp_memory.py), fp32/bf16,
     with and without backbone.with_cp.
  3. EfficientViT M0-M5 classifiers, img/s at batch 2048 (224x224), BN folded into the convs (`fuse_bn`), under
     autocast (fp16 on CUDA, bf16 on CPU), beside the paper's V100 numbers (its speed test: BN folded, traced,
     batch 2048 AMP).
  4. Early-exit compaction (`early_exit.execution.compact`) against the full model on one batch, with thresholds
     set so that half the samples still running leave at each exit (an untrained 4-stage multi-exit ResNet).
Times are medians over the timed repeats after warm-up; CUDA is synchronised around each.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cascadevision.early_exit.config import ExitModelConfig  # noqa: E402
from cascadevision.early_exit.execution import compact, run_full, simulate  # noqa: E402
from cascadevision.early_exit.models import build_exit_model  # noqa: E402
from cascadevision.early_exit.policies import THRESHOLD_POLICY_CLASSES  # noqa: E402
from cascadevision.models import build_model  # noqa: E402
from cascadevision.models.efficientvit import build_efficientvit  # noqa: E402

# /work/shared/reference/cascade_attention_spec.md, table 1.5 (the paper's README): V100 img/s
PUBLISHED_V100 = {"m0": 27644, "m1": 20093, "m2": 18218, "m3": 16644, "m4": 15914, "m5": 10621}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Sizes:
    preset: str
    image: tuple[int, int]  # (height, width)
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    vit_batch: int
    vit_variants: tuple[str, ...]
    exit_batch: int
    exit_width: int
    num_classes: int = 80
    model: dict = dataclasses.field(default_factory=dict)  # model config overrides


FULL = Sizes("htc_r50_fpn_1x", (800, 1333), (1, 8), 10, 3, 2048, tuple(PUBLISHED_V100), 4096, 64)
TINY_MODEL = {"input": {"scale": [64, 64]}, "backbone": {"base_channels": 8}, "neck": {"out_channels": 32},
              "rpn": {"feat_channels": 16, "test_pre_nms": 100, "test_post_nms": 50, "train_pre_nms": 100,
                      "train_post_nms": 50},
              "roi_head": {"box_head": {"fc_channels": 32}, "mask_head": {"conv_channels": 16},
                           "sampler": {"num_samples": 32}, "test": {"max_per_img": 10},
                           "htc": {"semantic_num_classes": 8}}}
SMALL = Sizes("htc_r18_fpn", (48, 64), (1, 2), 1, 1, 2, ("m0",), 32, 8, num_classes=4, model=TINY_MODEL)


def _detector(sizes: Sizes, **changes):
    model = _merge(sizes.model, changes)
    return build_model(sizes.preset, num_classes=sizes.num_classes, **model)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def dtypes_here(device: torch.device) -> list[str]:
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


# ----------------------------------------------------------------------------------------------------------


def detector_inference(sizes: Sizes, device: torch.device) -> list[tuple[str, str, str]]:
    torch.manual_seed(0)
    model = _detector(sizes, roi_head={"test": {"score_thr": 0.0}}).eval().to(device)
    rows = []
    height, width = sizes.image
    for batch in sizes.batches:
        images = [torch.rand(3, height, width, device=device) for _ in range(batch)]
        for name in ["fp32", "bf16", "fp16"]:
            if name not in dtypes_here(device):
                rows.append((f"{sizes.preset} inference {width}x{height} batch {batch}", name, "n/a (CUDA only)"))
                continue

            def run():
                with torch.inference_mode(), autocast(device, DTYPES[name]):
                    model(images)

            seconds = timed(run, device, sizes.repeats, sizes.warmup)
            rows.append((f"{sizes.preset} inference {width}x{height} batch {batch}", name,
                         f"{batch / seconds:.2f} img/s"))
    return rows


def training_targets(batch: int, height: int, width: int, device: torch.device) -> list[dict]:
    targets = []
    for i in range(batch):
        boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.7], [0.3, 0.6, 0.6, 0.95]])
        boxes = boxes * torch.tensor([width, height, width, height])
        masks = torch.zeros(3, height, width, dtype=torch.uint8)
        semantic = torch.zeros(height, width, dtype=torch.long)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
            semantic[y1:y2, x1:x2] = k + 1
        targets.append({"boxes": boxes.to(device), "labels": torch.tensor([0, 1, 2], device=device),
                        "masks": masks.to(device), "semantic": semantic.to(device), "image_id": i,
                        "orig_size": (height, width)})
    return targets


def detector_training(sizes: Sizes, device: torch.device) -> list[tuple[str, str, str]]:
    height, width = sizes.image
    rows = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = _detector(sizes, backbone={"with_cp": with_cp}).train().to(device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        images = [torch.rand(3, height, width, device=device) for _ in range(2)]
        targets = training_targets(2, height, width, device)
        for name in ("fp32", "bf16"):
            def step():
                with autocast(device, DTYPES[name]):
                    losses = model(images, targets)
                optimizer.zero_grad(set_to_none=True)
                sum(v for k, v in losses.items() if "loss" in k).backward()
                optimizer.step()

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(step, device, max(sizes.repeats // 2, 1), sizes.warmup)
            memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak" if device.type == "cuda"
                      else "memory: see bench_with_cp_memory.py")
            rows.append((f"{sizes.preset} train iteration batch 2{' with_cp' if with_cp else ''}", name,
                         f"{seconds:.3f} s  {memory}"))
        del model, optimizer
    return rows


def efficientvit_throughput(sizes: Sizes, device: torch.device) -> list[tuple[str, str, str]]:
    dtype_name = "fp16" if device.type == "cuda" else "bf16"
    rows = []
    for variant in sizes.vit_variants:
        torch.manual_seed(0)
        model = build_efficientvit(variant).to(device).eval().fuse()  # BN folded into the convs and the head
        images = torch.randn(sizes.vit_batch, 3, 224, 224, device=device)

        def run():
            with torch.inference_mode(), autocast(device, DTYPES[dtype_name]):
                model(images)

        seconds = timed(run, device, sizes.repeats, sizes.warmup)
        rows.append((f"EfficientViT-{variant.upper()} batch {sizes.vit_batch}, BN folded", dtype_name,
                     f"{sizes.vit_batch / seconds:,.0f} img/s  (V100 published: {PUBLISHED_V100[variant]:,})"))
        del model, images
    return rows


def early_exit_speedup(sizes: Sizes, device: torch.device) -> list[tuple[str, str, str]]:
    torch.manual_seed(0)
    cfg = ExitModelConfig(num_stages=4, base_width=sizes.exit_width, in_channels=3, num_classes=100)
    model = build_exit_model(cfg).to(device).eval()
    x = torch.randn(sizes.exit_batch, 3, 32, 32, device=device)
    # thresholds: the median confidence of the samples reaching each exit, so half of them leave there
    logits = simulate(model, x, THRESHOLD_POLICY_CLASSES["max_prob"]((2.0,) * 3)).all_logits
    alive = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    thresholds = []
    for k in range(3):
        confidence = logits[k].softmax(-1).amax(-1)
        thresholds.append(float(confidence[alive].median()))
        alive &= confidence < thresholds[-1]
    policy = THRESHOLD_POLICY_CLASSES["max_prob"](tuple(thresholds))
    full = timed(lambda: run_full(model, x), device, sizes.repeats, sizes.warmup)
    early = timed(lambda: compact(model, x, policy), device, sizes.repeats, sizes.warmup)
    counts = compact(model, x, policy).exit_counts()
    return [(f"early-exit compaction, batch {sizes.exit_batch}, exits {counts}", "fp32",
             f"{full / early:.2f}x faster than the full model ({early * 1e3:.1f} vs {full * 1e3:.1f} ms)")]


def format_table(rows: list[tuple[str, str, str]], header: str) -> str:
    widths = [max(len(r[i]) for r in rows + [("what", "dtype", "result")]) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [header, line(("what", "dtype", "result")), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes (default when CUDA is not available)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=["inference", "training", "efficientvit", "exits"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = SMALL if args.small or device.type != "cuda" else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    start = time.perf_counter()
    rows = []
    for key, part in (("inference", detector_inference), ("training", detector_training),
                      ("efficientvit", efficientvit_throughput), ("exits", early_exit_speedup)):
        if key not in args.skip:
            rows += part(sizes, device)
            print(f"[{key} done, {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    table = format_table(rows, f"gpu_check on {name}, torch {torch.__version__}, "
                               f"{'small' if sizes is SMALL else 'full'} sizes, {time.perf_counter() - start:.0f} s")
    print(table)
    return table


if __name__ == "__main__":
    main()
