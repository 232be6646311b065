"""Fetching weight files by URL into a cache directory (once), with an optional sha256 check."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .errors import CheckpointError


def cache_dir() -> Path:
    root = os.environ.get("CASCADEVISION_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cascadevision"
    return Path(root) / "weights"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(path_or_url: str | Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """A local path for a file path or an http(s)/file URL; URLs are downloaded once into `cache_dir()`.

    The file name may carry MMDetection's short hash (`name_YYYYMMDD-1a2b3c4d.pth`); with `sha256` the whole
    digest is checked (a prefix of at least 8 hex digits is accepted).
    """
    text = str(path_or_url)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme in ("http", "https", "file"):
        name = Path(urllib.parse.urlparse(text).path).name or "weights.pth"
        target = cache_dir() / name
        if not target.exists():
            _download(text, target, progress)
    else:
        target = Path(text).expanduser()
        if not target.exists():
            raise CheckpointError(f"{target}: no such weights file")
    if sha256:
        actual = sha256_of(target)
        if not actual.startswith(sha256.lower()) or len(sha256) < 8:
            raise CheckpointError(f"{target}: sha256 {actual[:16]}... does not match the expected {sha256[:16]}...")
    return target


def _download(url: str, target: Path, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        shutil.move(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(f"{url}: download failed ({reason})") from None
