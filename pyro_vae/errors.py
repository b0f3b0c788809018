"""Errors that carry a message meant for the user.

The CLI turns any ``PyroVAEError`` into one line on stderr and a non-zero exit code;
anything else is a bug and keeps its traceback.

A message names the setting to change in the words of whoever called: ``--epochs 5`` on
the command line, ``epochs=5`` from Python. It is written once, as a template whose
fields are ``Flag``s (``ConfigError("{epochs} must be at least 1", epochs=Flag("epochs"))``);
``str(error)`` renders it for Python and ``error.cli_message()`` for the command line.
"""

from __future__ import annotations

from typing import Any

_UNSET = object()


class Flag:
    """A setting named in an error message: ``--kl-warmup 3`` on the command line,
    ``kl_warmup=3`` in Python. A field of a nested config is named ``outer.inner``
    (``m1.z_dim``; ``--m1-z-dim`` on the command line). ``cli`` replaces the command-line
    wording where the two differ by more than the spelling (e.g. a positional argument)."""

    def __init__(self, name: str, value: Any = _UNSET, cli: str | None = None):
        self.name, self.value, self.cli_text = name, value, cli

    def cli(self) -> str:
        if self.cli_text is not None:
            return self.cli_text
        flag = "--" + self.name.replace(".", "-").replace("_", "-")
        return flag if self.value is _UNSET else f"{flag} {self.value}"

    def api(self) -> str:
        return self.name if self.value is _UNSET else f"{self.name}={self.value!r}"


class PyroVAEError(Exception):
    """Base class: the message says what is wrong and what to do about it."""

    exit_code = 1

    def __init__(self, message: str, **flags: Flag):
        self.template, self.flags = message, flags
        super().__init__(self._render(Flag.api))

    def _render(self, how: Any) -> str:
        text = self.template  # str.replace, not format: values quoted in the text may hold braces
        for key, flag in self.flags.items():
            text = text.replace("{" + key + "}", how(flag))
        return text

    def cli_message(self) -> str:
        """The message with its settings spelt as command-line options."""
        return self._render(Flag.cli)


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


class Interrupted(RunError):
    """Training stopped on Ctrl-C (SIGINT) or SIGTERM after saving its state. The exit
    status is the shell's for that signal: 128 + its number (130, 143)."""

    def __init__(self, message: str, signum: int, **flags: Flag):
        super().__init__(message, **flags)
        self.exit_code = 128 + signum
