"""EfficientViT and HAT-Net: counts against the published numbers, CPU throughput, and attention cost.

    python benchmarks/bench_attention.py                 # all four tables
    python benchmarks/bench_attention.py --tables a,c    # a subset
    python benchmarks/bench_attention.py --quick         # fewer repetitions, smaller sizes (a smoke run)

(a) parameters and MACs of EfficientViT M0-M5 and HAT-Net Tiny-Large against the published numbers
    (counted on the meta device: shapes only);
(b) EfficientViT images/s on the CPU, batch 16 at 224x224, BN folded, 1 and 2 threads (the reference's CPU
    protocol is 1 thread, batch 16);
(c) cascaded group attention vs standard multi-head self-attention of the same width (C=256, 4 heads), both
    over all tokens of an s x s map, plus CGA in 7x7 windows as EfficientViT uses it: time and peak memory;
(d) H-MHSA (HAT-Net-Small stage 1: C=64, head_dim 64, 8x8 grids, keys pooled 8x8) vs global MHSA as the
    token count grows: time and peak memory.

Peak memory is the largest total of live tensors during one forward pass, from torch.profiler's allocation
records at operator granularity (weights and the input excluded). Times are medians of several runs in
inference mode. On a shared machine the timings are noisy: the load average is printed with each table.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)
from cascadevision.macs import count_macs  # noqa: E402
from cascadevision.models.classifier import count_parameters  # noqa: E402
from cascadevision.models.efficientvit import (  # noqa: E402
    EFFICIENTVIT_CONFIGS, CascadedGroupAttention, LocalWindowAttention, build_efficientvit, fuse_bn)
from cascadevision.models.hatnet import HATNET_CONFIGS, HMHSA, build_hatnet  # noqa: E402

EFFICIENTVIT_PUBLISHED = {  # params (M), MACs (M) [README "FLOPs"], top-1
    "m0": (2.3, 79, 63.2), "m1": (3.0, 167, 68.4), "m2": (4.2, 201, 70.8),
    "m3": (6.9, 263, 73.4), "m4": (8.8, 299, 74.3), "m5": (12.4, 522, 77.1),
}
HATNET_PUBLISHED = {  # params (M), GFLOPs, top-1 [README]
    "tiny": (12.7, 2.0, 79.8), "small": (25.7, 4.3, 82.6), "medium": (42.9, 8.3, 84.0), "large": (63.1, 11.5, 84.2),
}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"




def peak_memory_bytes(fn) -> int:
    """Largest sum of live tensor bytes allocated by `fn` (op granularity), from the profiler's memory records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2 ** 20:,.1f}"


# ----------------------------------------------------------------------------------------------------------
# (a) counts


def conv_linear_and_matmul_macs(model: nn.Module, x: Tensor) -> tuple[int, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    matmul = sum(v for k, v in by_op.items() if k in ("aten.bmm", "aten.mm", "aten.matmul"))
    return sum(by_op.values()) - matmul, matmul


def mmcv_elementwise(model: nn.Module, x: Tensor) -> int:
    """What mmcv's get_model_complexity_info adds to conv/linear MACs: conv bias adds, 2 ops per (affine)
    GroupNorm element, 1 per average-pooled input element."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            total += output.numel()
        elif isinstance(module, nn.GroupNorm):
            total += 2 * output.numel()
        elif isinstance(module, nn.AvgPool2d):
            total += inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def table_counts() -> None:
    print("### (a) Parameters and MACs at 224x224 vs published\n")
    print("| model | params (M) | published | MACs (M), all matmul work | of which attention q.k, attn.v "
          "| published \"FLOPs\" (M) | top-1 (published) |")
    print("|---|---|---|---|---|---|---|")
    for name in EFFICIENTVIT_CONFIGS:
        with torch.device("meta"):
            model = build_efficientvit(name).eval()
            x = torch.empty(1, 3, 224, 224)
            total = count_macs(model, x)
            _, matmul = conv_linear_and_matmul_macs(model, x)
        params, macs, top1 = EFFICIENTVIT_PUBLISHED[name]
        print(f"| EfficientViT-{name.upper()} | {count_parameters(model) / 1e6:.3f} | {params} "
              f"| {total / 1e6:.1f} | {matmul / 1e6:.1f} | {macs} | {top1} |")
    print()
    print("| model | params (M) | published | GMACs, all matmul work | of which attention | conv+linear only "
          "| conv+linear + mmcv elementwise | published GFLOPs | top-1 (published) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in HATNET_CONFIGS:
        with torch.device("meta"):
            model = build_hatnet(name).eval()
            x = torch.empty(1, 3, 224, 224)
            conv_linear, matmul = conv_linear_and_matmul_macs(model, x)
            extra = mmcv_elementwise(model, x)
        params, gflops, top1 = HATNET_PUBLISHED[name]
        print(f"| HAT-Net-{name.capitalize()} | {count_parameters(model) / 1e6:.3f} | {params} "
              f"| {(conv_linear + matmul) / 1e9:.3f} | {matmul / 1e9:.3f} | {conv_linear / 1e9:.3f} "
              f"| {(conv_linear + extra) / 1e9:.3f} | {gflops} | {top1} |")
    print()


# ----------------------------------------------------------------------------------------------------------
# (b) throughput


def table_throughput(runs: int, batch: int = 16) -> None:
    print(f"### (b) EfficientViT CPU throughput, batch {batch}, 224x224, BN folded, eager, inference mode\n")
    print(f"{load()}\n")
    print("| model | MACs (M) | 1 thread: img/s | 2 threads: img/s | README (1 thread, their CPU) |")
    print("|---|---|---|---|---|")
    readme_cpu = {"m0": "228.4"}
    x = torch.randn(batch, 3, 224, 224)
    for name in EFFICIENTVIT_CONFIGS:
        model = fuse_bn(build_efficientvit(name))
        rates = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                seconds = median_seconds(lambda: model(x), runs, warmup=2)
            rates.append(batch / seconds)
        print(f"| EfficientViT-{name.upper()} | {EFFICIENTVIT_PUBLISHED[name][1]} | {rates[0]:.1f} | {rates[1]:.1f} "
              f"| {readme_cpu.get(name, 'n/a')} |")
    torch.set_num_threads(1)
    print()


# ----------------------------------------------------------------------------------------------------------
# (c) CGA vs MHSA


class MultiHeadSelfAttention(nn.Module):
    """Standard MHSA on a (B, C, H, W) map: 1x1 conv to q, k, v (C each), heads of C/heads, 1x1 projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, 3, self.num_heads, self.head_dim, -1).unbind(1)  # (B, h, hd, N)
        attn = (q.transpose(-2, -1) @ k) * self.head_dim ** -0.5  # (B, h, N, N)
        out = v @ attn.softmax(dim=-1).transpose(-2, -1)  # (B, h, hd, N)
        return self.proj(out.reshape(batch, channels, height, width))


