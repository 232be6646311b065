"""What the server runs: a `Predictor` is a model (ours, or an exported file's runner) with its class names and
category ids, called on decoded images. The server knows nothing else about the model.

    predictor = load_predictor("runs/demo/checkpoints/final.pth", device="cpu")
    predictions = predictor([uint8_image])  # [{'boxes', 'labels', 'scores', 'masks' or 'mask_probs', ...}]
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import EXPORTED_SUFFIXES
from ..engine.evaluator import deferred_mask_pasting
from ..engine.trainer import resolve_device
from ..errors import CheckpointError
from ..tasks.detection import checkpoint_classes, load_model



@dataclass
class Predictor:
    """`model(list of (3, H, W) float images in [0, 1]) -> list of prediction dicts`, in eval mode, with the names
    of its classes (label i is `class_names[i]`) and their category ids (`cat_ids[i]`)."""
    model: Callable[[list[torch.Tensor]], list[dict]]
    class_names: list[str]
    cat_ids: list[int]
    name: str = "model"  # what /healthz calls it (the preset)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        """Predictions for uint8 (3, H, W) images, on the CPU. A model of ours leaves its masks unpasted
        (`mask_probs`, see `engine.evaluator.deferred_mask_pasting`): they are pasted a chunk at a time when
        encoded, so a big photo needs no (N, H, W) tensor."""
        batch = [image.to(self.device, non_blocking=True).float() / 255 for image in images]
        pasting = (deferred_mask_pasting(self.model) if isinstance(self.model, torch.nn.Module)
                   else contextlib.nullcontext())
        with torch.inference_mode(), pasting:
            predictions = self.model(batch)
        return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in p.items()} for p in predictions]


def load_predictor(source: str | Path, *, weights: str = "", overrides: dict | None = None,
                   device: str = "auto", progress: bool = True) -> Predictor:
    """The predictor of a checkpoint of ours, of a preset with `weights` (see `tasks.detection.load_model`), or of
    a file `cascadevision export` wrote (.onnx, .pt2: run by `cascadevision.export.runtime.load_exported`)."""
    path = Path(source)
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        return _exported_predictor(path, weights=weights, overrides=overrides, device=device)
    model, meta = load_model(source, overrides, device, weights=weights, progress=progress)
    names, ids = checkpoint_classes(model, meta)
    names = names or list(model.class_names)
    ids = ids if len(ids) == len(names) else list(range(1, len(names) + 1))
    name = model.cfg.preset or path.stem
    return Predictor(model, names, ids, name=name, device=next(model.parameters()).device)


def _exported_predictor(path: Path, *, weights: str, overrides: dict | None, device: str) -> Predictor:
    if weights or overrides:
        raise CheckpointError(f"{path}: an exported model brings its own weights and config; --weights and --set "
                              "go with a checkpoint or a preset")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:  # function-local, lazy: the export runtime (onnxruntime) is optional, loaded for exported files only
        from ..export.runtime import load_exported
    except ImportError as exc:
        raise CheckpointError(f"{path}: serving an exported model needs cascadevision.export.runtime, which this "
                              f"install lacks ({exc})") from None
    device = resolve_device(device)
    model = load_exported(path, device=str(device))
    names = list(model.class_names)
    ids = [int(i) for i in getattr(model, "cat_ids", None) or []]
    ids = ids if len(ids) == len(names) else list(range(1, len(names) + 1))
    meta = getattr(model, "meta", None) or {}
    return Predictor(model, names, ids, name=str(meta.get("preset") or path.stem), device=device)
