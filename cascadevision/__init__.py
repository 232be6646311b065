"""cascadevision: cascade visual recognition in PyTorch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names load on first use, so `import cascadevision` does not import torch: the CLI (or a script)
# can set up the OpenMP runtime first (`cascadevision.runtime`), which only works before torch is loaded.
_LAZY = {"Config": ".config", "ModelConfig": ".config", "load_config": ".config", "build_model": ".models",
         "load_weights": ".weights"}

__all__ = ["__version__", "Config", "ModelConfig", "build_model", "load_config", "load_weights"]

if TYPE_CHECKING:
    from .config import Config, ModelConfig, load_config
    from .models import build_model
    from .weights import load_weights


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
