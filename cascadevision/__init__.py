"""cascadevision: cascade visual recognition in PyTorch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names load on first use, so `import cascadevision` does not import torch: the CLI (or a script)
# can set up the OpenMP runtime first (`cascadevision.runtime`), which only works before torch is loaded.
# `build_model` is the models floor's builder with the early-exit hook attached (see early_exit/detection.py)
_LAZY = {"Config": ".config", "ModelConfig": ".config", "load_config": ".presets",
         "build_model": ".early_exit.detection", "load_weights": ".io.weights"}

__all__ = ["__version__", "Config", "ModelConfig", "build_model", "load_config", "load_weights"]

if TYPE_CHECKING:
    from .config import Config, ModelConfig
    from .io.weights import load_weights
    from .early_exit.detection import build_model
    from .presets import load_config


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
