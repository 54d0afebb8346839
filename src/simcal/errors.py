"""The errors users see: reported by the CLI on one line, without a traceback."""

from __future__ import annotations

import os


class SimcalError(Exception):
    """Base of every error the CLI reports as ``simcal: error: <message>`` (exit code 2)."""


class InputError(SimcalError):
    """A user-supplied file or value is wrong.

    The message always names the file (or option) and the field, so the CLI can print it on a
    single line: ``simcal: error: FILE: FIELD: what is wrong``.
    """

    def __init__(self, source: str | os.PathLike[str], field: str, message: str) -> None:
        self.source = str(source)
        self.field = field
        self.message = message
        super().__init__(f"{self.source}: {field}: {message}")


class TrainingError(SimcalError):
    """A run cannot go on (a non-finite loss, say); the last good checkpoint is kept."""
