"""Loading the EfficientViT and HAT-Net releases: their checkpoints, the timm port's names mapped back to the
reference's, and bias tables resized to the model's windows. The models themselves are in `cascadevision.models`;
this is weights I/O, the floor above them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError
from ..hub import resolve
from ..models.classifier import load_state_by_name
from ..models.efficientvit import EFFICIENTVIT_CONFIGS, EfficientViT, EfficientViTBackbone, _variant
from ..models.hatnet import HATNet
from .checkpoint import read_state_dict



# the reference's ImageNet-1k releases (`{'model': state_dict}`); not downloaded by any test
EFFICIENTVIT_WEIGHT_URLS = {
    name: f"https://github.com/xinyuliu-jeffrey/EfficientViT_Model_Zoo/releases/download/v1.0/efficientvit_{name}.pth"
    for name in EFFICIENTVIT_CONFIGS
}


def load_efficientvit_weights(model: EfficientViT, path: str | Path, *, strict_classes: bool = False) -> dict:
    """Load a released EfficientViT checkpoint (`{'model': state_dict}`, the timm port's names, or our own; a file
    path or an http(s) URL, cached by `cascadevision.hub`) into an EfficientViT classifier or an
    EfficientViTBackbone; returns {'missing', 'unexpected', 'reinitialised', 'resized'}.

    - the head is dropped for a backbone; for a classifier with another class count it keeps its initialisation
      and is listed under 'reinitialised' (a CheckpointError if `strict_classes`);
    - bias tables of another size (4x4 in stage 3 of a 224 classifier vs 7x7 in a backbone) are resized
      bicubically, as the reference's detection code does, and listed under 'resized';
    - `attention_bias_idxs` buffers are derived from the table size and never taken from the file;
    - 2-D weights stored for 1x1 convs get their two trailing unit dims (the reference loader does the same);
    - anything else that does not fit is a CheckpointError naming the tensors.
    """
    path = resolve(path)
    state, _ = read_state_dict(path)
    if all(k.startswith("backbone.") for k in state if not k.startswith(("neck.", "rpn_head.", "roi_head."))):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if any(k.startswith("stages.") for k in state):
        state = timm_to_reference_names(state)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("attention_bias_idxs")}
    if isinstance(model, EfficientViTBackbone):
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    resized = []
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key.endswith("attention_biases") and value.dim() == 2 and value.shape[0] == target.shape[0]:
            state[key] = _resize_bias_table(value, target.shape[1], f"{path}: {key}")
            resized.append(key)
        elif value.dim() == 2 and target.dim() == 4 and target.shape[2:] == (1, 1) and value.shape == target.shape[:2]:
            state[key] = value[:, :, None, None]
    report = load_state_by_name(model, state, path, ignore_missing=("attention_bias_idxs", "num_batches_tracked"),
                                classifier_keys=("head.l.", "head_dist.l."), strict_classes=strict_classes)
    report["resized"] = resized
    return report


def _resize_bias_table(table: Tensor, entries: int, where: str) -> Tensor:
    """(heads, S1^2) -> (heads, S2^2) by bicubic interpolation of the (|dr|, |dc|) grid."""
    heads, old_entries = table.shape
    old_side, new_side = round(old_entries ** 0.5), round(entries ** 0.5)
    if old_side ** 2 != old_entries or new_side ** 2 != entries:
        raise CheckpointError(f"{where}: bias table of {old_entries} entries cannot be resized to {entries}")
    grid = table.reshape(1, heads, old_side, old_side).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, entries).to(table.dtype)


def timm_to_reference_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm `efficientvit_m*` state dict to the reference's names (the inverse of timm's
    `checkpoint_filter_fn`): stages.{i}.downsample.{res1,patchmerge,res2} -> blocks{i+1}.{0,1,2},
    stages.{i}.blocks.{j} -> blocks{i+1}.{j (+3 after a downsample)}, patch_embed.conv{k} -> patch_embed.{2k-2},
    `.conv.` -> `.c.` and `.linear.` -> `.l.` inside Conv2d_BN / BN_Linear."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2:] == ["conv", "weight"] and _is_conv_bn_weight(state, key):
            parts[-2] = "c"
        if parts[0] == "head" and parts[1] == "linear":
            parts[1] = "l"
        if parts[0] == "patch_embed" and parts[1].startswith("conv"):
            parts[1] = str(2 * int(parts[1][4:]) - 2)
        elif parts[0] == "stages":
            stage = int(parts[1])
            if parts[2] == "downsample":
                index = {"res1": 0, "patchmerge": 1, "res2": 2}[parts[3]]
                parts = [f"blocks{stage + 1}", str(index)] + parts[4:]
            else:  # stages.{i}.blocks.{j}
                offset = 3 if stage > 0 else 0
                parts = [f"blocks{stage + 1}", str(int(parts[3]) + offset)] + parts[4:]
        renamed[".".join(parts)] = value
    return renamed


def _is_conv_bn_weight(state: dict[str, Tensor], key: str) -> bool:
    """A `<prefix>.conv.weight` that sits next to `<prefix>.bn.*` belongs to a ConvBN (timm's name for Conv2d_BN)."""
    return key[: -len("conv.weight")] + "bn.weight" in state


def pretrained_efficientvit(name: str, num_classes: int = 1000, weights: str | Path = "imagenet",
                           **overrides) -> EfficientViT:
    """An EfficientViT classifier with `weights` loaded: a reference checkpoint (path or URL), or "imagenet" for
    the released one of this variant."""
    variant = _variant(name)
    model = EfficientViT(dataclasses.replace(EFFICIENTVIT_CONFIGS[variant], **overrides), num_classes)
    load_efficientvit_weights(model, EFFICIENTVIT_WEIGHT_URLS[variant] if weights == "imagenet" else weights)
    return model


def load_hatnet_weights(model: HATNet, path: str | Path, *, strict_classes: bool = False) -> dict:
    """Load a released HAT-Net checkpoint (a state dict, or `{'model': ...}` / `{'state_dict': ...}`) by name.
    A classifier of another class count keeps its fresh `classifier.1` (listed under 'reinitialised');
    anything else that does not fit is a CheckpointError naming the tensors."""
    state, _ = read_state_dict(path)
    return load_state_by_name(model, state, path, classifier_keys=("classifier.1.",), strict_classes=strict_classes)
