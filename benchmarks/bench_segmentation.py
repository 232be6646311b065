"""CASCADE segmentation on the synthetic label maps: with and without MUTATION, concatenation vs additive, and a
plain FPN-style decoder of about the same parameter count. Same data, budget, optimiser and seed for each.

    .venv/bin/python benchmarks/bench_segmentation.py [--iters 600] [--size 128] [--threads 1]

Every model is ResNet-18 (from scratch: no ImageNet weights offline) + a decoder, trained for `--iters`
iterations of batch 8 with AdamW at a constant lr (the reference's optimiser and schedule; its lr of 1e-4 is
for pretrained encoders, so from scratch we use 1e-3) and the reference's rot90/flip/rotation augmentation,
then evaluated on the val split (mIoU / mDice over the 9 classes, the argmax of the summed head logits).
Prints a markdown table: parameters, MACs per image, training time and the scores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascadevision.data import collate, generate_synthetic  # noqa: E402
from cascadevision.models.cascade_decoder import DecoderConfig, SegLossConfig  # noqa: E402
from cascadevision.segmentation import SegmentationDataset, build_segmenter, evaluate, seg_preset_config  # noqa: E402
from cascadevision.segmentation.config import FPN_R18_CHANNELS  # noqa: E402
from cascadevision.segmentation.dataset import RandomRotFlip  # noqa: E402

MUTATION = SegLossConfig(mutation=True, ce_weight=0.3, dice_weight=0.7)  # MERIT

# (name, decoder, loss)
VARIANTS = [
    ("CASCADE (concat), per-head CE+Dice", DecoderConfig("cascade"), SegLossConfig()),
    ("CASCADE (concat) + MUTATION", DecoderConfig("cascade"), MUTATION),
    ("CASCADE_Add, per-head CE+Dice", DecoderConfig("cascade_add"), SegLossConfig()),
    ("CASCADE_Add + MUTATION (MERIT)", DecoderConfig("cascade_add"), MUTATION),
    (f"FPN-style, {FPN_R18_CHANNELS} ch (params matched)", DecoderConfig("fpn", fpn_channels=FPN_R18_CHANNELS),
     SegLossConfig()),
    ("FPN-style, 128 ch (MACs matched)", DecoderConfig("fpn", fpn_channels=128), SegLossConfig()),
]


def count_macs(model: torch.nn.Module, size: int) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model([torch.rand(3, size, size)])
    return counter.get_total_flops() // 2


def train_one(model: torch.nn.Module, dataset, iters: int, batch_size: int, lr: float,
              seed: int) -> tuple[float, float]:
    """AdamW at a constant lr; returns (seconds, mean loss over the last 50 iterations)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=generator, drop_last=True)
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    while step < iters:
        for images, targets in loader:
            loss_terms = model(list(images), list(targets))
            loss = sum(loss_terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                print(f"    iter {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f}", flush=True)
            if step >= iters:
                break
    return time.perf_counter() - start, sum(losses[-50:]) / len(losses[-50:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    parser.add_argument("--only", type=int, nargs="*", help="indices of VARIANTS to run (default: all)")
    parser.add_argument("--data", default="", help="reuse a synthetic dataset directory")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = Path(args.data or tempfile.mkdtemp(prefix="bench_seg_"))
    total = args.train_images + args.val_images
    if not (data_dir / "semantic_classes.json").exists():
        generate_synthetic(data_dir, num_images=total, size=args.size, seed=0, val_fraction=args.val_images / total)
    train_set = SegmentationDataset(data_dir / "images/train", data_dir / "semantic/train", transforms=RandomRotFlip())
    val_set = SegmentationDataset(data_dir / "images/val", data_dir / "semantic/val",
                                  class_names=train_set.class_names)
    print(f"data: {len(train_set)} train / {len(val_set)} val images of {args.size}px, {train_set.num_classes} "
          f"classes; {args.iters} iterations of batch {args.batch_size}, AdamW lr {args.lr}, "
          f"{args.threads} thread(s), seed {args.seed}", flush=True)

    base = seg_preset_config("cascade_r18")
    base = dataclasses.replace(base, num_classes=train_set.num_classes, class_names=tuple(train_set.class_names),
                               input=dataclasses.replace(base.input, size=(args.size, args.size)))
    rows = []
    for index, (name, decoder, loss) in enumerate(VARIANTS):
        if args.only and index not in args.only:
            continue
        torch.manual_seed(args.seed)
        model = build_segmenter(dataclasses.replace(base, decoder=decoder, loss=loss))
        params = sum(p.numel() for p in model.parameters())
        decoder_params = sum(p.numel() for p in model.decoder.parameters()) + sum(
            p.numel() for p in model.heads.parameters())
        macs = count_macs(model, args.size)
        print(f"[{index}] {name}: {params / 1e6:.2f}M params, {macs / 1e9:.2f} GMACs", flush=True)
        seconds, final_loss = train_one(model, train_set, args.iters, args.batch_size, args.lr, seed=args.seed)
        scores = evaluate(model, val_set, progress=False)
        row = {"variant": name, "params_M": params / 1e6, "decoder_params_M": decoder_params / 1e6,
               "GMACs": macs / 1e9, "train_min": seconds / 60, "final_loss": final_loss,
               "mIoU": scores["mIoU"], "mDice": scores["mDice"], "aAcc": scores["aAcc"], "IoU": scores["IoU"]}
        rows.append(row)
        print(f"    mIoU {row['mIoU']:.2f}  mDice {row['mDice']:.2f}  aAcc {row['aAcc']:.2f}  "
              f"({row['train_min']:.1f} min)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))

    print()
    print(f"| decoder (ResNet-18, {args.size}px, {args.iters} it x {args.batch_size}) | params (decoder+heads) "
          "| GMACs | train min | mIoU | mDice | aAcc |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['params_M']:.2f}M ({r['decoder_params_M']:.2f}M) | {r['GMACs']:.2f} "
              f"| {r['train_min']:.1f} | {r['mIoU']:.2f} | {r['mDice']:.2f} | {r['aAcc']:.2f} |")
    if rows:
        names = list(rows[0]["IoU"])
        print()
        print("| per-class IoU | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for r in rows:
            print(f"| {r['variant']} | " + " | ".join(
                f"{r['IoU'][n]:.1f}" if r["IoU"][n] is not None else "-" for n in names) + " |")


if __name__ == "__main__":
    main()
