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
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def worker_stopped_by(e: BaseException) -> str | None:
    """``"SIGTERM"`` / ``"SIGINT"`` when ``e`` (or an error it interrupted) is torch's report of a data
    loader worker stopped by that signal: a signal to the whole process group (Ctrl-C in a shell,
    a scheduler, torchrun stopping the other ranks when one fails), not a lack of memory."""
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen)
        if isinstance(seen, RuntimeError) and text.startswith("DataLoader worker"):
            if "signal: Terminated" in text:
                return "SIGTERM"
            if "signal: Interrupt" in text:
                return "SIGINT"
        seen = seen.__context__
    return None


def stopped_line(name: str) -> str:
    """The one line a command stopped by ``name`` (SIGTERM, SIGINT) ends with; under torchrun it says
    which rank this is and that torchrun stops every rank when one fails."""
    line = f"simcal: {name}: stopped; no file was left half-written (train and calibrate continue with --resume)"
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        line += (
            f" [rank {os.environ.get('RANK', '?')} of {world}: torchrun stops every rank when one fails; the rank "
            "that failed printed why, and torchrun's summary names it]"
        )
    return line


#: what torch.distributed's backends say when a peer process is gone
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_rank_lost(e: BaseException, lost_ranks: Callable[[], tuple[list[int], list[int]]]) -> str | None:
    """The one-line message when ``e`` is a collective failing under torchrun because another rank
    died (gloo's "Connection reset by peer", NCCL's aborted communicator), else ``None``: it names
    the ranks ``lost_ranks()`` finds gone (:func:`simcal.engine.distributed.lost_ranks`: those on
    this machine, by pid; ranks on other machines cannot be checked from here, and torchrun's
    summary names the first to fail and why)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, RuntimeError) and any(m in str(seen) for m in _PEER_GONE):
            break
        seen = seen.__context__ or seen.__cause__
    else:
        return None
    gone, elsewhere = lost_ranks()
    if gone:
        who = f"rank {', '.join(map(str, gone))} stopped" if len(gone) == 1 else f"ranks {gone} stopped"
    elif elsewhere:
        who = "a rank on another machine stopped"
    else:
        who = "another rank stopped"
    return (
        f"torchrun: rank {os.environ.get('RANK', '?')} of {world}: {who} (torchrun's summary says why), so this one "
        "stops too; train and calibrate continue with --resume"
    )


def loader_worker_died(e: BaseException) -> str | None:
    """The one-line message when ``e`` (or an error it interrupted) is torch's report of a data
    loader worker process that died (killed by the out-of-memory killer, say), else ``None``.

    torch raises it from a SIGCHLD handler, so it can surface anywhere (inside a checkpoint
    write, even); the checkpoint being written is not kept (:func:`simcal.io.atomic_open`).
    """
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen)
        if isinstance(seen, RuntimeError) and text.startswith("DataLoader worker") and not worker_stopped_by(seen):
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


_TERMINATED = {"received": False, "interrupted": False}
#: signals held back while a file is written (:func:`signals_deferred`): the depth, and the first one that came
_DEFERRED: dict[str, Any] = {"depth": 0, "pending": None}


def _raise_terminated(signum: int, frame: Any) -> None:
    """SIGTERM raises :class:`Terminated`, SIGINT ``KeyboardInterrupt``; inside
    :func:`signals_deferred` they are remembered and raised when the block ends."""
    _TERMINATED["received" if signum == signal.SIGTERM else "interrupted"] = True
    if _DEFERRED["depth"]:
        _DEFERRED["pending"] = _DEFERRED["pending"] or signum
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def handle_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the previous handler.

    Python drops an exception raised where it cannot propagate (a fork hook, a finaliser): the
    signal is remembered too, so :func:`sigterm_received` still tells the command to end with 143.
    """
    _TERMINATED["received"] = _TERMINATED["interrupted"] = False
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _quiet_about_signals(unraisable: Any) -> None:
    """``sys.unraisablehook`` while a command runs: a signal's exception that landed in a finaliser
    (a DataLoader iterator's ``__del__`` as the loop unwinds) is dropped without Python's
    "Exception ignored in ..." block; the signal is remembered (:func:`signal_received`), so the
    command still stops with its one line. Once a signal has arrived, whatever a finaliser raises
    as the command unwinds is its consequence and is dropped too (under a process-group SIGTERM the
    loader workers die with the main process, and the iterator's ``__del__`` reports "DataLoader
    worker ... killed by signal"). Anything else goes to the previous hook."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) or signal_received() is not None:
        return
    _PREVIOUS_HOOK[0](unraisable)


#: the ``sys.unraisablehook`` that :func:`handle_signals` replaced
_PREVIOUS_HOOK: list[Any] = [sys.unraisablehook]


def handle_signals() -> dict[int, Any]:
    """:func:`handle_sigterm`, and SIGINT through the same handler (``KeyboardInterrupt``, deferred
    like SIGTERM while a file is written), and :func:`_quiet_about_signals` as the unraisable hook;
    returns the previous handlers, for :func:`restore_signals`. A signal the process was started
    ignoring (SIGINT in a script's background job) stays ignored, as Python itself leaves it."""
    if sys.unraisablehook is not _quiet_about_signals:
        _PREVIOUS_HOOK[0] = sys.unraisablehook
        sys.unraisablehook = _quiet_about_signals
    _TERMINATED["received"] = _TERMINATED["interrupted"] = False
    return {
        signum: signal.signal(signum, _raise_terminated)
        for signum in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(signum) is not signal.SIG_IGN
    }


def restore_signals(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`handle_signals` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    if sys.unraisablehook is _quiet_about_signals:
        sys.unraisablehook = _PREVIOUS_HOOK[0]


def sigterm_received() -> bool:
    """Whether SIGTERM arrived since :func:`handle_sigterm`."""
    return _TERMINATED["received"]


def signal_received() -> str | None:
    """``"SIGTERM"`` or ``"SIGINT"`` when one arrived since :func:`handle_signals` (SIGTERM first), else ``None``."""
    if _TERMINATED["received"]:
        return "SIGTERM"
    return "SIGINT" if _TERMINATED["interrupted"] else None


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block (a file being written), SIGINT and SIGTERM do not interrupt: the first one
    that arrives is raised when the block ends (:class:`Terminated` for SIGTERM,
    ``KeyboardInterrupt`` for SIGINT), after the write has finished or been rolled back. Without
    it a signal landing inside ``torch.save`` surfaced as torch's own traceback. In the main thread,
    Python's default handlers are replaced for the block (a command's are already these)."""
    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler in (signal.default_int_handler, signal.SIG_DFL):
                installed[signum] = signal.signal(signum, _raise_terminated)
    _DEFERRED["depth"] += 1
    try:
        yield
    finally:
        _DEFERRED["depth"] -= 1
        for signum, handler in installed.items():
            signal.signal(signum, handler)
        if not _DEFERRED["depth"] and _DEFERRED["pending"] is not None:
            signum, _DEFERRED["pending"] = _DEFERRED["pending"], None
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
