"""Export and compile: what it costs and what it gives, per detector family, on the CPU.

    python benchmarks/bench_export.py                      # both tables
    python benchmarks/bench_export.py --tables export --families htc_r18_fpn --repeats 3
    python benchmarks/bench_export.py --tables compile
    python benchmarks/bench_export.py --tables dense --dense cascade_r18,efficientvit_m0,efficientvit_m4

(a) export: per family, the time of torch.export and of the ONNX conversion, the ONNX file size, the agreement
    of onnxruntime with eager PyTorch on synthetic images (same count; max box and score difference; min mask
    IoU) and the latency of onnxruntime (CPU provider) vs eager PyTorch on the same image, both with 2 threads.
    Families are randomly initialised (seed 0) at their preset's input scale, except `demo` (the trained
    demo checkpoint, htc_r18_fpn) and htc_r50_fpn_1x, which runs on an 800x1216 image.
(dense) the dense models (`export.dense`): a segmentation preset at its input size, EfficientViT classifiers at
    224x224 (1000 classes): the export time (torch.export + ONNX conversion), the .onnx size, the max |ORT - eager|
    over the output logits on batches of 1 and 4 (and the same for the loaded ExportedProgram), and eager vs
    onnxruntime latency for a batch of 1 and of 8, 2 threads. Randomly initialised (seed 0), norm layers'
    affines and statistics drawn away from their init (zero-init BatchNorms would make the logits ~0 and the
    agreement meaningless); `max abs logit` gives the scale of the differences.
(b) compile: eager vs `--compile` (export.compile.compile_model, inductor, dynamic shapes) latency, the first
    compiled call's time (compilation included), and one training step (forward + backward), eager vs compiled.

Times are medians of --repeats runs after one warm-up; the load average is printed with each table (the
machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)
from cascadevision.export import export_program, onnx_bytes, _metadata, preprocess  # noqa: E402
from cascadevision.export.compile import compile_model  # noqa: E402
from cascadevision.export.detection import DetectionGraph  # noqa: E402
from cascadevision.export.runtime import load_exported  # noqa: E402
from cascadevision.models import build_model  # noqa: E402
from cascadevision.tasks.detection import DETECTION  # noqa: E402

DEMO = Path("demo_out/htc_r18_fpn/checkpoints/final.pth")
FAMILIES = ["faster_rcnn_r18_fpn", "mask_rcnn_r18_fpn", "cascade_rcnn_r18_fpn", "cascade_mask_rcnn_r18_fpn",
            "htc_without_semantic_r18_fpn", "htc_r18_fpn", "mask_rcnn_efficientvit_m4_fpn", "demo", "htc_r50_fpn_1x"]
BIG = (800, 1216)  # the image size the issue measures HTC R50 at


def load(name: str):
    torch.manual_seed(0)
    if name == "demo":
        model, _ = DETECTION.model_from_checkpoint(DEMO, device="cpu")
        return model
    return build_model(name, num_classes=80 if "r50" in name else 4,
                       roi_head={"test": {"score_thr": 0.05 if "r50" in name else 0.02}}).eval()


def test_images(name: str, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sizes = [BIG] if "r50" in name else [(320, 480), (300, 400), (410, 290)][:count]
    out = []
    for h, w in sizes:
        image = torch.rand(3, h, w, generator=g) * 0.3
        image[:, h // 4: h // 2, w // 5: w // 2] += 0.6
        out.append(image.clamp(0, 1))
    return out




def agreement(got: dict, want: dict) -> tuple[float, float, float, bool]:
    same = len(got["scores"]) == len(want["scores"]) and torch.equal(got["labels"], want["labels"])
    if not same or not len(want["scores"]):
        return float("nan"), float("nan"), float("nan"), same
    box = (got["boxes"] - want["boxes"]).abs().max().item()
    score = (got["scores"] - want["scores"]).abs().max().item()
    iou = 1.0
    if "masks" in want:
        inter = (got["masks"] & want["masks"]).flatten(1).sum(1).double()
        union = (got["masks"] | want["masks"]).flatten(1).sum(1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).min().item()
    return box, score, iou, same


def load_avg() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def export_table(families: list[str], repeats: int, folder: Path) -> None:
    print(f"\n### export ({load_avg()}, torch {torch.__version__}, 2 threads for latency)\n")
    print("| family | torch.export s | ONNX conversion s | .onnx MB | images | same count+labels | max box diff px "
          "| max score diff | min mask IoU | eager ms | ORT ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in families:
        torch.set_num_threads(2)
        model = load(name)
        images = test_images(name, 3)
        example, info = preprocess(images[0], model.cfg.input)
        args = (example, info["image_size"])
        start = time.perf_counter()
        program = export_program(DetectionGraph(model).eval(), args, model.cfg.input.size_divisor)
        t_export = time.perf_counter() - start
        start = time.perf_counter()
        data = onnx_bytes(program, args, _metadata(model, model.class_names, [], name))
        t_onnx = time.perf_counter() - start
        path = folder / f"{name}.onnx"
        path.write_bytes(data)
        ort_model = load_exported(path, threads=2)
        rows = []
        with torch.inference_mode():
            for image in images:
                rows.append(agreement(ort_model([image])[0], model([image])[0]))
            eager_ms = median_seconds(lambda: model([images[0]]), repeats) * 1000
            ort_ms = median_seconds(lambda: ort_model([images[0]]), repeats) * 1000
        box = max(r[0] for r in rows)
        score = max(r[1] for r in rows)
        iou = min(r[2] for r in rows)
        same = all(r[3] for r in rows)
        size = "x".join(str(s) for s in images[0].shape[-2:])
        print(f"| {name} | {t_export:.1f} | {t_onnx:.1f} | {len(data) / 2**20:.1f} | {len(images)} ({size}, ...) | "
              f"{same} | {box:.2e} | {score:.2e} | {iou:.4f} | {eager_ms:.0f} | {ort_ms:.0f} |", flush=True)


DENSE = ["cascade_r18", "efficientvit_m0", "efficientvit_m4"]


def randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.rand(m.bias.shape, generator=g) - 0.5
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean = torch.randn(m.running_mean.shape, generator=g) * 0.1
                m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model.eval()


def dense_table(names: list[str], repeats: int, folder: Path) -> None:
    from cascadevision.export.dense import SegmentationGraph, export_classifier, export_segmenter
    from cascadevision.export.runtime import load_dense
    from cascadevision.models.efficientvit import build_efficientvit
    from cascadevision.segmentation.model import build_segmenter
    from cascadevision.segmentation.presets import seg_preset_config

    print(f"\n### dense models ({load_avg()}, torch {torch.__version__}, 2 threads for latency)\n")
    print("| model | input | export s (onnx) | export s (.pt2) | .onnx MB | max abs logit | max abs diff ORT | "
          "max abs diff .pt2 | eager ms b1 | ORT ms b1 | eager ms b8 | ORT ms b8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        torch.set_num_threads(2)
        torch.manual_seed(0)
        if name.startswith("efficientvit_"):
            model = randomise_norms(build_efficientvit(name))
            size = (224, 224)
            module = model

            def export(path, fmt, model=model):
                return export_classifier(model, path, fmt, input_size=224, preset=name)
        else:
            model = randomise_norms(build_segmenter(seg_preset_config(name)))
            size = tuple(model.input_cfg.size)
            module = SegmentationGraph(model).eval()

            def export(path, fmt, model=model):
                return export_segmenter(model, path, fmt, preset=name)
        times = {}
        for fmt, suffix in (("onnx", ".onnx"), ("exported-program", ".pt2")):
            start = time.perf_counter()
            export(folder / f"{name}{suffix}", fmt)
            times[fmt] = time.perf_counter() - start
        ort_model = load_dense(folder / f"{name}.onnx", threads=2)
        pt2_model = load_dense(folder / f"{name}.pt2")
        g = torch.Generator().manual_seed(1)
        batches = {n: torch.randn(n, 3, *size, generator=g) for n in (1, 4, 8)}
        diff_ort = diff_pt2 = scale = 0.0
        with torch.inference_mode():
            for n in (1, 4):
                want = module(batches[n])
                scale = max(scale, want.abs().max().item())
                diff_ort = max(diff_ort, (ort_model(batches[n])["logits"] - want).abs().max().item())
                diff_pt2 = max(diff_pt2, (pt2_model(batches[n])["logits"] - want).abs().max().item())
            lat = {(kind, n): median_seconds(lambda: fn(batches[n]), repeats) * 1000
                   for kind, fn in (("eager", module), ("ort", ort_model)) for n in (1, 8)}
        mb = (folder / f"{name}.onnx").stat().st_size / 2**20
        print(f"| {name} | {size[0]}x{size[1]} | {times['onnx']:.1f} | {times['exported-program']:.1f} | {mb:.1f} | "
              f"{scale:.2f} | {diff_ort:.1e} | {diff_pt2:.1e} | {lat['eager', 1]:.1f} | {lat['ort', 1]:.1f} | "
              f"{lat['eager', 8]:.1f} | {lat['ort', 8]:.1f} |", flush=True)


def compile_table(repeats: int) -> None:
    print(f"\n### compile ({load_avg()}, inductor, dynamic=True, 2 threads)\n")
    print("| model | image | eager ms | first compiled call s | compiled ms | speed-up |")
    print("|---|---|---|---|---|---|")
    torch.set_num_threads(2)
    for name in ("demo", "htc_r50_fpn_1x"):
        model = load(name)
        image = test_images(name, 1)[0]
        with torch.inference_mode():
            eager = median_seconds(lambda: model([image]), repeats)
            torch._dynamo.reset()
            compile_model(model)
            start = time.perf_counter()
            model([image])
            first = time.perf_counter() - start
            compiled = median_seconds(lambda: model([image]), repeats)
        size = "x".join(str(s) for s in image.shape[-2:])
        print(f"| {name} | {size} | {eager * 1000:.0f} | {first:.1f} | {compiled * 1000:.0f} | "
              f"{eager / compiled:.2f}x |", flush=True)
    # one training step of the demo model: two 320x480 images with one box and mask each
    model = load("demo").train()
    images = test_images("demo", 2)[:2]
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        mask = torch.zeros(1, h, w, dtype=torch.uint8)
        mask[0, h // 4: h // 2, w // 5: w // 2] = 1
        targets.append({"boxes": torch.tensor([[w // 5, h // 4, w // 2, h // 2]], dtype=torch.float32),
                        "labels": torch.tensor([0]), "masks": mask,
                        "semantic": torch.zeros(h, w, dtype=torch.uint8)})

    def step():
        losses = model(images, targets)
        sum(v for k, v in losses.items() if "loss" in k).backward()
        model.zero_grad(set_to_none=True)

    eager = median_seconds(step, repeats)
    torch._dynamo.reset()
    compile_model(model)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    compiled = median_seconds(step, repeats)
    print(f"| demo train step (batch 2) | 320x480, 300x400 | {eager * 1000:.0f} | {first:.1f} | {compiled * 1000:.0f} "
          f"| {eager / compiled:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="export,compile")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dense", default=",".join(DENSE), help="the dense models of --tables dense")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tables = args.tables.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "export" in tables:
            export_table(args.families.split(","), args.repeats, Path(tmp))
        if "dense" in tables:
            dense_table(args.dense.split(","), args.repeats, Path(tmp))
    if "compile" in tables:
        compile_table(args.repeats)


if __name__ == "__main__":
    main()
