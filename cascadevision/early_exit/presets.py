"""Named early-exit presets. Each is a set of changes to the defaults in `config.py`, overridable by `--set`.

- `mobile`: 2 stages, exit when the top probability reaches 0.85 (cheap, tolerant);
- `cloud`: 4 stages, exit at 0.95 (the default preset);
- `batch`: 4 stages, no early exit (every sample runs the whole model; the intermediate heads are skipped).
"""
from __future__ import annotations

from ..config import update
from ..errors import ConfigError
from ..presets import PresetFamily
from .config import ExitsConfig

PRESETS: dict[str, dict] = {
    "mobile": {"model": {"num_stages": 2}, "early_exit": {"policy": "max_prob", "threshold": 0.85}},
    "cloud": {"model": {"num_stages": 4}, "early_exit": {"policy": "max_prob", "threshold": 0.95}},
    "batch": {"model": {"num_stages": 4}, "early_exit": {"policy": "none"}},
}
DEFAULT_PRESET = "cloud"


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _apply_preset(cfg: ExitsConfig, name: str) -> ExitsConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown early-exit preset '{name}'; choose one of {', '.join(preset_names())}")
    return update(cfg, {"preset": name, **PRESETS[name]})


# the preset is a top-level key; values are checked where they are used (policies, execution)
EXITS_PRESETS = PresetFamily(ExitsConfig, _apply_preset, preset_names, preset_key=("preset",), validate=None)


def exits_config(preset: str | None = DEFAULT_PRESET, overrides: list[str] | dict | None = None) -> ExitsConfig:
    """The config of a preset (by name) with overrides applied: ['early_exit.threshold=0.9'] or a nested dict."""
    return EXITS_PRESETS.load(preset or DEFAULT_PRESET, overrides)