def measure(module: nn.Module, x: Tensor, runs: int) -> tuple[float, float, int]:
    """(ms per forward, peak MiB of activations, MACs)."""
    with torch.inference_mode():
        seconds = median_seconds(lambda: module(x), runs)
        peak = peak_memory_bytes(lambda: module(x))
    return seconds * 1e3, peak, count_macs(module, x)


def table_cga_vs_mhsa(runs: int, sides: list[int], dim: int = 256, heads: int = 4, batch: int = 4) -> None:
    torch.set_num_threads(1)
    print(f"### (c) Cascaded group attention vs MHSA, width C={dim}, {heads} heads, batch {batch}, 1 thread\n")
    print(f"CGA: key dim 16, value dim C/heads = {dim // heads}, q depthwise 5x5, bias tables; MHSA: head dim "
          f"{dim // heads} for q, k and v. BN folded. {load()}\n")
    print("| map | tokens | MHSA ms | CGA ms | CGA 7x7 windows ms | MHSA MMACs | CGA MMACs | CGA win MMACs "
          "| MHSA peak MiB | CGA peak MiB | CGA win peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        torch.manual_seed(0)
        x = torch.randn(batch, dim, side, side)
        mhsa = MultiHeadSelfAttention(dim, heads).eval()
        cga = fuse_bn(CascadedGroupAttention(dim, 16, heads, side, (5, 5, 5, 5)))
        windowed = fuse_bn(LocalWindowAttention(dim, 16, heads, None, 7, (5, 5, 5, 5)))
        results = [measure(m, x, runs) for m in (mhsa, cga, windowed)]
        times = " | ".join(f"{r[0]:.1f}" for r in results)
        macs = " | ".join(f"{r[2] / 1e6:.0f}" for r in results)
        peaks = " | ".join(mib(r[1]) for r in results)
        print(f"| {side}x{side} | {side * side} | {times} | {macs} | {peaks} |")
    print()


# ----------------------------------------------------------------------------------------------------------
# (d) H-MHSA vs global MHSA


def table_hmhsa_vs_mhsa(runs: int, sides: list[int], dim: int = 64, head_dim: int = 64, grid: int = 8,
                        ratio: int = 8, batch: int = 1) -> None:
    torch.set_num_threads(1)
    print(f"### (d) H-MHSA vs global MHSA, C={dim}, head dim {head_dim}, grid {grid}x{grid}, keys pooled "
          f"{ratio}x{ratio}, batch {batch}, 1 thread\n")
    print(f"Global MHSA is the same module with G=1 (q, k, v from one 1x1 conv over all tokens). {load()}\n")
    print("| map | tokens | global keys of H-MHSA | MHSA ms | H-MHSA ms | speed-up | MHSA MMACs | H-MHSA MMACs "
          "| MHSA peak MiB | H-MHSA peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        torch.manual_seed(0)
        x = torch.randn(batch, dim, side, side)
        hierarchical = HMHSA(dim, head_dim, grid, ratio).eval()
        plain = copy.deepcopy(hierarchical)
        plain.grid_size = 1  # shares norm/qkv/proj; the unused global q/kv convs do not run
        (t_plain, m_plain, c_plain), (t_h, m_h, c_h) = (measure(m, x, runs) for m in (plain, hierarchical))
        print(f"| {side}x{side} | {side * side} | {(side // ratio) ** 2} | {t_plain:.1f} | {t_h:.1f} "
              f"| {t_plain / t_h:.1f}x | {c_plain / 1e6:.0f} | {c_h / 1e6:.0f} | {mib(m_plain)} | {mib(m_h)} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--quick", action="store_true", help="fewer runs and sizes (a smoke run)")
    args = parser.parse_args()
    tables = set(args.tables.split(","))
    runs = 2 if args.quick else 5
    print(f"torch {torch.__version__}, {load()}\n")
    if "a" in tables:
        table_counts()
    if "b" in tables:
        table_throughput(runs)
    if "c" in tables:
        table_cga_vs_mhsa(runs, [7, 14] if args.quick else [7, 14, 28, 56])
    if "d" in tables:
        table_hmhsa_vs_mhsa(runs, [32, 64] if args.quick else [32, 56, 64, 96, 112])


if __name__ == "__main__":
    main()
