"""Fetching weight files by URL into a cache directory (once), with an optional sha256 check."""
from __future__ import annotations

import hashlib
import os
import re
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


# MMDetection's (and torch.hub's) file names end in the first hex digits of the file's sha256: name-1a2b3c4d.pth
_SHORT_HASH = re.compile(r"-([0-9a-f]{8})\.[A-Za-z]+$")


def is_url(text: str | Path) -> bool:
    return urllib.parse.urlparse(str(text)).scheme in ("http", "https", "file")


def cached_path(url: str) -> Path:
    """Where `resolve` keeps the download of `url` (and where a file fetched by hand for it goes)."""
    return cache_dir() / (Path(urllib.parse.urlparse(url).path).name or "weights.pth")


def short_hash(name: str) -> str:
    """The sha256 prefix a file name carries (`htc_r50_fpn_1x_coco_20200317-7332cf16.pth` -> '7332cf16'), or ''."""
    match = _SHORT_HASH.search(name)
    return match.group(1) if match else ""


def resolve(path_or_url: str | Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """A local path for a file path or an http(s)/file URL; URLs are downloaded once into `cache_dir()`.

    A file name carrying MMDetection's short hash (`name_YYYYMMDD-1a2b3c4d.pth`) is checked against it once,
    when downloaded; with `sha256` the whole digest is checked (a prefix of at least 8 hex digits is accepted).
    A download that fails says where to put the file by hand, and what its sha256 should be.
    """
    text = str(path_or_url)
    if sha256 is not None and len(sha256) < 8:
        raise CheckpointError(f"{text}: sha256 '{sha256}' is too short to check (give at least 8 hex digits)")
    if is_url(text):
        target = cached_path(text)
        if not target.exists():
            _download(text, target, progress, sha256 or short_hash(target.name), from_name=not sha256)
            return target  # checked as it was downloaded
    else:
        target = Path(text).expanduser()
        if not target.exists():
            raise CheckpointError(f"{target}: no such weights file")
    if sha256:
        actual = sha256_of(target)
        if not actual.startswith(sha256.lower()):
            raise CheckpointError(f"{target}: sha256 {actual[:16]}... does not match the expected {sha256[:16]}...")
    return target


def _download(url: str, target: Path, progress: bool, expected_sha256: str = "", from_name: bool = False) -> None:
    """Fetch `url` to `target` through a temporary file, kept only when its sha256 begins with `expected_sha256`
    (`from_name`: that prefix is the one the file name carries)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        by_hand = f"; to use a copy fetched another way, put it at {target}"
        if expected_sha256:
            where = ", the hex digits its name ends in" if from_name else ""
            by_hand += f" (its sha256 should begin with {expected_sha256.lower()}{where})"
        raise CheckpointError(f"{url}: download failed ({reason}){by_hand}") from None
    if expected_sha256:
        actual = sha256_of(Path(tmp))
        if not actual.startswith(expected_sha256.lower()):
            Path(tmp).unlink(missing_ok=True)
            raise CheckpointError(f"{url}: the downloaded file's sha256 {actual[:16]}... does not begin with "
                                  f"{expected_sha256.lower()[:16]}: not kept (a truncated or altered download; "
                                  f"if the file is right, put it at {target} by hand)")
    shutil.move(tmp, target)
