"""Checkpoints written atomically (temp file + rename): a crash never leaves a broken one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from simcal.errors import InputError

LAST = "checkpoint_last.pth"
FINAL = "model_final.pth"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a missing or unreadable file is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "(file)", "no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(path, "(checkpoint)", f"cannot read: {type(e).__name__}: {e}") from None
