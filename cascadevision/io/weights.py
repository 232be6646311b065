"""Loading weights into a model: our checkpoints, MMDetection checkpoints, torchvision ImageNet ResNets, safetensors.

Rebuilding a model from one of our checkpoints is `cascadevision.tasks` (`Task.model_from_checkpoint`): it needs
the task's config and builder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..hub import resolve
from ..models.efficientvit import EfficientViT, EfficientViTBackbone
from .checkpoint import read_state_dict, save_checkpoint
from .pretrained import load_efficientvit_weights

# layers whose shape depends on the number of classes: re-initialised when fine-tuning to other classes
CLASS_DEPENDENT = ("fc_cls", "fc_reg", "conv_logits")


def detect_format(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("backbone.", "roi_head.", "rpn_head.", "neck.")) for k in keys):
        return "detector"
    if any(k.startswith(("bbox_head.", "mask_head.")) for k in keys):
        return "mmdet-v1"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return "torchvision-resnet"
    if any(k.startswith(("patch_embed.", "stages.")) for k in keys) and any("attention_biases" in k for k in keys):
        return "efficientvit-classifier"
    return "unknown"


def load_weights(model: nn.Module, path_or_url: str | Path, *, sha256: str | None = None, strict_classes: bool = False,
                 progress: bool = True) -> dict:
    """Load weights into `model` and return a report {'format', 'missing', 'unexpected', 'reinitialised', 'meta'}.

    `path_or_url` is a local file or an http(s)/file URL (downloaded once into the cache, see `hub.resolve`).

    - our checkpoints and MMDetection v2/v3 checkpoints (`{'state_dict': ...}`) load by name;
    - a torchvision ImageNet ResNet state dict loads into `model.backbone` (its `fc` is dropped);
    - class-dependent layers (fc_cls, fc_reg, conv_logits) whose shapes differ are left at their
      initialisation and named in the report (fine-tuning to another class set), unless `strict_classes`;
    - any other mismatch is a CheckpointError naming the keys.
    """
    path = resolve(path_or_url, sha256=sha256, progress=progress)
    state, meta = read_state_dict(path)
    return load_state(model, state, meta, source=path, strict_classes=strict_classes)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], meta: dict, *, source: Path,
               strict_classes: bool = False) -> dict:
    """`load_weights` on a file already read (`read_state_dict(source)`): for a caller that first looks at the
    file (its classes, see `weights_classes`) to build the model."""
    path, state = source, dict(state)
    fmt = detect_format(state)
    if fmt == "efficientvit-classifier":
        target = getattr(model, "backbone", model)
        if not isinstance(target, (EfficientViT, EfficientViTBackbone)):
            raise CheckpointError(f"{path}: EfficientViT weights, but the model's backbone is "
                                  f"{type(target).__name__}")
        report = load_efficientvit_weights(target, path, strict_classes=strict_classes)
        return {"format": fmt, "meta": meta, **report}
    if fmt == "mmdet-v1":
        raise CheckpointError(f"{path}: an MMDetection v1 checkpoint (keys without 'roi_head.'); its box convention "
                              "differs. Use the v2.0 checkpoints from the MMDetection model zoo.")
    target: nn.Module = model
    if fmt == "torchvision-resnet":
        if not hasattr(model, "backbone"):
            raise CheckpointError(f"{path}: an ImageNet ResNet state dict, but the model has no backbone")
        target = model.backbone
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    elif fmt == "unknown":
        raise CheckpointError(f"{path}: unrecognised checkpoint layout (first keys: {', '.join(list(state)[:3])})")
    own = target.state_dict()
    reinit, mismatched = [], []
    for key, value in list(state.items()):
        if key in own and own[key].shape != value.shape:
            if not strict_classes and key.rsplit(".", 2)[-2] in CLASS_DEPENDENT:
                reinit.append(key)
            else:
                mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            del state[key]
    missing = [k for k in own if k not in state and k not in reinit]
    unexpected = [k for k in state if k not in own]
    if mismatched:
        raise CheckpointError(f"{path}: shape mismatch for {len(mismatched)} tensors: {'; '.join(mismatched[:5])}")
    if fmt == "detector" and (missing or unexpected):
        raise CheckpointError(f"{path}: does not fit this model: {len(missing)} missing "
                              f"({', '.join(missing[:4])}), {len(unexpected)} unexpected ({', '.join(unexpected[:4])})")
    if fmt == "torchvision-resnet":
        if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
            raise CheckpointError(f"{path}: the ResNet weights do not fit backbone depth "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    target.load_state_dict(state, strict=False)
    return {"format": fmt, "missing": missing, "unexpected": unexpected, "reinitialised": reinit, "meta": meta}


def weights_classes(state: dict[str, torch.Tensor], meta: dict) -> tuple[int | None, list[str]]:
    """(number of classes, class names) of a detector's weights file: the count from its class layers' shapes
    (None when it has none), the names from its meta (ours: 'class_names'; MMDetection v2: 'CLASSES', v3:
    'dataset_meta' -> 'classes'; [] when it names none)."""
    count = None
    for key, value in state.items():
        if key.startswith("roi_head.") and key.endswith("fc_cls.weight"):
            count = value.shape[0] - 1  # the classifier's last output is the background
            break
        if key.startswith("roi_head.mask_head") and key.endswith("conv_logits.weight"):
            count = value.shape[0]  # one mask per class
    dataset_meta = meta.get("dataset_meta")
    names = (meta.get("class_names") or meta.get("CLASSES")
             or (dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None) or [])
    if isinstance(names, str):  # MMDetection stores a single class as a bare string
        names = [names]
    return count, [str(name) for name in names]


def convert_to_safetensors(src: str | Path, dst: str | Path) -> int:
    """Write a checkpoint's weights (and our meta, as JSON metadata) to safetensors; returns the tensor count."""
    state, meta = read_state_dict(src)
    save_checkpoint(dst, {"state_dict": state, "meta": json.loads(json.dumps(meta, default=str))})
    return len(state)


def inspect_weights(path: str | Path) -> dict:
    """A summary of a weights file: format, tensor and parameter counts, top-level groups, classes."""
    state, meta = read_state_dict(path)
    groups: dict[str, int] = {}
    for key, value in state.items():
        group = ".".join(key.split(".")[:2]) if key.startswith("roi_head.") else key.split(".")[0]
        groups[group] = groups.get(group, 0) + value.numel()
    info = {"file": str(path), "format": detect_format(state), "tensors": len(state),
            "parameters": sum(v.numel() for k, v in state.items() if "num_batches_tracked" not in k
                              and "running_" not in k),
            "groups": groups}
    num_classes, names = weights_classes(state, meta)
    if num_classes is not None:
        info["num_classes"] = num_classes
    cls = [k for k in state if k.endswith("fc_cls.weight")]
    if cls:
        info["num_stages"] = len(cls)
    sem = state.get("roi_head.semantic_head.conv_logits.weight")
    if sem is not None:
        info["semantic_classes"] = sem.shape[0]
    if names:
        info["class_names"] = names
    if isinstance(meta.get("config"), dict):
        info["preset"] = meta["config"].get("model", {}).get("preset", "")
    return info
