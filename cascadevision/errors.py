"""Errors meant for people. The CLI prints them as one line and exits with status 2."""


class CascadeVisionError(Exception):
    """Base class for every error the library raises on bad input."""


class ConfigError(CascadeVisionError, ValueError):
    """A config file, preset or override is wrong (unknown key, bad value)."""


class DatasetError(CascadeVisionError, ValueError):
    """A dataset file is missing, unreadable or malformed: the message names the file and the annotation."""


class CheckpointError(CascadeVisionError, ValueError):
    """A checkpoint cannot be read, is unsafe, or does not fit the model."""


class TrainingError(CascadeVisionError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""
