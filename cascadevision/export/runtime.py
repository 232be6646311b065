"""Run an exported detector (.onnx through onnxruntime, or a torch.export ExportedProgram) like the PyTorch model.

    model = load_exported("htc.onnx", threads=2)
    [pred] = model([image])  # image (3, H, W) float in [0, 1]; pred: boxes, labels, scores[, masks]

Preprocessing is `cascadevision.export.preprocess`; boxes go back to the image's pixels and masks are pasted by
the model's own `DetectionTransform.postprocess`, so the results read exactly as `model.eval()(images)`'s.

The dense models (segmentation, classifiers: `cascadevision.export.dense`) run with `load_dense`:

    model = load_dense("seg.onnx", threads=2)
    logits = model(batch)["logits"]  # batch (B, 3, H, W) prepared as model.meta["input"] says
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, ModelInputError
from ..models.transform import DetectionTransform
from . import META_FORMAT, preprocess, sidecar_path
from . import ops as _ops  # noqa: F401  (registers the custom ops an ExportedProgram calls)

__all__ = ["ExportedDense", "ExportedDetector", "load_dense", "load_exported"]


class ExportedDetector:
    """Callable like a detector in eval mode: `model(images) -> list[dict]` (boxes in image pixels, labels
    0-based, scores, and `masks` (N, H, W) bool for mask models). `class_names`, `cat_ids` (may be empty) and
    `meta` (everything the file carries) come from the file's metadata."""

    def __init__(self, run, meta: dict, device: torch.device, source: str):
        self._run = run  # (image, image_size) -> tuple of output tensors, in meta["outputs"] order
        self.meta = meta
        self.class_names: list[str] = list(meta.get("class_names") or [])
        self.cat_ids: list[int] = [int(i) for i in meta.get("cat_ids") or []]
        self.device = device
        self.source = source
        self.mask_output = "full"  # "probs": unpasted mask_probs + image_size + mask_thr, as the model's option

    def __call__(self, images: list[Tensor]) -> list[dict]:
        if not isinstance(images, (list, tuple)) or not images:
            raise ModelInputError("exported model input must be a non-empty list of (3, H, W) float tensors")
        results = []
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or not image.is_floating_point():
                raise ModelInputError(f"image {i}: expected a (3, H, W) float tensor in [0, 1]")
            batch, info = preprocess(image.to(self.device), self.meta["input"])
            outputs = dict(zip(self.meta["outputs"], self._run(batch, info["image_size"])))
            detection = {"boxes": outputs["boxes"], "labels": outputs["labels"], "scores": outputs["scores"]}
            if "mask_probs" in outputs:
                detection["mask_probs"] = outputs["mask_probs"]
            results += DetectionTransform.postprocess([detection], [info["scale_factor"]], [info["original_size"]],
                                                      self.meta.get("mask_thr", 0.5), self.mask_output)
        return results

    @contextlib.contextmanager
    def deferred_mask_pasting(self):
        """Within the block, return unpasted `mask_probs` (as `engine.evaluator.deferred_mask_pasting`)."""
        before, self.mask_output = self.mask_output, "probs"
        try:
            yield self
        finally:
            self.mask_output = before


