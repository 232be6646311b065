from .build import build_from_config, build_model
from .detector import TwoStageDetector
from .presets import preset_config, preset_names

__all__ = ["build_model", "build_from_config", "TwoStageDetector", "preset_config", "preset_names"]
