"""File helpers shared by every stage: the one atomic write, JSON reading with clear errors, checkpoints.

Everything simcal writes that a reader may see half-done (checkpoints, calibrated heads, results
and metrics json, configs, label maps, rewritten logs, the report) goes through
:func:`atomic_open`: a temporary file beside the target, renamed over it only when complete,
with the mode the umask gives like any file ``open()`` creates. Importing this module does not
import torch (checkpoints import it when they are read or written).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from simcal.errors import InputError, signals_deferred


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


def _temp_prefix(path: Path) -> str:
    """``.<name>.<host>-`` : the start of every temporary file of ``path`` written on this host."""
    return f".{path.name}.{socket.gethostname()}-"


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of ``path`` that a killed process (kill -9, power loss) left.

    A temporary file is named after its writer's host and pid; one whose writer on this host is
    no longer alive is removed. Writers on other hosts (a shared file system) are left alone.
    """
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) : -len(".tmp")].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        except PermissionError:  # alive, another user's
            pass


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", defer_signals: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it over ``path`` only on success.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). A crash or an exception inside the block
    leaves any previous ``path`` untouched and removes the temporary file, so readers never see a
    half-written result or checkpoint. The file is fsynced before the rename. Temporary files of
    ``path`` left by a killed writer are removed first. An :class:`OSError` from writing (no space
    left) names ``path``.

    SIGINT and SIGTERM wait until the file is written and renamed, or rolled back
    (:func:`simcal.errors.signals_deferred`); a writer that streams for a long time (predict's
    results) passes ``defer_signals=False``: a signal then stops it at once and only the final
    flush, fsync and rename are protected.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    if not defer_signals:
        with _atomic_open(Path(path), mode) as f:
            yield f
        return
    with signals_deferred(), _atomic_open(Path(path), mode) as f:
        yield f


