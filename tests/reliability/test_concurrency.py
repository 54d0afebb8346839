"""One command writes a run at a time (issue 28, point 1): an advisory lock that the operating
system releases when its holder dies, tried with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simcal.errors import InputError
from simcal.io import LOCK_NAME, run_lock
from tests.reliability.conftest import one_line, snapshot

HOLD = textwrap.dedent(
    """
    import sys, time
    from simcal.io import run_lock
    with run_lock(sys.argv[1], "simcal calibrate --run holder-run --name y"):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def _holder(run: Path) -> subprocess.Popen:
    """A process holding ``run``'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _simcal(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simcal", *argv], capture_output=True, text=True, timeout=300)


def test_a_second_writer_is_one_line_naming_the_holder_and_changes_nothing(run):
    holder = _holder(run)
    try:
        before = snapshot(run)
        for argv in (
            ["calibrate", "--run", str(run), "--steps", "1", "--no-progress"],
            ["predict", "--run", str(run), "--max-images", "1", "--no-progress"],
            ["report", "--run", str(run), "--gallery", "0"],
            ["analyze", "confusion", "--run", str(run)],
        ):
            out = _simcal(*argv)
            assert out.returncode == 2, (argv, out.stderr)
            line = one_line(
                out.stderr, f"{run}: (lock): is being written by `simcal calibrate --run holder-run --name y`"
            )
            assert f"(pid {holder.pid} on " in line and "one command writes a run at a time" in line
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    # the operating system released the lock of the killed holder: the next writer goes ahead
    with run_lock(run, "test"):
        assert (run / LOCK_NAME).exists()


def test_two_calibrations_of_the_same_name_started_together(run):
    """Before the lock both exited 0 and the one that finished second replaced the other's head."""
    argv = ["calibrate", "--run", str(run), "--name", "y", "--steps", "3", "--no-progress"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "simcal", *argv, "--lr", lr],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr in ("0.01", "0.02")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, e) for p, (_, e) in zip(procs, outs)]
    loser = next(e for p, (_, e) in zip(procs, outs) if p.returncode == 2)
    one_line(loser, "(lock): is being written by `simcal calibrate --run")
    winner_lr = ("0.01", "0.02")[[p.returncode for p in procs].index(0)]
    import json

    summary = json.loads((run / "calibration" / "y" / "summary.json").read_text())
    assert f"{summary['calibration']['lr']:g}" == f"{float(winner_lr):g}"


def test_a_lock_is_released_by_kill_9_and_taken_again(tmp_path):
    holder = _holder(tmp_path)
    with pytest.raises(InputError, match=r"\(lock\): is being written by"):
        with run_lock(tmp_path, "second"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    with run_lock(tmp_path, "third"):
        with run_lock(tmp_path, "nested: the same process re-enters its own lock"):
            pass


HOLD_BESIDE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from simcal.io import run_lock
    out = Path(sys.argv[1])
    with run_lock(out, "simcal import --out x", lock_file=out.parent / (".%s.simcal.lock" % out.name), remove=True):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_two_imports_into_one_run(tmp_path, capsys):
    """The run does not exist yet: the lock is a file beside it, gone once the import ends."""
    from simcal.cli import main

    out = tmp_path / "imported"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_BESIDE, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    argv = ["import", "--from", "detectron2", str(tmp_path / "missing.pkl"), "--out", str(out)]
    try:
        assert main(argv) == 2
        one_line(capsys.readouterr().err, f"{out}: (lock): is being written by `simcal import --out x`")
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 2  # the next one goes ahead, to its own error
    one_line(capsys.readouterr().err, "missing.pkl")
    assert list(tmp_path.iterdir()) == []  # the lock file beside it went with the import that took it
    assert not out.exists()
