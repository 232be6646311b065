"""Requests per second and latency of `cascadevision serve` under a bounded load on 127.0.0.1.

Starts the server itself (a subprocess, `--device cpu`, OMP threads as given), sends a few warm-up requests,
then for each client count sends a fixed number of requests per client, each client one request at a time
(a closed loop: a client sends its next image when the previous answer came). Reports requests/s, p50/p99
latency as the client sees it (upload, queueing, batching window, inference, JSON), the mean batch the server
formed (its /healthz counters), and the server's peak resident memory (VmHWM of its process).

The clients run on the same machine and take CPU from the server: on a small or busy machine the figures are
lower bounds; say how loaded the machine was (`uptime`).

    python benchmarks/bench_serve.py                                  # the demo HTC checkpoint, 1 and 8 clients
    python benchmarks/bench_serve.py --direct 16                      # and the same work without the server
    python benchmarks/bench_serve.py --clients 1 4 8 --requests 20 --threads 2 --max-batch 8   # stack requests
    python benchmarks/bench_serve.py --checkpoint model.onnx          # an exported file, as `serve` takes it
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # --direct imports this checkout's cascadevision
DEMO = "demo_out/htc_r18_fpn/checkpoints/final.pth"
DEMO_IMAGES = "demo_out/data/images/val"


def start_server(checkpoint: str, threads: int, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "cascadevision.cli", "serve", checkpoint, "--port", "0", "--device", "cpu",
         "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        process.kill()
        sys.exit(f"the server did not start: {line!r}")
    url = f"http://127.0.0.1:{found.group(1)}"
    for _ in range(200):
        try:
            httpx.get(url + "/healthz", timeout=5).raise_for_status()
            return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    sys.exit("the server does not answer /healthz")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (Linux /proc/PID/status VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_clients(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for n in range(requests):
                data = images[(index * requests + n) % len(images)]
                start = time.perf_counter()
                response = http.post("/predict", files={"image": ("image.png", data)})
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(response.text)

    before = httpx.get(url + "/healthz").json()["stats"]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = httpx.get(url + "/healthz").json()["stats"]
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    latencies.sort()
    forwards = after["forwards"] - before["forwards"]
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "mean_batch": (after["requests"] - before["requests"]) / max(forwards, 1)}


def run_direct(checkpoint: str, images: list[bytes], threads: int, repeats: int) -> dict:
    """The same work without the server, for comparison: decode, the model's forward, COCO results with RLE."""
    import torch

    from cascadevision.serve import decode_image, keep_scoring, load_predictor
    from cascadevision.serve.app import coco_detections

    torch.set_num_threads(threads)
    predictor = load_predictor(checkpoint, device="cpu")
    times = []
    for n in range(repeats + 1):
        start = time.perf_counter()
        prediction = predictor([decode_image(images[n % len(images)], 10**9)])[0]
        coco_detections(keep_scoring(prediction, 0.3), predictor)
        if n:  # the first is warm-up
            times.append(time.perf_counter() - start)
    times.sort()
    return {"clients": "direct, no server", "requests": len(times), "rps": len(times) / sum(times),
            "p50_ms": 1000 * statistics.median(times),
            "p99_ms": 1000 * times[min(len(times) - 1, round(0.99 * (len(times) - 1)))], "mean_batch": 1.0,
            "peak_rss_mib": peak_rss_mib(os.getpid())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEMO, help="what `cascadevision serve` loads")
    parser.add_argument("--images", default=DEMO_IMAGES, help="directory of images to send (cycled)")
    parser.add_argument("--num-images", type=int, default=8, help="how many of them")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one run each")
    parser.add_argument("--requests", type=int, default=16, help="requests per client")
    parser.add_argument("--warmup", type=int, default=3, help="requests before measuring")
    parser.add_argument("--threads", type=int, default=2, help="the server's OMP/torch threads")
    parser.add_argument("--max-batch", type=int, default=0, help="serve --max-batch (0: its default for the device)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="serve --max-wait-ms")
    parser.add_argument("--direct", type=int, default=0, metavar="N",
                        help="also time N requests' work in this process without the server (decode, forward, "
                             "COCO results), one at a time, after the server has stopped")
    args = parser.parse_args()

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = [p.read_bytes() for p in files[:args.num_images]]
    if not images:
        sys.exit(f"{args.images}: no images")
    process, url = start_server(args.checkpoint, args.threads, args.max_batch, args.max_wait_ms)
    try:
        loaded = peak_rss_mib(process.pid)
        run_clients(url, images, 1, args.warmup)
        rows = []
        for clients in args.clients:
            rows.append(run_clients(url, images, clients, args.requests))
            rows[-1]["peak_rss_mib"] = peak_rss_mib(process.pid)
        health = httpx.get(url + "/healthz").json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    if args.direct:
        rows.append(run_direct(args.checkpoint, images, args.threads, args.direct))
    load = os.getloadavg()
    print(f"model {health['model']} ({args.checkpoint}), {len(images)} images of {files[0].parent}, server: "
          f"{args.threads} threads, --max-batch {health['max_batch']} --max-wait-ms {args.max_wait_ms:g}; "
          f"server RSS after loading {loaded:.0f} MiB; load average before the end {load[0]:.2f} {load[1]:.2f} "
          f"(clients on the same machine); peak RSS: the server process's (direct: this process's)\n")
    print("| clients | requests | requests/s | p50 latency (ms) | p99 latency (ms) | mean batch | "
          "peak RSS (MiB) |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['mean_batch']:.2f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
