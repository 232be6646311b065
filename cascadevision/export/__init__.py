"""Export a trained detector to ONNX or a `torch.export` ExportedProgram, and run the exported file.

The exported graph (`detection.DetectionGraph`) -- the input contract:

- `image`: float32, (1, 3, H, W), NCHW, batch of exactly one (fixed). The RGB image resized with the model's
  keep-ratio rule (`input.scale`), divided by 255 and normalised per channel, (x - mean) / std with the
  config's `input.mean` / `input.std` (given on the 0-255 scale), then zero-padded at the bottom and right so
  that H and W are multiples of `input.size_divisor` (32). H and W are dynamic.
- `image_size`: int64, (2,): (h, w) of the resized image inside the padding.

Outputs, sorted by decreasing score: `boxes` (N, 4) float32 x1y1x2y2 in the resized image's pixels (divide by
the scale factor to go back), `scores` (N,), `labels` (N,) int64 0-based and, for mask models, `mask_probs`
(N, 28, 28) float32: each detection's mask probabilities inside its box, to be pasted with
`cascadevision.ops.paste_masks` (threshold `mask_thr` of the metadata) outside the graph.

`preprocess(image, contract)` is the reference for the inputs, `runtime.load_exported` runs a file like the
PyTorch model, and `export_model` writes one. Metadata (classes, category ids, the contract, preset, version)
is stored in the ONNX file's metadata_props, and next to an ExportedProgram as FILE.json.

The dense models (segmentation, EfficientViT / HAT-Net classifiers, multi-exit classifiers: dynamic batch) are
in `export.dense` and run with `runtime.load_dense`; every task writes through `write_export` (torch.export.save
+ FILE.json, or the ONNX conversion `onnx_bytes` with the metadata) and starts from `base_metadata`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._sympy.value_ranges import bound_sympy

from .. import __version__
from ..config import InputConfig
from ..errors import ConfigError, ModelInputError
from ..io.checkpoint import atomic_write
from ..models.transform import DetectionTransform
from .detection import DetectionGraph

__all__ = ["FORMATS", "base_metadata", "export_model", "input_contract", "padded_size_ranges", "preprocess",
           "sidecar_path", "write_export"]

FORMATS = ("onnx", "exported-program")
META_FORMAT = "cascadevision-export/1"
MAX_SIDE = 4096  # the largest padded side the exported graph accepts (a bound torch.export asks for)


def input_contract(cfg: InputConfig) -> dict:
    """The graph input's description, as stored in the metadata (and read back by `preprocess`)."""
    return {"layout": "NCHW", "dtype": "float32", "batch": 1, "scale": list(cfg.scale), "mean": list(cfg.mean),
            "std": list(cfg.std), "mean_std_scale": "0-255 (the image is divided by 255 first)",
            "size_divisor": cfg.size_divisor, "max_side": MAX_SIDE,
            "image_size": "int64 (2,): (h, w) inside the zero padding"}


def _transform(contract) -> DetectionTransform:
    if isinstance(contract, DetectionTransform):
        return contract
    if isinstance(contract, InputConfig):
        return DetectionTransform(contract)
    if isinstance(contract, Mapping):
        return DetectionTransform(InputConfig(scale=tuple(contract["scale"]), mean=tuple(contract["mean"]),
                                              std=tuple(contract["std"]), size_divisor=int(contract["size_divisor"])))
    raise TypeError(f"preprocess: contract must be an InputConfig, a DetectionTransform or the metadata's 'input', "
                    f"not {type(contract).__name__}")


def preprocess(image: Tensor, contract) -> tuple[Tensor, dict]:
    """(graph input image (1, 3, H, W), meta) for one (3, H0, W0) RGB image, uint8 (0-255) or float in [0, 1].

    It is the model's own `DetectionTransform` (resize, normalise, pad). meta: `image_size` (the graph's second
    input), `scale_factor` (sx, sy) from original to resized pixels, `original_size` (H0, W0).
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ModelInputError(f"preprocess: expected a (3, H, W) RGB tensor, got {shape}")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    transform = _transform(contract).to(image.device)
    batch, sizes, factors, _ = transform([image])
    if max(batch.shape[-2:]) > MAX_SIDE:
        raise ModelInputError(f"preprocess: the resized image is {tuple(batch.shape[-2:])}, above the exported graph's "
                              f"{MAX_SIDE} pixels per side")
    for axis, key in ((2, "height_range"), (3, "width_range")):
        bounds = contract.get(key) if isinstance(contract, Mapping) else None
        if bounds and not bounds[0] <= batch.shape[axis] <= bounds[1]:
            raise ModelInputError(f"preprocess: this export takes padded {key.split('_')[0]}s in [{bounds[0]}, "
                                  f"{bounds[1]}] (its backbone branches on feature-map sizes; export again with an "
                                  f"example image of this size), got {batch.shape[axis]}")
    meta = {"image_size": torch.tensor(sizes[0], dtype=torch.long, device=image.device),
            "scale_factor": factors[0], "original_size": tuple(image.shape[-2:])}
    return batch.float(), meta


def sidecar_path(path: str | Path) -> Path:
    """Where an ExportedProgram's metadata lives: FILE.json next to FILE."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _metadata(model, class_names, cat_ids, preset) -> dict:
    return {**base_metadata("detection", preset or model.cfg.preset, class_names),
            "cat_ids": [int(i) for i in cat_ids or []], "input": input_contract(model.cfg.input),
            "outputs": ["boxes", "scores", "labels"] + (["mask_probs"] if model.roi_head.with_mask else []),
            "mask_thr": model.cfg.roi_head.test.mask_thr, "score_thr": model.cfg.roi_head.test.score_thr}


