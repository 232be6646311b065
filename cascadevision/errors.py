"""Errors meant for people. The CLI prints them as one line and exits with status 2."""


class CascadeVisionError(Exception):
    """Base class for every error the library raises on bad input.

    An error raised in a DataLoader worker reaches the main process re-created from torch's long report
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."); the constructor recovers
    the original one-line message from it, so the user sees the same line with or without workers.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_report(args[0], type(self).__name__),)
        super().__init__(*args)


class ConfigError(CascadeVisionError, ValueError):
    """A config file, preset or override is wrong (unknown key, bad value)."""


class DatasetError(CascadeVisionError, ValueError):
    """A dataset file is missing, unreadable or malformed: the message names the file and the annotation."""


class ModelInputError(CascadeVisionError, ValueError):
    """The model was handed inputs it cannot use (a target without a map a head needs, a label outside its
    classes). Datasets are checked in `data/`; this is the model's own last line of defence."""


class CheckpointError(CascadeVisionError, ValueError):
    """A checkpoint cannot be read, is unsafe, or does not fit the model."""


class TrainingError(CascadeVisionError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


class OutputError(CascadeVisionError, OSError):
    """An output location cannot be written, or holds another run that must not be overwritten."""


def _unwrap_worker_report(message: str, class_name: str) -> str:
    """The original message inside torch's worker-exception report, or `message` itself if it is not one."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    marker = f"{class_name}: "
    for line in reversed(message.rstrip().splitlines()):
        start = line.find(marker)
        if start >= 0 and not line.startswith(" "):
            return line[start + len(marker):]
    return message
