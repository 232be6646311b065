"""Checkpoint files: atomic writes, and reads that never run code from the file.

Layout of a training checkpoint (`.pth`, written with `torch.save`; only types `torch.load(weights_only=True)`
accepts: tensors, dicts, lists, tuples, numbers, strings):

    {'state_dict': {name: Tensor},
     'meta': {'config': dict, 'iteration': int, 'epoch': int, 'class_names': list, 'cat_ids': list,
              'cascadevision_version': str},
     'optimizer': ..., 'scheduler': ..., 'scaler': ..., 'rng': ...}   # training state, absent in final.pth

A `.safetensors` file holds the state_dict only, with `meta` as JSON in the header's metadata.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..errors import CheckpointError

_SAFETENSORS_META_KEY = "cascadevision_meta"


def cascadevision_version() -> str:
    return str(__version__)


# ----------------------------------------------------------------------------------------------------------
# writing


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically: readers see the old file or the new one, never a partial one.

    `.safetensors` paths take only `state_dict` (and `meta`, stored as JSON); other paths use `torch.save`.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        extra = sorted(set(state) - {"state_dict", "meta"})
        if extra:
            raise ValueError(f"{path}: a .safetensors file holds only 'state_dict' and 'meta', not {extra}")
        data = _safetensors_bytes(state["state_dict"], state.get("meta"))
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(state, f))
    return path


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Make `dst` a copy of `src` atomically (a hard link when the file system allows it)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here: copy the bytes
        with open(src, "rb") as fin:
            atomic_write(dst, lambda fout: shutil.copyfileobj(fin, fout, 1 << 24))
        return
    os.replace(tmp, dst)


def atomic_write(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Call `write(binary_file)` on a temporary file in `path`'s directory, fsync it, rename it over `path`.

    The file gets the mode `open(path, "w")` would give it (0644 under the usual umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX (Windows has no file modes to fix)
            os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _safetensors_bytes(state_dict: dict, meta: dict | None) -> bytes:
    from safetensors.torch import save  # lazy on purpose: only .safetensors files need the package

    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    metadata = {_SAFETENSORS_META_KEY: json.dumps(meta)} if meta is not None else None
    return save(tensors, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (or a plain state_dict / MMDetection `.pth`).

    Uses `torch.load(weights_only=True)` only, so a file that would need arbitrary Python objects is refused
    instead of unpickled. Every failure is a one-line `CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{path}: {problem}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: the file contains non-tensor Python objects ({', '.join(unsafe[:5])}) "
                "whose unpickling could run code; only tensors, numbers, strings, lists and dicts are loaded"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt, or not made by torch.save)") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict (a state_dict or a checkpoint), found {type(state).__name__}")
    return state


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint at all
        return []


def _load_safetensors(path: Path, map_location: Any) -> dict:
    from safetensors import SafetensorError, safe_open  # lazy on purpose: only .safetensors files need it

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
    state: dict = {"state_dict": state_dict}
    if _SAFETENSORS_META_KEY in metadata:
        try:
            state["meta"] = json.loads(metadata[_SAFETENSORS_META_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: the '{_SAFETENSORS_META_KEY}' metadata is not valid JSON") from None
    return state


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) from any supported file; `module.` prefixes (DDP) are stripped."""
    ckpt = load_checkpoint(path)
    meta = {}
    if isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        meta = ckpt.get("meta") or {}
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        state = ckpt["model"]
    elif isinstance(ckpt, dict):
        state = ckpt
    else:
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict of tensors, got {type(ckpt).__name__})")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return state, meta if isinstance(meta, dict) else {}


def state_dict_mismatch(expected: dict, found: dict, limit: int = 3) -> str:
    """'' when `found` has exactly `expected`'s keys and shapes, else the first differences in one line:
    keys the model needs that the file lacks, keys the file has that the model lacks, and shape differences."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} in the file vs {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in found and hasattr(found[k], "shape")
              and tuple(found[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing from the file", missing), ("not in the model", unexpected),
                         ("shape differs", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)