def export_model(model, path: str | Path, fmt: str = "onnx", *, class_names=None, cat_ids=None, preset: str = "",
                 example: Tensor | None = None) -> dict:
    """Write `model` (a detector, eval mode) to `path` as `fmt` ('onnx' or 'exported-program'); returns the
    metadata written with it. `example` (3, H, W) in [0, 1] is the image traced (default: a random one at the
    model's input scale); the graph accepts any size."""
    check_format(fmt)
    graph = DetectionGraph(model).eval()  # refuses what does not export, before any work
    meta = _metadata(model, class_names if class_names is not None else model.class_names, cat_ids, preset)
    if example is None:
        short, long = min(model.cfg.input.scale), max(model.cfg.input.scale)
        example = torch.rand(3, short, long, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    image, info = preprocess(example.to(device), model.cfg.input)
    args = (image, info["image_size"])
    program = export_program(graph, args, model.cfg.input.size_divisor)
    meta["input"].update(padded_size_ranges(program))
    return write_export(program, args, path, fmt, meta, input_names=("image", "image_size"))


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"export: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def base_metadata(task: str, preset: str, class_names) -> dict:
    """The metadata keys every exported file carries (the task's exporter adds its input contract and outputs)."""
    return {"format": META_FORMAT, "task": task, "cascadevision_version": __version__, "preset": preset or "",
            "class_names": list(class_names or [])}


def write_export(program: torch.export.ExportedProgram, args: tuple, path: str | Path, fmt: str, meta: dict, *,
                 input_names: tuple[str, ...]) -> dict:
    """Save an exported program as `fmt` (atomically): 'exported-program' -> torch.export.save + FILE.json
    (the metadata), 'onnx' -> the ONNX conversion (`onnx_bytes`) with the metadata as metadata_props."""
    check_format(fmt)
    path = Path(path)
    if fmt == "exported-program":
        atomic_write(path, lambda f: torch.export.save(program, f))
        atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return meta
    data = onnx_bytes(program, args, meta, input_names=input_names)
    atomic_write(path, lambda f: f.write(data))
    return meta


def export_program(graph: torch.nn.Module, args: tuple, size_divisor: int) -> torch.export.ExportedProgram:
    """torch.export of the graph with dynamic height and width (multiples of `size_divisor`)."""
    steps = MAX_SIDE // size_divisor
    height = torch.export.Dim("height_steps", min=1, max=steps)
    width = torch.export.Dim("width_steps", min=1, max=steps)
    with torch.no_grad():
        return torch.export.export(graph, args, dynamic_shapes=({2: size_divisor * height, 3: size_divisor * width},
                                                                None), strict=False)


def padded_size_ranges(program: torch.export.ExportedProgram) -> dict:
    """{'height_range': [lo, hi], 'width_range': [lo, hi]}: the padded input sizes the graph is valid for.

    Usually [size_divisor, MAX_SIDE]. A model whose code branches on the size of a feature map (EfficientViT:
    whole-map attention for maps within one window, windowed attention above) is exported for the branch its
    example took, and the range says so; `preprocess` refuses images outside it."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    out = {}
    for key, size in (("height_range", node.meta["val"].shape[2]), ("width_range", node.meta["val"].shape[3])):
        if not isinstance(size, torch.SymInt):
            out[key] = [int(size), int(size)]
            continue
        expr = size.node.expr  # e.g. 32*s0: the ranges torch.export refined are those of the symbols
        bounds = bound_sympy(expr, {sym: program.range_constraints[sym] for sym in expr.free_symbols})
        out[key] = [int(bounds.lower), int(bounds.upper)]
    return out


def onnx_bytes(program: torch.export.ExportedProgram, args: tuple, meta: dict,
               input_names: tuple[str, ...] = ("image", "image_size")) -> bytes:
    """The ONNX model of an exported graph (outputs named `meta['outputs']`), with `meta` as metadata_props
    (JSON values). Our custom ops (RoIAlign, NMS) get their ONNX translations; dynamic dimensions stay dynamic."""
    try:  # lazy: only needed to write ONNX files
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter and our RoiAlign/NMS translations)
    except ImportError as exc:
        raise ConfigError(f"export --format onnx needs the onnx and onnxscript packages ({exc}); "
                          "pip install 'cascadevision[export]'") from None

    from .ops import ONNX_TRANSLATIONS, OPSET

    onnx_program = torch.onnx.export(program, args, dynamo=True, custom_translation_table=ONNX_TRANSLATIONS,
                                     opset_version=OPSET, input_names=list(input_names),
                                     output_names=meta["outputs"], verbose=False)
    proto = onnx_program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return onnx.ModelProto.SerializeToString(proto)
