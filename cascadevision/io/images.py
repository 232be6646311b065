"""The image files a command was given: files named directly, and the images inside the folders named."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(paths: list[str]) -> list[Path]:
    """The image files named in `paths`, and those directly inside the directories named there (by suffix;
    sub-directories, even one called `x.jpg`, are not images). A path that does not exist is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such image file or directory")
    if not files:
        raise DatasetError(f"no images found in {', '.join(paths)}")
    return files


def unique_output_names(files: list[Path], suffix: str = ".png") -> list[str]:
    """One output file name per input, never two alike: `a.png` for `a.jpg`; `a_jpg.png` and `a_png.png` when
    both `a.jpg` and `a.png` are given; a numbered name when even those collide (same name in two folders)."""
    stems = [f.stem for f in files]
    repeated = {s for s in stems if stems.count(s) > 1}
    names, taken = [], set()
    for file, stem in zip(files, stems):
        base = f"{stem}_{file.suffix.lstrip('.').lower()}" if stem in repeated else stem
        name, k = f"{base}{suffix}", 1
        while name in taken:
            k += 1
            name = f"{base}_{k}{suffix}"
        taken.add(name)
        names.append(name)
    return names
