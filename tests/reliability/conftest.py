"""Fault injection helpers: the one-line check, leftover temporaries, failing file-system calls."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, data_section


def one_line(err: str, *fragments: str) -> str:
    """Assert ``err`` is exactly one line ``simcal: error: ...`` holding every fragment; return it."""
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("simcal: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def temporaries(root: Path) -> list[Path]:
    """Temporary files of the atomic writes anywhere under ``root``."""
    return sorted(root.rglob(".*.tmp"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to assert that nothing changed)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".simcal.lock"  # a writer's lock (empty once released) is not the run's
    }


@pytest.fixture
def fail_fs(monkeypatch) -> Callable[..., None]:
    """Make the file system refuse writes under a folder, as a read-only disk or a folder without
    write permission does: ``fail_fs(folder, errno.EROFS)``. Only ``os.mkdir`` and ``os.open``
    with a write flag under ``folder`` fail, with the errno and the path the kernel would give."""

    def install(folder: Path, code: int) -> None:
        folder = str(Path(folder).resolve())
        real_mkdir, real_open = os.mkdir, os.open

        def inside(path) -> bool:
            return str(Path(os.fsdecode(path)).resolve()).startswith(folder)

        def mkdir(path, *args, **kwargs):
            if inside(path) and not os.path.isdir(path):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real_mkdir(path, *args, **kwargs)

        def open_(path, flags, *args, **kwargs):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)

    return install


@pytest.fixture
def disk_full(monkeypatch) -> Callable[..., dict[str, int]]:
    """Make the disk fill while a file named ``name`` is written atomically, after ``skip``
    successful writes of it: its fsync fails with ENOSPC, as a full disk reports it (the write
    itself failing is the same path through :func:`simcal.io.atomic_open`). Returns the counts."""

    def install(name: str, skip: int = 0) -> dict[str, int]:
        real = os.fsync
        seen = {"writes": 0}

        def fsync(fd: int) -> None:
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
                seen["writes"] += 1
                if seen["writes"] > skip:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        return seen

    return install


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny synthetic set (images may be broken in it)."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def write_config(path: Path, data: Path, **train: object) -> Path:
    """A tiny training config on ``data`` (the synthetic_cpu preset at 64 px, one loader worker)."""
    cfg = {
        "_base_": str(REPO / "configs" / "synthetic_cpu.yaml"),
        "data": {**data_section(data), "num_workers": 1},
        "model": {"min_size": 64, "max_size": 64, "box_batch_size_per_image": 32},
        "train": {
            "batch_size": 2,
            "max_iter": 4,
            "steps": [],
            "warmup_iters": 1,
            "checkpoint_period": 2,
            "log_period": 2,
            "threads": 1,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
