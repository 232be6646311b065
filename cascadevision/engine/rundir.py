"""A training run's directory: one run per directory, one writer per run.

- A new run refuses a directory that already holds something, unless it continues the run there (`resume`) or
  was told to replace it (`overwrite`, which removes the earlier run's files and says which).
- While a run trains, process 0 holds an exclusive `flock` on `train.lock`; a second trainer on the same
  directory (a resume started twice, a stray torchrun rank) is refused instead of interleaving checkpoints.
  The lock dies with its process, so a killed run never leaves a stale lock behind.
- Temporary files of writes that a kill interrupted (`.NAME.XXXX.tmp`, `.NAME.PID.link`) are removed once the
  lock is held: nobody else can be writing them then.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

from ..errors import CheckpointError, OutputError
from ..outputs import ensure_writable_dir
from .loggers import RUN_DIR_ENTRIES

LOCK_NAME = "train.lock"
# what a training run writes into its directory; `overwrite` removes these and nothing else
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss_curve.png", "checkpoints", "eval", *RUN_DIR_ENTRIES, LOCK_NAME)
_LEFTOVER = re.compile(r"^\..+\.(tmp|\d+\.link)$")


def check_run_dir(out_dir: str | os.PathLike, *, resume: bool | str | os.PathLike = False,
                  overwrite: bool = False, resumable: bool = True) -> Path:
    """Check, before any work and without writing anything, that a run may use `out_dir`. `resumable=False`:
    the command has no --resume (its refusal does not offer one)."""
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise OutputError(f"{out_dir}: give --resume (continue the run) or --overwrite (replace it), not both")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: the run directory is an existing file, not a directory")
    if resume is True and not (out_dir / "checkpoints" / "latest.pth").is_file():
        raise CheckpointError(f"{out_dir}: nothing to resume: no checkpoints/latest.pth in this run directory")
    if resume or overwrite:
        return out_dir
    found = _entries(out_dir)
    if found:
        listing = ", ".join(found[:6]) + (f", ... ({len(found)} entries)" if len(found) > 6 else "")
        resume_hint = "--resume to continue that run, " if resumable else ""
        raise OutputError(f"{out_dir}: holds another run or other files ({listing}); use {resume_hint}"
                          "--overwrite to replace it, or another --out")
    return out_dir


def prepare_run_dir(out_dir: str | os.PathLike, *, resume: bool | str | os.PathLike = False,
                    overwrite: bool = False, log=print, run_files: tuple[str, ...] = RUN_FILES,
                    resumable: bool = True) -> Path:
    """`check_run_dir`, then create `out_dir` and check it is writable; with `overwrite`, remove the earlier
    run's files (`run_files`: what this kind of run writes; logging each). Call from process 0 only, before
    taking the lock."""
    out_dir = check_run_dir(out_dir, resume=resume, overwrite=overwrite, resumable=resumable)
    ensure_writable_dir(out_dir, "run directory")
    if overwrite:
        removed = [name for name in run_files if name != LOCK_NAME and (out_dir / name).exists()]
        kept = [name for name in _entries(out_dir) if name not in run_files]
        with RunLock(out_dir):  # never remove files a running trainer is writing
            for name in removed:
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if removed:
            log(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out_dir}")
        if kept:
            log(f"--overwrite: kept files that are not a run's: {', '.join(kept)}")
    return out_dir


class RunLock:
    """An exclusive, non-blocking `flock` on `out_dir/train.lock` for the life of the `with` block."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{self.path.parent}: another process (pid {holder}) is training in this run "
                              f"directory (it holds {self.path}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def remove_leftovers(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes under `out_dir` (hold the lock first)."""
    out_dir = Path(out_dir)
    removed = []
    for folder in (out_dir, out_dir / "checkpoints", out_dir / "eval"):
        if folder.is_dir():
            for path in folder.iterdir():
                if _LEFTOVER.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def _entries(out_dir: Path) -> list[str]:
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_NAME)
