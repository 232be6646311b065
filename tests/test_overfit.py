"""A tiny HTC (semantic branch on) must memorise a handful of synthetic images: the whole training path
(RPN, three interleaved stages, mask information flow, semantic fusion, losses, optimiser) has to work."""
import pytest
import torch

from cascadevision.config import Config, update
from cascadevision.data import CocoDataset, generate_synthetic
from cascadevision.engine import evaluate, train
from cascadevision.models import build_from_config
from cascadevision.models.presets import preset_config

ITERS = 400


@pytest.mark.slow
def test_tiny_htc_overfits_a_few_images(tmp_path):
    paths = generate_synthetic(tmp_path / "data", num_images=4, size=128, seed=5, val_fraction=0.0)
    dataset = CocoDataset(paths["train_ann"], paths["train_images"], train=True, semantic_dir=paths["train_semantic"])
    cfg = update(Config(model=preset_config("htc_r18_fpn")), {
        "model": {
            "num_classes": dataset.num_classes, "input": {"scale": [128, 128]},
            "backbone": {"base_channels": 16}, "neck": {"out_channels": 32}, "rpn": {"feat_channels": 32, "anchor_scales": [4]},
            "roi_head": {"box_head": {"fc_channels": 128}, "mask_head": {"conv_channels": 32},
                         "sampler": {"num_samples": 64}, "htc": {"semantic_num_classes": 9}},
        },
        "data": {"batch_size": 4, "num_workers": 0, "flip_prob": 0.0},
        "train": {"max_iters": ITERS, "lr": 0.02, "warmup_iters": 30, "lr_steps": [int(ITERS * 0.8)],
                  "checkpoint_interval": 0, "log_interval": 50, "eval_at_end": False, "grad_clip": 10.0},
    })
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    train(cfg, model, dataset, tmp_path / "run", progress=False)
    metrics = evaluate(model, CocoDataset(paths["train_ann"], paths["train_images"], train=False), progress=False)
    assert metrics["segm"]["AP"] >= 90, metrics
    assert metrics["bbox"]["AP"] >= 90, metrics
