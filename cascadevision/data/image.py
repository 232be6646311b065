"""Reading image files into tensors, with one-line errors for files that are missing, truncated or corrupt."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode `path` in its stored orientation (no EXIF transpose, no mode conversion).

    Decoding is forced here (PIL decodes lazily), so a truncated or corrupt file fails now, with a
    `DatasetError` naming the file, rather than later inside a worker.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found" if not path.exists() else f"{path}: not a file")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not an image file, or a format PIL cannot read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / corrupt streams
        raise DatasetError(f"{path}: cannot decode image ({_one_line(exc)})") from None
    return image


def exif_transpose(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """Apply the EXIF orientation tag (a no-op for images without one)."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:
        raise DatasetError(f"{path}: cannot apply EXIF orientation ({_one_line(exc)})") from None


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image of any common mode -> uint8 tensor (3, H, W), RGB.

    Alpha is dropped (as OpenCV's `imread` does in the reference), 16-bit and 32-bit integer grayscale is
    rescaled from 0..65535 to 0..255, float grayscale in 0..1 is scaled by 255.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.float64)
        array = np.clip(array, 0, 65535) / 257.0  # 65535 -> 255, keeps the full range
        gray = np.rint(array).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "F":
        array = np.asarray(image).astype(np.float64)
        array = np.nan_to_num(array)
        if array.size and array.max() <= 1.0:
            array = array * 255.0
        gray = np.rint(np.clip(array, 0, 255)).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    else:
        if mode == "P":
            image = image.convert("RGBA")  # resolves palette transparency without PIL's warning
        if image.mode != "RGB":
            image = image.convert("RGB")
        rgb = np.asarray(image)
    return torch.from_numpy(np.array(rgb.transpose(2, 0, 1), dtype=np.uint8, order="C"))  # copy: PIL's is read-only


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a uint8 tensor (3, H, W) in RGB order, with its EXIF orientation applied.

    Handles grayscale, palette, alpha (dropped), CMYK and 16-bit images. Raises `DatasetError` naming the file
    when it is missing, unreadable, truncated or corrupt.
    """
    image = exif_transpose(open_image(path), path)
    try:
        return to_rgb_tensor(image)
    except (OSError, ValueError) as exc:  # a mode PIL cannot convert to RGB
        raise DatasetError(f"{path}: cannot convert mode {image.mode} to RGB ({_one_line(exc)})") from None


def load_label_map(path: str | os.PathLike) -> torch.Tensor:
    """Read a single-channel label PNG (semantic map) as uint8 (H, W); palette images give their indices."""
    image = open_image(path)
    if image.mode in ("L", "P"):
        array = np.asarray(image)
    elif image.mode.startswith("I"):
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DatasetError(f"{path}: label map has values outside 0..255 "
                               f"(min {array.min()}, max {array.max()})")
        array = array.astype(np.uint8)
    else:
        raise DatasetError(f"{path}: label map must be single-channel (mode L or P), got mode {image.mode}")
    return torch.from_numpy(np.array(array, dtype=np.uint8))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
