"""Op and model times on a quiet and on a busy machine, with OpenMP's default wait policy and with PASSIVE.

    python benchmarks/bench_under_load.py                 # 4 configurations, about 3-5 minutes on 2 cores
    python benchmarks/bench_under_load.py --busy 1 --repeats 3

Each configuration runs in a fresh subprocess, because OpenMP reads OMP_WAIT_POLICY once, when torch is first
imported: "default" has the variable unset (idle threads spin a while before sleeping), "PASSIVE" sets it.
"Busy" starts `--busy` pure-Python spin loops beside the measuring process (they stop on their own after a
bounded time and are always terminated when the configuration ends). Times are medians of up to `--repeats`
runs after one warm-up; an op stops early once its runs take more than `--op-budget` seconds, and the
number of runs is shown. Other processes on the machine also count: the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESET = "htc_r18_fpn"
SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def measure(repeats: int, op_budget: float) -> dict:
    """Run in the child: times (ms) of each op, with the settings this process started with."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cascadevision import build_model
    from cascadevision.ops import nms, roi_align

    generator = torch.Generator().manual_seed(0)

    def clustered_boxes(num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes jittered around num // 20 objects in an 800x1216 image, like pre-NMS detections."""
        centres = torch.rand(max(num // 20, 1), 2, generator=generator) * torch.tensor([1216.0, 800.0])
        sizes = 16 + torch.rand(len(centres), 2, generator=generator) * 300
        pick = torch.randint(0, len(centres), (num,), generator=generator)
        centre = centres[pick] + torch.randn(num, 2, generator=generator) * 0.1 * sizes[pick]
        half = sizes[pick] / 2 * (1 + 0.1 * torch.randn(num, 2, generator=generator)).clamp_min(0.5)
        return torch.cat([centre - half, centre + half], 1), torch.rand(num, generator=generator)

    features = torch.randn(1, 256, 100, 152, generator=generator)  # stride 8 of an 800x1216 image
    boxes, _ = clustered_boxes(1000)
    rois = torch.cat([torch.zeros(1000, 1), boxes.clamp_min(0)], 1)  # (1000, 5)
    torch.manual_seed(0)
    model = build_model(PRESET, num_classes=80, roi_head={"test": {"score_thr": 0.0}}).eval()
    width, height = model.cfg.input.scale  # the preset's default input size
    image = torch.rand(3, height, width, generator=generator)
    cases = {}
    for num in (2000, 10000):
        b, s = clustered_boxes(num)
        cases[f"nms {num} boxes, IoU 0.5"] = lambda b=b, s=s: nms(b, s, 0.5)
    cases["roi_align 1000 RoIs, 256 ch, 14x14"] = lambda: roi_align(features, rois, 14, 1 / 8, sampling_ratio=0)

    def infer():
        with torch.inference_mode():
            model([image])
    cases[f"{PRESET} inference, {height}x{width}"] = infer
    times = {}
    for name, fn in cases.items():
        fn()  # warm-up
        runs = []
        while len(runs) < repeats and sum(runs) < op_budget:
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        times[name] = (statistics.median(runs) * 1e3, len(runs))
    return {"times": times, "threads": torch.get_num_threads(), "policy": os.environ.get("OMP_WAIT_POLICY")}


def run_configuration(policy: str | None, busy: int, args) -> dict:
    """One fresh child process with OMP_WAIT_POLICY=`policy` (None: unset), beside `busy` spin loops."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats), "--op-budget", str(args.op_budget)]
    spinners = []
    try:
        for _ in range(busy):
            code = SPIN.format(seconds=args.child_timeout + 10)  # bounded even if this process is killed
            spinners.append(subprocess.Popen([sys.executable, "-c", code]))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=args.child_timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", type=int, default=2, help="busy background processes in the loaded runs")
    parser.add_argument("--op-budget", type=float, default=10.0, help="seconds of runs per op before stopping")
    parser.add_argument("--child-timeout", type=int, default=150)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeats, args.op_budget)))
        return
    load = os.getloadavg()
    began = time.time()
    configs = [(f"quiet, {name}", policy, 0) for name, policy in (("default", None), ("PASSIVE", "PASSIVE"))]
    configs += [(f"{args.busy} busy, {name}", policy, args.busy)
                for name, policy in (("default", None), ("PASSIVE", "PASSIVE"))]
    results = {}
    for label, policy, busy in configs:
        results[label] = run_configuration(policy, busy, args)
        print(f"  {label}: done ({time.time() - began:.0f} s)", file=sys.stderr)
    threads = {r["threads"] for r in results.values()}
    print(f"{os.cpu_count()} CPUs, load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), "
          f"torch threads {', '.join(map(str, sorted(threads)))}; ms, median of up to {args.repeats} runs "
          f"(runs in brackets when fewer); 'default' = OMP_WAIT_POLICY unset; total {time.time() - began:.0f} s\n")
    print("| op | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for op in next(iter(results.values()))["times"]:
        cells = []
        for result in results.values():
            ms, runs = result["times"][op]
            cells.append(f"{ms:.1f}" + (f" ({runs})" if runs < args.repeats else ""))
        print(f"| {op} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
