"""Semantic segmentation with the CASCADE decoder: configs (`config`), presets (`presets`), the model and its
losses (`model`), image + label-map datasets (`dataset`), mIoU / Dice (`metrics`), overlays (`visualize`). The
train / eval / predict jobs behind `cascadevision segment` are the segmentation task, `cascadevision.tasks.segmentation`."""
from ..tasks.segmentation import evaluate, model_from_checkpoint, run_evaluation, run_prediction, run_training
from .config import SegDataConfig, SegmentationConfig, SegModelConfig
from .dataset import SegmentationDataset
from .metrics import ConfusionMatrix, format_scores
from .model import Segmenter, build_segmenter
from .presets import load_seg_config, seg_preset_config, seg_preset_names

__all__ = [
    "ConfusionMatrix", "SegDataConfig", "SegModelConfig", "SegmentationConfig", "SegmentationDataset", "Segmenter",
    "build_segmenter", "evaluate", "format_scores", "load_seg_config", "model_from_checkpoint", "run_evaluation",
    "run_prediction", "run_training", "seg_preset_config", "seg_preset_names",
]
