"""Moved to `cascadevision.io.checkpoint` (checkpoint files are weights I/O, a floor below the engine); these
names stay importable from here."""
from ..io.checkpoint import (atomic_copy, atomic_write, cascadevision_version, load_checkpoint, save_checkpoint,
                             state_dict_mismatch)

__all__ = ["atomic_copy", "atomic_write", "cascadevision_version", "load_checkpoint", "save_checkpoint",
           "state_dict_mismatch"]
