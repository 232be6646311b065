"""Named presets and the one config loader every task uses.

A task's configs come from its defaults (the config dataclasses), then a named preset, then a YAML file, then
`--set` overrides; `PresetFamily` says where a task keeps its presets. `load_config` is detection's:

    cfg = load_config("htc_r50_fpn_20e", ["train.lr=0.01"])      # preset + its 20-epoch schedule + an override
    cfg = load_config("my_run.yaml")                            # a YAML file, which may name `model.preset`
    cfg = load_config("demo_htc_r18")                           # a recipe shipped in cascadevision/configs/

Recipes are YAML files in the package (`cascadevision/configs/*.yaml`, also reachable as `configs/` from a
repository checkout): a name that is not a preset is looked up there, so an installed package finds them too.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, load_yaml, parse_overrides, update, validate
from .errors import ConfigError
from .models.build import build_from_config
from .models.presets import PRESETS, TRAIN_PRESETS, preset_config, preset_names

__all__ = ["PresetFamily", "DETECTION_PRESETS", "RECIPES_DIR", "load_config", "preset_config", "preset_names",
           "recipe_names", "PRESETS", "TRAIN_PRESETS"]

RECIPES_DIR = Path(__file__).parent / "configs"  # shipped as package data (pyproject.toml)


def recipe_names(directory: Path = RECIPES_DIR) -> list[str]:
    """The recipes shipped in `directory`: YAML files named without their suffix."""
    return sorted(path.stem for path in directory.glob("*.yaml"))


@dataclass(frozen=True)
class PresetFamily:
    """A task's presets: its config class, how a preset name changes a config, and where the name is written
    (`model.preset` for detection and segmentation, a top-level `preset` for early exit)."""
    config_cls: type
    apply: Callable[[Any, str], Any]  # (default config, preset name) -> that preset's config (and its schedule)
    names: Callable[[], list[str]]
    preset_key: tuple[str, ...] = ("model", "preset")
    validate: Callable[[Any], None] | None = validate  # None: the task's values are checked where they are used
    recipes: Path | None = None  # a directory of YAML recipes, found by name when the name is not a preset

    def load(self, preset_or_path: str | Path | None = None, overrides: list[str] | dict | None = None):
        """A config from a preset name or a YAML file, then `overrides` (a list of 'a.b=v' or a nested dict).

        A name that is neither a file nor a preset is looked up among the `recipes` (`NAME.yaml` there).
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
            elif self.recipes is not None and text not in self.names():
                if not (self.recipes / f"{text}.yaml").is_file():
                    raise ConfigError(f"unknown model preset '{text}', and no recipe or YAML file of that name; presets: "
                                      f"{', '.join(self.names())}; recipes: {', '.join(recipe_names(self.recipes))}")
                data = load_yaml(self.recipes / f"{text}.yaml")
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


DETECTION_PRESETS = PresetFamily(Config, _detection_preset, preset_names, recipes=RECIPES_DIR)


def load_config(preset_or_path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """A full detection Config from a preset name, a YAML file or a recipe name (`recipe_names()`), then
    `overrides` (a list of 'a.b=v' or a nested dict). A YAML file may name a preset under `model.preset`; its values are applied on top of that preset (and
    the preset's training schedule, e.g. 20 epochs for `htc_r50_fpn_20e`). The result is checked by `validate`."""
    return DETECTION_PRESETS.load(preset_or_path, overrides)


# ----------------------------------------------------------------------------------------------------------
# what `cascadevision presets` shows


def describe_preset(name: str) -> str:
    """One line saying what a detection preset is, read from its config (so it cannot drift from it):
    head and stages, backbone and neck, input size, training schedule."""
    cfg = load_config(name)
    model, head, train = cfg.model, cfg.model.roi_head, cfg.train
    if head.type == "htc":
        kind = "HTC" + (" + semantic branch" if head.htc.with_semantic else " without semantic branch")
    else:
        kind = ("Cascade " if head.type == "cascade" else "") + ("Mask R-CNN" if head.with_mask else "Faster R-CNN")
    if head.type != "standard":
        kind += f", {head.num_stages} stages"
    norms = {model.backbone.norm, model.neck.norm, head.box_head.norm, head.mask_head.norm} - {"none", "bn"}
    if norms:
        kind += ", " + "/".join(sorted(norms)).replace("gn", "GroupNorm").replace("syncbn", "SyncBN")
    if model.backbone.type == "resnet":
        backbone = f"ResNet-{model.backbone.depth}"
    else:  # efficientvit_m4
        backbone = "EfficientViT-" + model.backbone.type.rsplit("_", 1)[-1].upper()
    width, height = model.input.scale
    schedule = f"{train.max_iters} iters" if train.max_iters > 0 else f"{train.epochs} epochs"
    return f"{kind}; {backbone} FPN-{model.neck.out_channels}; {width}x{height}; {schedule}"


def parameter_count(name: str, num_classes: int = 80) -> int:
    """Parameters of a detection preset with `num_classes` classes, counted on a model built on the meta
    device (shapes only: nothing is allocated or initialised with values)."""
    model_cfg = dataclasses.replace(preset_config(name), num_classes=num_classes)
    with torch.device("meta"):
        model = build_from_config(model_cfg)
    return sum(parameter.numel() for parameter in model.parameters())


def recipe_summary(name: str, directory: Path = RECIPES_DIR) -> str:
    """The first line of a recipe's leading comment."""
    for line in (directory / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def preset_table(num_classes: int = 80) -> str:
    """The presets with their parameter counts and what they are, then the shipped YAML recipes."""
    names = preset_names()
    width = max(len(n) for n in names)
    lines = [f"{'preset':<{width}}  {'params':>7}  what (parameters with {num_classes} classes)"]
    for name in names:
        lines.append(f"{name:<{width}}  {parameter_count(name, num_classes) / 1e6:6.1f}M  {describe_preset(name)}")
    recipes = recipe_names()
    if recipes:
        lines.append(f"\nrecipes (YAML in {RECIPES_DIR}; `cascadevision config NAME` prints one resolved, "
                     "`cascadevision train NAME ...` trains it):")
        rwidth = max(len(n) for n in recipes)
        lines += [f"{name:<{rwidth}}  {recipe_summary(name)}" for name in recipes]
    return "\n".join(lines)
