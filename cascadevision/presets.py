"""Named presets and the one config loader every task uses.

A task's configs come from its defaults (the config dataclasses), then a named preset, then a YAML file, then
`--set` overrides; `PresetFamily` says where a task keeps its presets. `load_config` is detection's:

    cfg = load_config("htc_r50_fpn_20e", ["train.lr=0.01"])      # preset + its 20-epoch schedule + an override
    cfg = load_config("my_run.yaml")                            # a YAML file, which may name `model.preset`
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, load_yaml, parse_overrides, update, validate
from .models.presets import PRESETS, TRAIN_PRESETS, preset_config, preset_names

__all__ = ["PresetFamily", "DETECTION_PRESETS", "load_config", "preset_config", "preset_names", "PRESETS",
           "TRAIN_PRESETS"]


@dataclass(frozen=True)
class PresetFamily:
    """A task's presets: its config class, how a preset name changes a config, and where the name is written
    (`model.preset` for detection and segmentation, a top-level `preset` for early exit)."""
    config_cls: type
    apply: Callable[[Any, str], Any]  # (default config, preset name) -> that preset's config (and its schedule)
    names: Callable[[], list[str]]
    preset_key: tuple[str, ...] = ("model", "preset")
    validate: Callable[[Any], None] | None = validate  # None: the task's values are checked where they are used

    def load(self, preset_or_path: str | Path | None = None, overrides: list[str] | dict | None = None):
        """A config from a preset name or a YAML file, then `overrides` (a list of 'a.b=v' or a nested dict).

        A YAML file may name a preset (under `preset_key`); its values are applied on top of that preset, and a
        preset named in `overrides` wins over the file's. The result is validated, so a value out of range fails
        here, before any work starts.
        """
        cfg = self.config_cls()
        data: dict = {}
        if preset_or_path:
            text = str(preset_or_path)
            if text.endswith((".yaml", ".yml")) or Path(text).is_file():
                data = load_yaml(text)
            else:
                data = _nested(self.preset_key, text)
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
        preset = _lookup(extra, self.preset_key) or _lookup(data, self.preset_key)
        if preset:
            cfg = self.apply(cfg, preset)
        cfg = update(update(cfg, data), extra)
        if self.validate is not None:
            self.validate(cfg)
        return cfg


def _nested(keys: tuple[str, ...], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _lookup(values: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        values = values.get(key, {}) if isinstance(values, dict) else {}
    return values or None


def _detection_preset(cfg: Config, name: str) -> Config:
    cfg = dataclasses.replace(cfg, model=preset_config(name))
    return update(cfg, {"train": TRAIN_PRESETS.get(name, {})})


DETECTION_PRESETS = PresetFamily(Config, _detection_preset, preset_names)


def load_config(preset_or_path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """A full detection Config from a preset name or a YAML file, then `overrides` (a list of 'a.b=v' or a nested
    dict). A YAML file may name a preset under `model.preset`; its values are applied on top of that preset (and
    the preset's training schedule, e.g. 20 epochs for `htc_r50_fpn_20e`). The result is checked by `validate`."""
    return DETECTION_PRESETS.load(preset_or_path, overrides)
