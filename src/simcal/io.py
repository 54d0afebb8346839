"""File helpers shared by every stage: the one atomic write, JSON reading with clear errors, checkpoints.

Everything simcal writes that a reader may see half-done (checkpoints, calibrated heads, results
and metrics json, configs, label maps, rewritten logs, the report) goes through
:func:`atomic_open`: a temporary file beside the target, renamed over it only when complete,
with the mode the umask gives like any file ``open()`` creates. Importing this module does not
import torch (checkpoints import it when they are read or written).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from simcal.errors import InputError


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask.

    Read from ``/proc/self/status`` where there is one: reading it with ``os.umask`` means setting
    it for a moment, and a file another thread created in that moment would be world-writable.
    """
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)  # no procfs: set it straight back
        os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it over ``path`` only on success.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). A crash or an exception inside the block
    leaves any previous ``path`` untouched and removes the temporary file, so readers never see a
    half-written result or checkpoint. The file is fsynced before the rename.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, turning a missing file or a syntax error into an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "(file)", "no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(path, "(json)", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise InputError(path, "(json)", "not UTF-8 text") from None


def rewrite_lines(path: str | os.PathLike[str], keep: Any) -> None:
    """Keep only the lines of a text file (a jsonl log) for which ``keep(line)`` is true, atomically."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and keep(line)]
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (a crash never leaves a broken checkpoint)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a missing or unreadable file is an :class:`InputError`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "(file)", "no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(path, "(checkpoint)", f"cannot read: {type(e).__name__}: {e}") from None