@contextmanager
def _atomic_open(path: Path, mode: str) -> Iterator[IO[Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    _remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the folder the user chose, not the temporary file's name
        raise OSError(e.errno, e.strerror or str(e), str(path.parent)) from e
    try:
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, mode) as f:
            yield f
            with signals_deferred():  # written: the commit is never cut in the middle
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # a write() failing says no path: name the file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


#: the file in a run directory whose advisory lock marks the command writing the run
LOCK_NAME = ".simcal.lock"
#: runs this process holds the lock of: real path -> (descriptor, depth); a command that calls another
#: writer of the same run (the demo: train, then calibrate, then predict) re-enters its own lock
_HELD: dict[str, list[int]] = {}


def _command_line() -> str:
    import sys

    words = ["simcal", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith(("simcal", "__main__.py")) else sys.argv
    line = " ".join(words)
    return line if len(line) <= 200 else line[:197] + "..."


@contextmanager
def run_lock(
    root: str | os.PathLike[str], command: str | None = None, lock_file: Path | None = None, remove: bool = False
) -> Iterator[None]:
    """Hold the run ``root``'s write lock for the block: an advisory ``flock`` on ``RUN/.simcal.lock``
    (``lock_file``: another file, for a run that does not exist yet), which the operating system
    releases when the process ends, however it ends (``kill -9`` included).

    A second writer of the same run gets an :class:`InputError` naming the holder's command, pid,
    host and start time. Readers take no lock. Under torchrun only rank 0 takes it (the other
    ranks write their own part files and wait for rank 0). Re-entrant within a process. Where the
    lock file cannot be created (a read-only run), the block runs unlocked: whatever it writes
    there fails on its own, with its own message. ``remove``: delete the lock file as the block ends
    (a ``lock_file`` beside the run, which would otherwise stay in the parent folder). Folders made
    for the lock file are removed again when the block wrote nothing else into them (a command
    refused before it wrote anything leaves no run directory behind).
    """
    import fcntl
    import time

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = Path(lock_file) if lock_file is not None else Path(root) / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    made = []  # the folders the lock file needs that do not exist yet: removed again if nothing else is written
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        except (ValueError, OSError):
            holder = {}
        os.close(fd)
        who = holder.get("command", "another simcal command")
        since = holder.get("started", "?")
        raise InputError(
            root,
            "(lock)",
            f"is being written by `{who}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since}):"
            " one command writes a run at a time; wait for it to end (or stop it), then run again",
        ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    info = {"command": command or _command_line(), "pid": os.getpid(), "host": socket.gethostname(), "started": started}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode("utf-8"))
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.ftruncate(fd, 0)
            if remove or (made and os.listdir(path.parent) == [path.name]):
                path.unlink()
            for folder in made:  # a command refused before writing anything leaves no run behind
                folder.rmdir()
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def writes_run(func: Any) -> Any:
    """Decorate a function whose first argument (or ``run=`` / ``out=``) is the run directory it
    writes: it runs holding :func:`run_lock`."""
    import functools
    import inspect

    if not inspect.isfunction(func):  # a decorator left above a class put in before the function
        raise TypeError(f"writes_run decorates a function writing a run, not {func!r}")
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        root = next((bound.arguments[n] for n in ("run", "out") if bound.arguments.get(n) is not None), None)
        if root is None:
            return func(*args, **kwargs)
        with run_lock(root):
            return func(*args, **kwargs)

    return wrapper


def refuse_overwriting_inputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """An :class:`InputError` when an output file of a command is one of its input files: the same
    path, or the same file by another path (a link): ``{"--out": path, ...}`` each."""
    for out_flag, out in outputs.items():
        if out is None or not os.path.exists(out):
            continue
        for in_flag, src in inputs.items():
            if src is not None and os.path.exists(src) and os.path.samefile(out, src):
                raise InputError(
                    out, out_flag, f"is the {in_flag} file: a command never writes over its own input; choose another"
                )


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex); remembered per (path, size, modification time) within a
    process, so that a run's detector is hashed once however many commands of a demo read it."""
    import hashlib

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def require_file(path: Path, missing: str = "no such file") -> None:
    """An :class:`InputError` unless ``path`` is a regular file: ``missing`` when nothing is there,
    else what is there instead (a directory, a device or a pipe)."""
    if path.is_file():
        return
    if path.is_dir():
        raise InputError(path, "(file)", "is a directory, a file was expected")
    raise InputError(path, "(file)", "not a regular file" if path.exists() else missing)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, turning a missing file or a syntax error into an :class:`InputError`."""
    path = Path(path)
    require_file(path)
    try:
        return _loads(path.read_bytes())  # msgspec; what it refuses (NaN, say) json reads
    except ValueError:
        pass
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(path, "(json)", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise InputError(path, "(json)", "not UTF-8 text") from None
    except RecursionError:
        raise InputError(path, "(json)", "nested too deeply to read (not an annotation or results file)") from None


_SPACE = re.compile(r"[ \t\r\n]*")


class _NotAList(Exception):
    """The streamed file is not a well-formed JSON list (:func:`iter_json_list` defers to read_json)."""


class NotLines(Exception):
    """A share of a file (:func:`split_json_lines`) is not whole items of a list written one per
    line: the caller reads the whole file instead (whose reading names what is wrong)."""


def _stream_list(f: IO[str], chunk: int) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    buf, pos, eof = f.read(chunk), 0, False

    def fill() -> bool:
        nonlocal buf, pos, eof
        data = "" if eof else f.read(chunk)
        eof = not data
        buf, pos = buf[pos:] + data, 0
        return not eof

    def skip() -> None:
        nonlocal pos
        while True:
            pos = _SPACE.match(buf, pos).end()  # type: ignore[union-attr]
            if pos < len(buf) or not fill():
                return

    skip()
    if buf[pos : pos + 1] != "[":
        raise _NotAList
    pos += 1
    skip()
    if buf[pos : pos + 1] == "]":
        pos += 1
    else:
        while True:
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if fill():
                        continue
                    raise _NotAList from None
                if isinstance(item, (dict, list, str)) or eof or (end < len(buf) and buf[end] in " \t\r\n,]"):
                    break
                fill()  # a number cut at the end of the buffer ("0." of "0.25") goes on in the next chunk
            yield item
            pos = end
            skip()
            sep = buf[pos : pos + 1]
            pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise _NotAList
            skip()
    skip()
    if pos < len(buf):
        raise _NotAList


def _line_list(f: IO[str], block: int) -> Iterator[Any]:
    """A list written one item per line (``[``, ``item,`` lines, ``]``: what ``simcal predict``
    writes), parsed ``block`` lines at a time by the C decoder; :class:`_NotAList` otherwise."""
    if f.readline().strip() != "[":
        raise _NotAList
    lines: list[str] = []
    for line in f:
        item = line.strip()
        if item == "]":
            break
        lines.append(item[:-1] if item.endswith(",") else item)
        if len(lines) == block:
            try:
                yield from json.loads("[" + ",".join(lines) + "]")
            except json.JSONDecodeError:
                raise _NotAList from None
            lines = []
    else:
        raise _NotAList  # no closing bracket
    if f.read().strip():
        raise _NotAList
    try:
        yield from json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        raise _NotAList from None


def iter_json_list(
    path: str | os.PathLike[str], not_a_list: str = "expected a JSON list", chunk: int = 1 << 22, block: int = 20000
) -> Iterator[Any]:
    """The items of a JSON file holding one list, parsed a part at a time: memory holds one part,
    never the whole list (a results file of millions of detections).

    A list written one item per line is parsed ``block`` lines at a time by the C decoder; any
    other layout ``chunk`` characters at a time, an item at a time. A malformed file gets
    :func:`read_json`'s error (the same line and column); valid JSON that is not a list is
    ``FILE: (top level): <not_a_list>, got <type>``.
    """
    path = Path(path)
    require_file(path)
    yielded = 0
    for parse, size in ((_line_list, block), (_stream_list, chunk)):
        try:
            with open(path, encoding="utf-8") as f:
                for i, item in enumerate(parse(f, size)):
                    if i >= yielded:  # a second parser goes on where the first one stopped
                        yield item
                        yielded += 1
            return
        except (_NotAList, UnicodeDecodeError, RecursionError):
            pass
    whole = read_json(path)  # raises the exact error of a malformed file
    if not isinstance(whole, list):
        raise InputError(path, "(top level)", f"{not_a_list}, got {type(whole).__name__}")
    yield from whole[yielded:]


def _loads(data: bytes) -> Any:
    """JSON bytes decoded by msgspec (several times the standard decoder's speed); a ValueError
    for what it refuses (malformed JSON, but also NaN, out-of-range numbers and deep nesting,
    which the caller hands to :mod:`json`, whose errors are the ones to show)."""
    import msgspec

    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError) as e:
        raise ValueError(str(e)) from None


def _decode_part(buf: bytearray, start: int, end: int, fast: Callable[[bytes], Any] | None) -> Any:
    """``buf[start:end]``, the JSON text of a list, decoded without a copy: by ``fast`` when it
    takes it, else into a list; :class:`_NotAList` when it does not parse."""
    with memoryview(buf) as whole, whole[start:end] as text:
        items = fast(text) if fast is not None else None  # type: ignore[arg-type]
        if items is None:
            try:
                items = _loads(text)  # type: ignore[arg-type]
            except ValueError:
                raise _NotAList from None
    return items


#: a comma between two items of a list, as writers put it: at a line end (``simcal predict``), or
#: between two objects on one line (``json.dump``), with the comma's offset in each
_ITEM_COMMAS = ((b",\n", 0), (b",\r\n", 0), (b"}, {", 1), (b"},{", 1))


def _last_item_comma(buf: bytearray, start: int) -> int:
    """The position of the last comma in ``buf[start:]`` that may separate two items
    (:data:`_ITEM_COMMAS`); -1 where there is none. Searched in the buffer's last megabyte
    first (an item is far smaller)."""
    for lo in (max(start, len(buf) - (1 << 20)), start):
        found = [(buf.rfind(sep, lo), off) for sep, off in _ITEM_COMMAS]
        last = max((at + off for at, off in found if at >= 0), default=-1)
        if last >= 0 or lo == start:
            return last
    return -1


def _first_item_comma(data: bytes) -> int:
    """The position of the first comma in ``data`` that may separate two items; -1 where none."""
    found = [(data.find(sep), off) for sep, off in _ITEM_COMMAS]
    return min((at + off for at, off in found if at >= 0), default=-1)


def _chunked_list(
    path: Path, block: int, fast: Callable[[bytes], Any] | None, start: int = 0, stop: int | None = None
) -> Iterator[Any]:
    """The items of a JSON list read about ``block`` bytes at a time: what ``simcal predict``
    writes (one item per line), ``json.dump``'s one line (objects separated by ``", "``), and any
    layout with a comma at each item's line end.

    Each part runs from the list's ``[`` (or the comma that ended the previous part, which becomes
    ``[``) to the last comma between two items in the buffer (which becomes ``]``), and is decoded
    in place: by ``fast`` (the part's JSON text -> an object whose length is its number of items,
    or None), else into a list. A part that does not parse (a cut inside an item leaves its
    brackets or a string open), or no such comma within 16 blocks, raises :class:`_NotAList`, and
    the caller goes on where this stopped.

    ``start`` > 0 and ``stop``: only the items in bytes ``[start, stop)``, where the byte at
    ``start`` is a comma between items and ``stop`` the position of the next such comma (or None:
    the end of the file): a share of the file (:func:`split_json_lines`)."""
    with open(path, "rb") as f:
        f.seek(start)
        left = (os.fstat(f.fileno()).st_size if stop is None else stop) - start
        buf, eof, pos = bytearray(), False, 0 if start else -1
        after_comma = start > 0  # the part begins at a comma between items, not at the list's "["
        while True:
            if not eof:
                data = f.read(min(block, left))
                left -= len(data)
                eof = not data
                buf += data
            if pos < 0:  # the list's opening bracket, after any white space
                pos = len(buf) - len(buf.lstrip())
                if pos == len(buf):
                    if eof:
                        raise _NotAList
                    pos = -1
                    continue
                if buf[pos] != ord("["):
                    raise _NotAList
            if eof:
                if stop is not None:  # a share ends at a comma between items: its last part
                    buf += b"]"
                buf[pos] = ord("[")
                items = _decode_part(buf, pos, len(buf), fast)
                if after_comma and not len(items):  # "...,]": a comma after the last item
                    raise _NotAList
                yield items
                return
            cut = _last_item_comma(buf, pos + 1)
            if cut < 0:
                if len(buf) > 16 * block:  # no place to cut: the streaming parser bounds memory
                    raise _NotAList
                continue
            buf[pos], buf[cut] = ord("["), ord("]")
            yield _decode_part(buf, pos, cut + 1, fast)
            del buf[:cut]
            pos, after_comma = 0, True  # the comma that ended this part: the next part's "["


def split_json_lines(path: str | os.PathLike[str], parts: int) -> list[tuple[int, int]] | None:
    """Byte ranges ``[start, stop)`` that cut a JSON list of objects (one per line, or
    ``json.dump``'s one line) into about ``parts`` equal shares, each cut at a comma between two
    items (the comma starts the next share); None where no such comma is found near a cut. The
    shares are read by :func:`iter_json_blocks` (``share=``)."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(size * k // parts, cuts[-1] + 1))
            head = f.read(1 << 20)
            at = _first_item_comma(head)
            if at < 0:
                return None
            cuts.append(f.tell() - len(head) + at)
    return [(a, b) for a, b in zip(cuts, [*cuts[1:], size])]


def iter_json_blocks(
    path: str | os.PathLike[str],
    not_a_list: str = "expected a JSON list",
    block: int = 1 << 23,
    items: int = 20000,
    fast: Callable[[bytes], Any] | None = None,
    share: tuple[int, int] | None = None,
) -> Iterator[Any]:
    """The items of a JSON file holding one list, in blocks of consecutive items: memory holds one
    block, never the whole list as Python objects.

    ``share``: only the items in a byte range of :func:`split_json_lines` (which raises
    :class:`NotLines` where the range is not whole items of that layout).

    A list whose items end at line ends (what ``simcal predict`` writes) is read ``block`` bytes
    at a time; each part, the JSON text of a list of whole items, goes to ``fast`` first (which
    returns its own object for the block, with the number of items as its length, or None), else
    is parsed into a list. Any other layout is parsed by :func:`iter_json_list`, ``items`` items
    a block. A malformed file gets :func:`read_json`'s error; valid JSON that is not a list is
    ``FILE: (top level): <not_a_list>, got <type>``.
    """
    path = Path(path)
    require_file(path)
    if share is not None:  # a share of a file cut by split_json_lines: that layout, or _NotAList
        start, stop = share
        try:
            yield from _chunked_list(path, block, fast, start, None if stop >= path.stat().st_size else stop)
        except _NotAList:
            raise NotLines(f"{path}: bytes {start}-{stop}") from None
        return
    yielded = 0
    try:
        for part in _chunked_list(path, block, fast):
            yielded += len(part)
            yield part
        return
    except _NotAList:
        pass
    buf: list[Any] = []
    for i, item in enumerate(iter_json_list(path, not_a_list)):
        if i < yielded:
            continue  # the parts gave these already
        buf.append(item)
        if len(buf) == items:
            yield buf
            buf = []
    if buf:
        yield buf


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to a text log (a jsonl); an :class:`OSError` (no space left) names ``path``.

    A line cut short by a crash is dropped by the reader (:func:`rewrite_lines` on resume).
    """
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a jsonl log, in order; a line that is not a JSON object (one cut short when
    the disk filled) is dropped, as :func:`rewrite_lines` drops it on resume."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def rewrite_lines(path: str | os.PathLike[str], keep: Any) -> None:
    """Keep only the lines of a text file (a jsonl log) for which ``keep(line)`` is true, atomically.

    A line ``keep`` cannot read (``ValueError``: a line cut short when the disk filled) is dropped.
    """
    path = Path(path)
    if not path.exists():
        return

    def kept(line: str) -> bool:
        try:
            return bool(keep(line))
        except (ValueError, KeyError, TypeError):
            return False

    lines = [line for line in path.read_text().splitlines() if line and kept(line)]
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (a crash never leaves a broken checkpoint)."""
    import torch

    with atomic_open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's zip writer hides a failed write (no space left) behind its own error
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a missing or unreadable file is an :class:`InputError`."""
    import torch

    path = Path(path)
    require_file(path, "no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        first = str(e).split(". ")[0].strip()  # torch's zip reader adds paragraphs of advice
        raise InputError(
            path, "(checkpoint)", f"cannot read (truncated, or not a torch checkpoint): {type(e).__name__}: {first}"
        ) from None
