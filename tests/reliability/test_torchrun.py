"""torchrun with a rank gone (issue 28, point 8): the survivors say which rank stopped, in one line,
not a loader worker's death or "out of memory"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import copy_run


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_leaves_the_survivor_one_line(trained_run, tmp_path):
    """Before, the survivor said a DataLoader worker died and the machine may be out of memory (or
    printed gloo's traceback); now it says which rank stopped (or, where torchrun's SIGTERM came
    first, that torchrun stopped it), in one line, and torchrun's summary names the rank."""
    import signal
    import time

    run = copy_run(trained_run, tmp_path / "run")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "simcal", "calibrate", "--run-dir", str(run)]
    argv += ["--steps", "100000", "--no-progress"]
    proc = subprocess.Popen(
        argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim = None
    for _ in range(600):  # find rank 1 once it calibrates
        time.sleep(0.1)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"simcal" in cmd and b"calibrate" in cmd and b"LOCAL_RANK=1" in env and not cmd[1].endswith(b"torchrun"):
                victim = int(pid)
        if victim is not None and (run / "calibration").exists():
            break
    assert victim is not None
    time.sleep(3)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    survivor = [line for line in err.splitlines() if line.startswith("simcal: ")]
    assert len(survivor) == 1, err[-3000:]
    # rank 0 either fails in a collective first and names rank 1, or torchrun's SIGTERM (sent once
    # it has reaped rank 1) reaches it first, between collectives, and it says torchrun stopped it
    named = "rank 0 of 2: rank 1 stopped" in survivor[0]
    stopped = survivor[0].startswith("simcal: SIGTERM: stopped") and "torchrun stops every rank" in survivor[0]
    assert (named or stopped) and "out of memory" not in err, survivor
    assert "[rank0]: Traceback" not in err and "Root Cause" in err  # torchrun's summary names rank 1


def test_the_survivor_names_the_rank_whose_process_exited(monkeypatch):
    """peer_rank_lost reads gloo's error, then checks the pids gathered at init on this machine."""
    import socket

    from simcal.engine import distributed as dist_utils
    from simcal.errors import peer_rank_lost

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    host = socket.gethostname()
    try:
        peers = [(host, os.getpid()), (host, alive.pid), (host, dead.pid), ("elsewhere", 1)]
        monkeypatch.setattr(dist_utils, "_PEERS", peers)
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("RANK", "0")
        gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")
        try:
            raise ValueError("while reducing") from gloo
        except ValueError as e:
            line = peer_rank_lost(e, dist_utils.lost_ranks)
        assert line is not None and "rank 0 of 4: rank 2 stopped" in line and "--resume" in line
        monkeypatch.setattr(dist_utils, "_PEERS", peers[:2] + peers[3:])  # rank 1 alive, rank 3 elsewhere
        assert "a rank on another machine stopped" in (peer_rank_lost(gloo, dist_utils.lost_ranks) or "")
        assert peer_rank_lost(RuntimeError("shape mismatch"), dist_utils.lost_ranks) is None
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert peer_rank_lost(gloo, dist_utils.lost_ranks) is None  # one process: not a torchrun peer
    finally:
        alive.kill()
        alive.wait()


def test_a_rank_still_exiting_when_the_collective_fails_is_named(monkeypatch):
    """A killed rank's sockets close before its process has exited: the survivor looks again for a
    while instead of naming no rank (CI saw "another rank stopped")."""
    import socket

    from simcal.engine import distributed as dist_utils
    from simcal.errors import peer_rank_lost

    leaving = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        host = socket.gethostname()
        monkeypatch.setattr(dist_utils, "_PEERS", [(host, os.getpid()), (host, leaving.pid)])
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")
        assert "rank 0 of 2: rank 1 stopped" in (peer_rank_lost(gloo, lambda: dist_utils.lost_ranks(wait=30)) or "")
        again = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        monkeypatch.setattr(dist_utils, "_PEERS", [(host, os.getpid()), (host, again.pid)])

        def signalled(seconds):  # torchrun's SIGTERM, as simcal's handler raises it, during the wait
            raise KeyboardInterrupt

        monkeypatch.setattr(dist_utils.time, "sleep", signalled)
        try:
            assert dist_utils.lost_ranks(wait=30) == ([], [])  # one more look, no traceback
        finally:
            again.kill()
            again.wait()
    finally:
        leaving.kill()
        leaving.wait()
