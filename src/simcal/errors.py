"""The errors users see, and the one place where any failure becomes the one-line form.

Every command ends a bad input, a refused request or a failing disk with one line
``simcal: error: FILE: FIELD: what is wrong`` and exit code 2, never a traceback:

* :class:`InputError` (and every :class:`SimcalError`) is raised with its file and field;
* an :class:`OSError` from the operating system (permission denied, read-only file system, no
  space left, a file where a directory is needed) is described by :func:`describe_os_error`;
* SIGINT and SIGTERM end with one line too (:class:`Terminated`), after every ``with`` block has
  removed its temporary file.

Errors that are bugs (anything else) keep their traceback. ``simcal --debug COMMAND`` or the
environment variable ``SIMCAL_DEBUG=1`` shows the traceback of the one-line errors too.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Any

#: set to 1 for tracebacks behind every one-line error (as ``simcal --debug``)
DEBUG_ENV = "SIMCAL_DEBUG"


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

    def __reduce__(self) -> tuple[Any, tuple[str, str, str]]:
        # rebuilt from its three parts when it crosses a process boundary (a DataLoader worker)
        return type(self), (self.source, self.field, self.message)


class TrainingError(SimcalError):
    """A run cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that the same clean-up runs."""


#: what to do about each operating-system error, by errno
_OS_ADVICE = {
    errno.EACCES: "permission denied: choose a path you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted: choose a path you can write to (or fix its permissions)",
    errno.EROFS: "read-only file system: choose an output path on a writable disk",
    errno.ENOSPC: "no space left on the device: free some space, then run again "
    "(train and calibrate: add --resume, their last checkpoint is kept)",
    errno.EDQUOT: "disk quota exceeded: free some space, then run again "
    "(train and calibrate: add --resume, their last checkpoint is kept)",
    errno.EEXIST: "exists and is not a directory: choose another path",
    errno.ENOTDIR: "part of this path is a file, not a directory: choose another path",
    errno.EISDIR: "is a directory, a file was expected",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer loader workers",
}


def describe_os_error(e: OSError) -> str:
    """``PATH: (file system): what happened: what to do``, one line, for an error from the OS."""
    advice = _OS_ADVICE.get(e.errno or -1) or (e.strerror or str(e) or type(e).__name__)
    if e.filename is None:
        return f"(file system): {advice}"
    where = str(e.filename) if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{where}: (file system): {advice}"


def loader_worker_died(e: BaseException) -> str | None:
    """The one-line message when ``e`` (or an error it interrupted) is torch's report of a data
    loader worker process that died (killed by the out-of-memory killer, say), else ``None``.

    torch raises it from a SIGCHLD handler, so it can surface anywhere (inside a checkpoint
    write, even); the checkpoint being written is not kept (:func:`simcal.io.atomic_open`).
    """
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen)
        if isinstance(seen, RuntimeError) and text.startswith("DataLoader worker"):
            reason = text.split(". ")[0].strip().rstrip(".")
            return (
                f"data.num_workers: num_workers: {reason}: the machine may be out of memory; lower "
                "data.num_workers or the batch size (train and calibrate: then add --resume)"
            )
        seen = seen.__context__
    return None


def debug_requested() -> bool:
    """Whether ``SIMCAL_DEBUG`` asks for tracebacks behind one-line errors (unset, empty, ``0``,
    ``false``, ``no`` and ``off`` do not)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


_TERMINATED = {"received": False}


def _raise_terminated(signum: int, frame: Any) -> None:
    _TERMINATED["received"] = True
    raise Terminated()


def handle_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the previous handler.

    Python drops an exception raised where it cannot propagate (a fork hook, a finaliser): the
    signal is remembered too, so :func:`sigterm_received` still tells the command to end with 143.
    """
    _TERMINATED["received"] = False
    return signal.signal(signal.SIGTERM, _raise_terminated)


def sigterm_received() -> bool:
    """Whether SIGTERM arrived since :func:`handle_sigterm`."""
    return _TERMINATED["received"]
