"""Moved to `cascadevision.io.weights` (weight formats and loading) and `cascadevision.io.checkpoint`
(`read_state_dict`); `model_from_checkpoint` is the detection task's (`cascadevision.tasks.detection`). These
names stay importable from here."""
from .io.checkpoint import read_state_dict
from .io.weights import CLASS_DEPENDENT, convert_to_safetensors, detect_format, inspect_weights, load_weights
from .tasks.detection import model_from_checkpoint

__all__ = ["CLASS_DEPENDENT", "convert_to_safetensors", "detect_format", "inspect_weights", "load_weights",
           "model_from_checkpoint", "read_state_dict"]
