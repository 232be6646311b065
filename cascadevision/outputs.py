"""Output locations: checked before any work, so a bad `--out` is one line, not a traceback after the compute."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import OutputError


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create `path` (and its parents) if needed and check that a file can be written in it.

    Raises OutputError naming the path and the reason (permission denied, a file in the way, read-only or
    full file system) instead of letting the first write fail after the work is done.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: the {what} is an existing file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the {what} here ({_reason(exc)})") from None
    return path


def ensure_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that `path` can be written: its directory is writable and `path` is not a directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: the {what} is a directory")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), f"directory of the {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: cannot overwrite the {what} (permission denied)")
    return path


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.ENOTDIR:
        return "a parent is a file, not a directory"
    return exc.strerror or type(exc).__name__
