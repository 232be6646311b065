"""Moved to `cascadevision.tasks.segmentation` (the segmentation task: train, evaluate, predict); these names
stay importable from here."""
from ..tasks.segmentation import (datasets, evaluate, model_from_checkpoint, run_evaluation, run_prediction,
                                  run_training)

__all__ = ["datasets", "evaluate", "model_from_checkpoint", "run_evaluation", "run_prediction", "run_training"]
