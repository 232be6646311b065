"""Moved to `cascadevision.tasks.detection` (the detection task: train, evaluate, predict); these names stay
importable from here. Image file lists are in `cascadevision.io.images`."""
from .tasks.detection import (IMAGE_SUFFIXES, checkpoint_classes, collect_images, load_model, resolve_device,
                              run_evaluation, run_prediction, run_training, train_datasets, unique_output_names)

__all__ = ["IMAGE_SUFFIXES", "checkpoint_classes", "collect_images", "load_model", "resolve_device",
           "run_evaluation", "run_prediction", "run_training", "train_datasets", "unique_output_names"]
