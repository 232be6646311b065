"""The tasks, each described once by a `Task` (its presets and config, model builder, datasets, evaluator and
metric table): `detection`, `segmentation`, `exits`. `base` holds what they share: the training entry,
`model_from_checkpoint`, the prediction loop. Import the submodules; this package imports nothing itself, so
that the CLI can name a task without loading it."""
