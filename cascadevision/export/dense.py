"""Export the dense models: segmentation (`segmentation.model.Segmenter`), ImageNet-style classifiers (EfficientViT,
HAT-Net, or any module mapping (B, 3, H, W) to (B, classes) logits) and the multi-exit classifiers of
`cascadevision exits`. The detectors' machinery (`export.write_export`: torch.export, the ONNX conversion,
metadata, atomic writes) with a **dynamic batch** here.

Input contract (in the metadata's `input`): `image`, float32 (B, C, H, W) NCHW, B dynamic (1..MAX_BATCH):

- segmentation: the images resized to the model's `input.size` (stretched, or fitted inside it and zero-padded at
  the bottom/right when `keep_ratio`), divided by 255 and normalised with `mean`/`std` (0-255 scale): exactly the
  batch `Segmenter.preprocess` makes. H and W are dynamic (multiples of `size_divisor`) where the backbone allows
  it (`height_range`/`width_range`; an EfficientViT backbone is exported for the attention branch its example
  took, as the detectors are). Output `logits` (B, K, H, W): the sum of the heads' logits (argmax over K is
  the label map; crop the padding and resize to the image as `Segmenter._to_image_size` does).
- classifiers: images of the fixed size `height` x `width` (the model's training size; EfficientViT's bias tables
  are sized for it), normalised as given to `export_classifier` (`mean`/`std` on the 0-255 scale after / 255
  when given). Output `logits` (B, classes); softmax outside.
- multi-exit classifiers: the exits' `image_size` x `image_size` single-channel images as `exits` trains on;
  outputs `logits_exit1` .. `logits_exitN` (B, classes), the full model's every exit (the last is the final
  prediction). Exiting early (the gates, calibrated thresholds) is a data-dependent choice per sample and is
  not in the graph: apply the thresholds to the exits' outputs outside it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import MAX_SIDE, base_metadata, check_format, padded_size_ranges, write_export

__all__ = ["MAX_BATCH", "SegmentationGraph", "export_classifier", "export_dense", "export_exit_model",
           "export_segmenter"]

MAX_BATCH = 1024  # the largest batch the exported graphs accept (a bound torch.export asks for)


class SegmentationGraph(nn.Module):
    """A normalised, padded batch (B, 3, H, W) -> the sum of the heads' logits (B, K, H, W), as `Segmenter` in
    eval mode computes them before cropping and resizing each image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return torch.stack(self.model.stage_logits(image)).sum(dim=0)


class _AllExits(nn.Module):
    """A multi-exit model's forward (a list of every exit's logits) as a tuple, the outputs of the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model(image))


def export_dense(module: nn.Module, example: Tensor, path, fmt: str, meta: dict, *,
                 size_divisor: int | None = None) -> dict:
    """torch.export `module` (eval mode) on `example` (B >= 2, C, H, W) with a dynamic batch, and dynamic height and
    width (multiples of `size_divisor`) when it is given, else fixed; write it as `fmt` with `meta` (which names
    the outputs) completed with the batch and size ranges the graph accepts. Returns the metadata."""
    check_format(fmt)
    if example.dim() != 4 or example.shape[0] < 2:
        raise ValueError("export_dense: the example must be a (B >= 2, C, H, W) batch (a batch of 1 would be "
                         "specialised by torch.export)")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shape = {0: batch}
    if size_divisor:
        steps = MAX_SIDE // size_divisor
        shape[2] = size_divisor * torch.export.Dim("height_steps", min=1, max=steps)
        shape[3] = size_divisor * torch.export.Dim("width_steps", min=1, max=steps)
    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=(shape,), strict=False)
    meta = dict(meta)
    meta["input"] = {**meta["input"], "batch": [1, MAX_BATCH], **padded_size_ranges(program)}
    return write_export(program, (example,), path, fmt, meta, input_names=("image",))


def _example(generator_seed: int, batch: int, channels: int, height: int, width: int) -> Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(generator_seed))


def export_segmenter(model: nn.Module, path, fmt: str = "onnx", *, preset: str = "", class_names=None,
                     dynamic_size: bool = True) -> dict:
    """Write a `Segmenter` (the CASCADE / MERIT decoders of `cascadevision segment`) as `fmt`: normalised batch in,
    summed logits out (see the module's contract). `dynamic_size`: height and width are dynamic (multiples of
    the size divisor) rather than fixed at the model's `input.size`."""
    cfg = model.input_cfg
    names = class_names if class_names is not None else (model.class_names or
                                                         [str(i) for i in range(model.num_classes)])
    height, width = cfg.size
    contract = {"layout": "NCHW", "dtype": "float32", "channels": 3, "size": [height, width],
                "keep_ratio": bool(cfg.keep_ratio), "mean": list(cfg.mean), "std": list(cfg.std),
                "mean_std_scale": "0-255 (the image is divided by 255 first)", "size_divisor": cfg.size_divisor,
                "resize": "to `size` (keep_ratio: fitted inside it, zero-padded bottom/right), as "
                          "Segmenter.preprocess", "dynamic_size": bool(dynamic_size)}
    meta = {**base_metadata("segmentation", preset, names), "input": contract, "outputs": ["logits"],
            "output_layout": "logits (B, K, H, W): the sum of the heads' logits; argmax over K = label map"}
    device = next(model.parameters()).device
    example = _example(0, 2, 3, height, width).to(device)
    return export_dense(SegmentationGraph(model), example, path, fmt, meta,
                        size_divisor=cfg.size_divisor if dynamic_size else None)


