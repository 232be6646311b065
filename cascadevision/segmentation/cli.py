"""`cascadevision segment train|eval|predict|presets`: semantic segmentation from the command line.

    cascadevision segment train cascade_r18 --train-images D/images/train --train-labels D/semantic/train \\
        --val-images D/images/val --val-labels D/semantic/val --out runs/seg [--set train.max_iters=500] [--resume]
    cascadevision segment eval runs/seg/checkpoints/final.pth --images D/images/val --labels D/semantic/val
    cascadevision segment predict runs/seg/checkpoints/final.pth D/images/val --out preds
"""
from __future__ import annotations

import argparse

from ..commands import SEGMENTATION


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `segment` command (with its own sub-commands) to a `add_subparsers()` object."""
    parser = subparsers.add_parser("segment", help="semantic segmentation: CASCADE decoder (train, eval, predict)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    SEGMENTATION.add_all(parser.add_subparsers(dest="segment_command", required=True))
    return parser


def run(args: argparse.Namespace) -> int:
    return SEGMENTATION.run(args.segment_command, args)
