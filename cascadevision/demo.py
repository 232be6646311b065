"""`cascadevision demo`: synthetic data -> train a small detector -> COCO evaluation -> pictures.

Sized to finish in under 10 minutes on a 2-core CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import Config, update
from .data.synth import generate_synthetic
from .presets import load_config
from .tasks.detection import format_metrics, run_prediction, run_training

DEMO_RECIPE = "demo_htc_r18"  # cascadevision/configs/demo_htc_r18.yaml: the model and training recipe
DEMO_IMAGES = 400
DEMO_SIZE = 256  # the synthetic images' side; the recipe's model.input.scale matches it


def demo_config(data_dir: Path, preset: str, max_iters: int | None = None, seed: int = 0) -> Config:
    """The demo recipe (`configs/demo_htc_r18.yaml`) for `preset`, on the synthetic dataset in `data_dir`.

    The recipe: the small CPU preset at half width (ResNet-18 base width 32, 64-channel FPN and mask convs, 96
    sampled RoIs per image: several times fewer multiply-accumulates per training step than the plain r18
    preset, which is what fits the time budget), trained from scratch with AdamW and a cosine schedule, which
    learns far more in a few hundred steps from random weights than the reference SGD recipe (made for
    ImageNet-initialised backbones): at 400 steps HTC segm AP 20 -> 47. Another `max_iters` than the recipe's
    scales the warm-up (at most a quarter of the run) and the checkpoint interval (a third of the run).
    """
    changes: dict = {"model": {"preset": preset}, "train": {"seed": seed}}
    if max_iters is not None:
        recipe = load_config(DEMO_RECIPE).train
        changes["train"].update(max_iters=max_iters, warmup_iters=min(recipe.warmup_iters, max_iters // 4),
                                checkpoint_interval=max(max_iters // 3, 1))
    changes["data"] = {
        "train_ann": str(data_dir / "annotations" / "instances_train.json"),
        "train_images": str(data_dir / "images" / "train"),
        "val_ann": str(data_dir / "annotations" / "instances_val.json"),
        "val_images": str(data_dir / "images" / "val"),
    }
    return load_config(DEMO_RECIPE, changes)


def run_demo(out: str | Path = "demo_out", *, num_images: int | None = None, max_iters: int | None = None,
             preset: str = "htc_r18_fpn", baseline: str | None = "mask_rcnn_r18_fpn", progress: bool = True,
             seed: int = 0) -> dict:
    """Train `preset` (HTC with its semantic branch on the synthetic label maps) and, on the same budget,
    `baseline`; evaluate both, draw the main model's predictions, print the AP table and the files."""
    out = Path(out)
    start = time.time()
    data_dir = out / "data"
    models = [preset] + ([baseline] if baseline else [])
    steps = len(models) + 3
    print(f"[1/{steps}] synthetic dataset -> {data_dir}")
    paths = generate_synthetic(data_dir, num_images=num_images or DEMO_IMAGES, size=DEMO_SIZE, seed=0)
    results = {}
    for step, name in enumerate(models, start=2):
        cfg = demo_config(data_dir, name, max_iters, seed)
        if cfg.model.roi_head.htc.with_semantic:
            # the semantic head is sized from the label maps (the training task counts their labels)
            cfg = update(cfg, {"data": {"train_semantic": paths["train_semantic"]}})
        run_dir = out / name
        print(f"[{step}/{steps}] training {name} for {cfg.train.max_iters} iterations -> {run_dir}")
        began = time.time()
        resume = (run_dir / "checkpoints" / "latest.pth").exists()  # a demo run again continues its runs
        metrics = run_training(cfg, run_dir, resume=resume, overwrite=not resume, progress=progress)
        results[name] = {"bbox": metrics.get("bbox", {}), "segm": metrics.get("segm", {}),
                         "minutes": round((time.time() - began) / 60, 2), "run_dir": str(run_dir)}
    print(f"[{steps - 1}/{steps}] evaluation on the validation split (same data, seed and iterations)")
    for name, r in results.items():
        print(format_metrics(r, title=name) + f"\n  trained and evaluated in {r['minutes']:.1f} min\n")
    pictures = out / "predictions"
    val_images = sorted((data_dir / "images" / "val").iterdir())[:8]
    print(f"[{steps}/{steps}] {preset} predictions on {len(val_images)} validation images -> {pictures}")
    run_prediction(out / preset / "checkpoints" / "final.pth", [str(p) for p in val_images], pictures,
                   progress=progress)
    elapsed = time.time() - start
    summary = {"models": results, "seconds": round(elapsed, 1), "predictions": str(pictures)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    main_dir = out / preset
    print(f"done in {elapsed / 60:.1f} min. Files:\n"
          f"  checkpoints      {main_dir / 'checkpoints'}\n"
          f"  metrics log      {main_dir / 'metrics.jsonl'}\n"
          f"  loss curve       {main_dir / 'loss_curve.png'}\n"
          f"  COCO metrics     {main_dir / 'eval' / 'metrics.json'}\n"
          f"  prediction PNGs  {pictures}\n"
          f"  summary          {out / 'summary.json'}")
    return summary
