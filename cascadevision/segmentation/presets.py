"""Named segmentation presets, each changing only what differs from the defaults in `config.py`, and the config
loader (`load_seg_config`: the one loader of `cascadevision.presets`, with these presets)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import update
from ..errors import ConfigError
from ..models.cascade_decoder import DecoderConfig, SegLossConfig
from ..presets import PresetFamily
from .config import SegmentationConfig, SegModelConfig


def _small_cpu(cfg: SegModelConfig) -> SegModelConfig:
    """ResNet-18 and 128 x 128 inputs: trains on a CPU in minutes."""
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, depth=18),
                               input=dataclasses.replace(cfg.input, size=(128, 128)))


def _model(decoder: str = "cascade", depth: int = 50, *, backbone_type: str = "resnet",
           channels: tuple[int, ...] = (), fpn_channels: int = 256, mutation: bool = False) -> SegModelConfig:
    cfg = SegModelConfig()
    loss = SegLossConfig(mutation=True, ce_weight=0.3, dice_weight=0.7) if mutation else cfg.loss
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, type=backbone_type, depth=depth),
        decoder=DecoderConfig(type=decoder, channels=channels, fpn_channels=fpn_channels), loss=loss)


# the FPN baseline's width that gives about the parameters of the CASCADE decoder on ResNet-18 (8.9M)
FPN_R18_CHANNELS = 400

SEG_PRESETS = {
    "cascade_r18": lambda: _small_cpu(_model("cascade")),
    "cascade_add_r18": lambda: _small_cpu(_model("cascade_add")),
    "cascade_add_r18_mutation": lambda: _small_cpu(_model("cascade_add", mutation=True)),  # MERIT-style
    "fpn_r18": lambda: _small_cpu(_model("fpn", fpn_channels=FPN_R18_CHANNELS)),
    "cascade_r50": lambda: _model("cascade", 50, channels=(512, 320, 128, 64)),  # PVT-CASCADE's widths
    "cascade_add_r50_mutation": lambda: _model("cascade_add", 50, channels=(768, 384, 192, 96), mutation=True),
    "cascade_efficientvit_m4": lambda: _model("cascade", backbone_type="efficientvit_m4"),
}

# the small presets also get a schedule that trains on a CPU in a few minutes (the defaults are Synapse's 150 epochs)
_CPU_SCHEDULE = {"data": {"batch_size": 8}, "train": {"max_iters": 400, "checkpoint_interval": 100}}
SEG_SCHEDULES = {name: _CPU_SCHEDULE for name in SEG_PRESETS if name.endswith("_r18") or "_r18_" in name}


def seg_preset_config(name: str) -> SegModelConfig:
    if name not in SEG_PRESETS:
        raise ConfigError(f"unknown segmentation preset '{name}'; available: {', '.join(sorted(SEG_PRESETS))}")
    return dataclasses.replace(SEG_PRESETS[name](), preset=name)


def seg_preset_names() -> list[str]:
    return sorted(SEG_PRESETS)


def _apply_preset(cfg: SegmentationConfig, name: str) -> SegmentationConfig:
    cfg = dataclasses.replace(cfg, model=seg_preset_config(name))
    return update(cfg, SEG_SCHEDULES.get(name, {}))


SEGMENTATION_PRESETS = PresetFamily(SegmentationConfig, _apply_preset, seg_preset_names)


def load_seg_config(preset_or_path: str | Path | None = None,
                    overrides: list[str] | dict | None = None) -> SegmentationConfig:
    """A SegmentationConfig from a preset name or a YAML file (which may name `model.preset`), then overrides."""
    return SEGMENTATION_PRESETS.load(preset_or_path, overrides)
