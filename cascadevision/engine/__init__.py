"""Training and evaluation loops, checkpoints, and the torch.distributed helpers they use."""
from ..io.checkpoint import load_checkpoint, save_checkpoint
from .evaluator import coco_eval, evaluate, results_to_coco
from .trainer import WarmupMultiStepLR, build_optimizer, train

__all__ = ["train", "evaluate", "results_to_coco", "coco_eval", "save_checkpoint", "load_checkpoint",
           "WarmupMultiStepLR", "build_optimizer"]