def export_classifier(model: nn.Module, path, fmt: str = "onnx", *, input_size: int | tuple[int, int] = 224,
                      class_names=None, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                      channels: int = 3, preset: str = "") -> dict:
    """Write a classifier ((B, C, H, W) -> (B, classes) logits: EfficientViT, HAT-Net, ...) as `fmt`, batch dynamic,
    height and width fixed at `input_size` (the size it was trained for). `mean`/`std` (0-255 scale, ImageNet's by
    default) only document the normalisation the caller applies; they are not in the graph."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    device = next(model.parameters()).device
    example = _example(0, 2, channels, height, width).to(device)
    with torch.no_grad():
        out = model.eval()(example)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ConfigError(f"export_classifier: the model must return (B, classes) logits, got "
                          f"{type(out).__name__ if not isinstance(out, Tensor) else tuple(out.shape)}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(out.shape[1])]
    if len(names) != out.shape[1]:
        raise ConfigError(f"export_classifier: {len(names)} class names for {out.shape[1]} logits")
    contract = {"layout": "NCHW", "dtype": "float32", "channels": channels, "height": height, "width": width,
                "fixed_size": True, "mean": list(mean), "std": list(std),
                "mean_std_scale": "0-255 (the image is divided by 255 first)"}
    meta = {**base_metadata("classification", preset, names), "input": contract, "outputs": ["logits"],
            "output_layout": "logits (B, classes); softmax for probabilities"}
    return export_dense(model, example, path, fmt, meta)


def export_exit_model(model: nn.Module, path, fmt: str = "onnx", *, image_size: int, channels: int = 1,
                      class_names=None, preset: str = "") -> dict:
    """Write a multi-exit classifier (`early_exit.models.MultiExitModel`) as `fmt`: every exit's logits
    (`logits_exit1` .. `logits_exitN`, the last the final prediction); batch dynamic, size fixed."""
    device = next(model.parameters()).device
    example = _example(0, 2, channels, image_size, image_size).to(device)
    with torch.no_grad():
        outputs = model.eval()(example)
    classes = outputs[-1].shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    contract = {"layout": "NCHW", "dtype": "float32", "channels": channels, "height": image_size,
                "width": image_size, "fixed_size": True,
                "values": "as `cascadevision exits` trains on (early_exit.data: the digits upsampled to image_size)"}
    meta = {**base_metadata("exits", preset, names), "input": contract,
            "outputs": [f"logits_exit{k + 1}" for k in range(len(outputs))],
            "output_layout": "every exit's logits (B, classes), the last is the full model's; early exit "
                             "(gates / calibrated thresholds) is applied outside the graph"}
    return export_dense(_AllExits(model), example, path, fmt, meta)
