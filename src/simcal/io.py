"""Small file helpers shared by every stage: atomic writes and JSON reading with clear errors."""

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
    umask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it over ``path`` only on success.

    A crash or an exception inside the block leaves any previous ``path`` untouched and removes
    the temporary file, so readers never see a half-written result or checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the file the mode open() would
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
