"""Weights I/O, the floor above the models: checkpoint files (`checkpoint`), our and foreign weight formats
(`weights`: detectors, MMDetection, torchvision ResNets; `pretrained`: the EfficientViT and HAT-Net releases and
their name maps), image file lists (`images`). Import the submodules; this package imports nothing itself."""