def load_exported(path: str | Path, device: str = "cpu", threads: int | None = None) -> ExportedDetector:
    """An exported detector, ready to call: `.onnx` runs in onnxruntime (CPU provider, `threads` intra-op
    threads; default: onnxruntime's), anything else is read as a torch.export ExportedProgram (`torch.export.load`,
    with its metadata from FILE.json) and runs on `device`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such exported model file")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, threads)
    return _load_program(path, torch.device(device))


DENSE_TASKS = ("segmentation", "classification", "exits")


def _check_meta(path, meta: dict, tasks: tuple[str, ...] = ("detection",)) -> dict:
    if meta.get("format") != META_FORMAT or meta.get("task") not in tasks:
        if meta.get("format") == META_FORMAT and meta.get("task") in DENSE_TASKS:
            raise CheckpointError(f"{path}: a {meta['task']} model, not a detector: run it with "
                                  "cascadevision.export.runtime.load_dense")
        if meta.get("format") == META_FORMAT and meta.get("task") == "detection":
            raise CheckpointError(f"{path}: a detector: run it with cascadevision.export.runtime.load_exported")
        kind = "detector" if tasks == ("detection",) else "dense model (segmentation, classifier)"
        raise CheckpointError(f"{path}: not a {kind} exported by `cascadevision export` (format "
                              f"{meta.get('format')!r}, task {meta.get('task')!r})")
    return meta


def _onnx_session(path: Path, threads: int | None, tasks: tuple[str, ...]):
    """(onnxruntime session on the CPU, metadata, output names)."""
    try:
        import onnxruntime as ort  # lazy: the optional runtime
    except ImportError:
        raise CheckpointError(f"{path}: running an ONNX file needs onnxruntime; pip install "
                              "'cascadevision[export]'") from None

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise CheckpointError(f"{path}: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from None
    stored = session.get_modelmeta().custom_metadata_map
    meta = _check_meta(path, {k: json.loads(v) for k, v in stored.items()}, tasks)
    return session, meta, [o.name for o in session.get_outputs()]


def _program_module(path: Path, device: torch.device, tasks: tuple[str, ...]):
    """(the loaded ExportedProgram's module on `device`, metadata from FILE.json)."""
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: its metadata {meta_path.name} is missing (written next to it by "
                              "`cascadevision export --format exported-program`)")
    meta = _check_meta(meta_path, json.loads(meta_path.read_text()), tasks)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch.export.load raises several types for a file that is not an archive of its own
        raise CheckpointError(f"{path}: not a torch.export program: {str(exc).splitlines()[0]}") from None
    return program.module().to(device), meta


def _load_onnx(path: Path, threads: int | None) -> ExportedDetector:
    session, meta, names = _onnx_session(path, threads, ("detection",))

    def run(image: Tensor, image_size: Tensor):
        outputs = session.run(names, {"image": image.cpu().numpy(), "image_size": image_size.cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)

    return ExportedDetector(run, meta, torch.device("cpu"), str(path))


def _load_program(path: Path, device: torch.device) -> ExportedDetector:
    module, meta = _program_module(path, device, ("detection",))

    def run(image: Tensor, image_size: Tensor):
        with torch.no_grad():
            return tuple(module(image, image_size))

    return ExportedDetector(run, meta, device, str(path))


# ----------------------------------------------------------------------------------------------------------
# dense models (segmentation, classifiers, multi-exit classifiers: `export.dense`)


class ExportedDense:
    """An exported dense model: `model(batch) -> {output name: tensor}` for a (B, C, H, W) float32 batch
    prepared as the metadata's `input` says (see `cascadevision.export.dense`): `logits` (segmentation: (B, K,
    H, W); classifiers: (B, classes)) or `logits_exit1..N` (multi-exit classifiers). `task`, `class_names` and
    `meta` come from the file."""

    def __init__(self, run, meta: dict, device: torch.device, source: str):
        self._run = run
        self.meta = meta
        self.task: str = meta["task"]
        self.class_names: list[str] = list(meta.get("class_names") or [])
        self.device = device
        self.source = source

    def __call__(self, batch: Tensor) -> dict[str, Tensor]:
        contract = self.meta["input"]
        if not isinstance(batch, Tensor) or batch.dim() != 4 or not batch.is_floating_point():
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ModelInputError(f"{self.source}: expected a (B, C, H, W) float batch, got {shape}")
        for axis, key in ((0, "batch"), (2, "height_range"), (3, "width_range")):
            bounds = contract.get(key)
            if bounds and not bounds[0] <= batch.shape[axis] <= bounds[1]:
                raise ModelInputError(f"{self.source}: this export takes {key.split('_')[0]} sizes in [{bounds[0]}, "
                                      f"{bounds[1]}], got {batch.shape[axis]}")
        divisor = contract.get("size_divisor")
        if contract.get("dynamic_size") and divisor and (batch.shape[2] % divisor or batch.shape[3] % divisor):
            raise ModelInputError(f"{self.source}: height and width must be multiples of {divisor}, got "
                                  f"{tuple(batch.shape[-2:])}")
        return dict(zip(self.meta["outputs"], self._run(batch.float().to(self.device))))


def load_dense(path: str | Path, device: str = "cpu", threads: int | None = None) -> ExportedDense:
    """An exported segmentation model or classifier (`export.dense`), ready to call on a batch: `.onnx` runs in
    onnxruntime (CPU provider, `threads` intra-op threads), anything else is read as a torch.export
    ExportedProgram with its metadata from FILE.json and runs on `device`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such exported model file")
    if path.suffix.lower() == ".onnx":
        session, meta, names = _onnx_session(path, threads, DENSE_TASKS)

        def run(batch: Tensor):
            return tuple(torch.from_numpy(o) for o in session.run(names, {"image": batch.cpu().numpy()}))

        return ExportedDense(run, meta, torch.device("cpu"), str(path))
    module, meta = _program_module(path, torch.device(device), DENSE_TASKS)

    def run_program(batch: Tensor):
        with torch.no_grad():
            out = module(batch)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return ExportedDense(run_program, meta, torch.device(device), str(path))
