"""Process setup shared by every stage that runs the model: CPU hygiene, the device, global seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def setup_torch(threads: int = 0) -> None:
    """CPU hygiene for every entry point: flush denormals (a 10x slowdown otherwise), threads
    (``threads``, 0 for torch's default), never more than this process's share of the cores
    when torchrun started several on the machine."""
    from simcal.engine.distributed import cpu_share

    torch.set_flush_denormal(True)
    share = cpu_share()
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        threads = min(threads, share) if threads > 0 else share
    if threads > 0:
        torch.set_num_threads(threads)


def default_device() -> torch.device:
    """CUDA when available (one process per device under torchrun), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model initialisation draws from them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
