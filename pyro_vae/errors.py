"""Errors that carry a message meant for the user.

The CLI turns any ``PyroVAEError`` into one line on stderr and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""


class PyroVAEError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class DataError(PyroVAEError):
    """The data is missing, malformed, or does not suit the model."""


class RunError(PyroVAEError):
    """A run directory is missing, already exists, or is inconsistent."""


class CheckpointError(RunError):
    """A checkpoint is missing, truncated, or does not match its run's config."""


class ConfigError(PyroVAEError):
    """An option value is out of range or unknown."""


class TrainingDiverged(PyroVAEError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""
