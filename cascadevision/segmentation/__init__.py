"""Semantic segmentation with the CASCADE decoder: configs and presets, image + label-map datasets, mIoU / Dice,
and the train / eval / predict jobs behind `cascadevision segment`."""
from .config import (SegDataConfig, SegmentationConfig, SegModelConfig, build_segmenter, load_seg_config,
                     seg_preset_config, seg_preset_names)
from .dataset import SegmentationDataset
from .engine import evaluate, model_from_checkpoint, run_evaluation, run_prediction, run_training
from .metrics import ConfusionMatrix, format_scores

__all__ = [
    "ConfusionMatrix", "SegDataConfig", "SegModelConfig", "SegmentationConfig", "SegmentationDataset",
    "build_segmenter", "evaluate", "format_scores", "load_seg_config", "model_from_checkpoint", "run_evaluation",
    "run_prediction", "run_training", "seg_preset_config", "seg_preset_names",
]
