"""cascadevision: cascade visual recognition in PyTorch."""
__version__ = "0.1.0"

from .config import Config, ModelConfig, load_config  # noqa: E402
from .models import build_model  # noqa: E402
from .weights import load_weights  # noqa: E402

__all__ = ["__version__", "Config", "ModelConfig", "build_model", "load_config", "load_weights"]
