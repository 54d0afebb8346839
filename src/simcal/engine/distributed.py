"""torchrun / DDP awareness: one process per device, gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun; return ``(rank, world, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        peers: list[tuple[str, int] | None] = [None] * world
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        _PEERS[:] = [p for p in peers if p is not None]
    return rank, world, device


#: ``(hostname, pid)`` of every rank, gathered when the process group starts: which one is gone
_PEERS: list[tuple[str, int]] = []


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped by torchrun counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def lost_ranks(wait: float = 2.0) -> tuple[list[int], list[int]]:
    """``(ranks whose process has exited, ranks on other machines)``, as seen from this process: the
    ranks on this machine are checked by pid; the others cannot be from here.

    A process killed a moment ago closes its sockets (which fails this one's collective) before it
    has exited: while none on this machine has, they are checked again for up to ``wait`` seconds
    (CI saw the survivor look in between and name no rank). A signal in that wait (torchrun stops
    the other ranks once it has reaped the failed one) ends it with one more look."""
    host, me = socket.gethostname(), os.getpid()
    here = [(r, pid) for r, (h, pid) in enumerate(_PEERS) if h == host and pid != me]
    deadline = time.monotonic() + wait
    gone = [r for r, pid in here if _gone(pid)]
    try:
        while here and not gone and time.monotonic() < deadline:
            time.sleep(0.05)
            gone = [r for r, pid in here if _gone(pid)]
    except KeyboardInterrupt:  # torchrun's SIGTERM (simcal's handler raises): it has reaped the failed rank
        gone = [r for r, pid in here if _gone(pid)]
    return gone, [r for r, (h, _) in enumerate(_PEERS) if h != host]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cpu_share() -> int:
    """This process's share of the CPU cores: all of them alone, ``cores // processes`` (at least 1)
    for each of the processes torchrun started on this machine (``LOCAL_WORLD_SIZE``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over processes (``t`` itself in one process), on ``t``'s device. NCCL reduces
    CUDA tensors only: a CPU tensor travels through the current CUDA device and comes back."""
    if world_size() == 1:
        return t
    work = t.cuda() if dist.get_backend() == "nccl" and t.device.type != "cuda" else t.clone()
    dist.all_reduce(work)
    return work.to(t.device)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over processes (for logging and the non-finite check)."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    t = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}
