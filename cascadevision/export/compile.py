"""`--compile`: torch.compile on the dense parts of a model, with dynamic shapes (no recompilation per image size).

A detector's backbone, neck, RoI box heads, mask heads and HTC's semantic head are compiled in place
(`nn.Module.compile`, so parameter names and checkpoints stay as they are); the glue between them (proposal
selection, NMS, RoIAlign planning, the cascade's data-dependent loops) stays eager, where Dynamo could only break
the graph and recompile. Any other model (segmentation, classifiers) is compiled whole.

Library users: `compile_model(model)`, or plain `model = torch.compile(model, dynamic=True)`, which also works
(Dynamo breaks the graph around the data-dependent parts) but compiles much longer.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_model", "compiled_parts"]


def compiled_parts(model: nn.Module) -> list[nn.Module]:
    """The submodules `compile_model` compiles: a detector's dense parts, or the model itself."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "backbone"):  # a wrapper (TTADetector): the detector's parts
        return compiled_parts(inner)
    head = getattr(model, "roi_head", None)
    if head is None or not hasattr(model, "backbone"):
        return [model]
    parts = [model.backbone, model.neck]
    for name in ("bbox_head", "mask_head"):
        heads = getattr(head, name, None)
        if heads is not None:
            parts += list(heads) if isinstance(heads, nn.ModuleList) else [heads]
    if getattr(head, "semantic_head", None) is not None:
        parts.append(head.semantic_head)
    return parts


def compile_model(model: nn.Module, **options) -> nn.Module:
    """Compile `model`'s dense parts in place (see the module docstring); returns `model`. `options` go to
    torch.compile (default dynamic=True: image sizes and RoI counts are symbolic, compiled once)."""
    options.setdefault("dynamic", True)
    for part in compiled_parts(model):
        part.compile(**options)
    return model
