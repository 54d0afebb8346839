"""Faults from outside: read-only and unwritable folders, a disk that fills, SIGTERM and kill -9."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simcal.cli import main
from simcal.io import atomic_open, load_checkpoint
from tests.conftest import copy_run, tiny_lvis
from tests.reliability.conftest import one_line, snapshot, temporaries, write_config

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.EROFS, "read-only file system: choose an output path on a writable disk"),
        (errno.EACCES, "permission denied: choose a path you can write to"),
    ],
)
def test_unwritable_output_folders_are_one_line_naming_the_path(
    code, says, trained_run, tiny_data, tmp_path, fail_fs, capsys
):
    """A read-only disk, a folder without write permission (simulated: the tests may run as root,
    whom permissions do not stop): train, predict and evaluate stop with one line naming the
    folder, train and predict before any long work, and nothing is left behind."""
    run = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run)
    locked = tmp_path / "locked"
    locked.mkdir()
    fail_fs(locked, code)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data)
    assert main(["train", "--config", str(cfg), "--out", str(locked / "run"), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{locked / 'run'}: (file system): {says}")
    fail_fs(run / "predictions", code)
    assert main(["predict", "--run", str(run), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{run / 'predictions'}", says)
    gt, results = tmp_path / "gt.json", tmp_path / "results.json"
    gt.write_text(json.dumps(tiny_lvis()))
    results.write_text("[]")
    argv = ["evaluate", "--gt", str(gt), "--results", str(results), "--iou", "bbox", "--out", str(locked / "m.json")]
    assert main(argv) == 2
    one_line(capsys.readouterr().err, f"{locked}: (file system): {says}")
    assert snapshot(run) == before and not list(locked.iterdir())


def test_a_file_where_a_folder_belongs(trained_run, tiny_data, tmp_path, capsys):
    """--out naming an existing regular file, or a path through one: one line, the file untouched."""
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data)
    train = ["train", "--config", str(cfg), "--no-progress", "--out"]
    assert main([*train, str(taken)]) == 2
    one_line(capsys.readouterr().err, f"{taken}: (file system): exists and is not a directory")
    assert main([*train, str(taken / "run")]) == 2
    one_line(capsys.readouterr().err, f"{taken / 'run'}: (file system): part of this path is a file, not a directory")
    gt, results = tmp_path / "gt.json", tmp_path / "results.json"
    gt.write_text(json.dumps(tiny_lvis()))
    results.write_text("[]")
    assert main(["evaluate", "--gt", str(gt), "--results", str(results), "--out", str(taken / "m.json")]) == 2
    one_line(capsys.readouterr().err, f"{taken}: (file system): exists and is not a directory")
    assert taken.read_text() == "keep me"


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_resume_is_exact(
    tiny_data, tmp_path, disk_full, monkeypatch, capsys
):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, max_iter=6)
    full = tmp_path / "full"
    assert main(["train", "--config", str(cfg), "--out", str(full), "--no-progress"]) == 0
    run = tmp_path / "run"
    seen = disk_full("checkpoint_last.pth", skip=1)  # the checkpoint of iteration 2 fits, that of 4 does not
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{run / 'checkpoint_last.pth'}: (file system): no space left on the device")
    assert seen["writes"] == 2
    assert load_checkpoint(run / "checkpoint_last.pth")["iteration"] == 2
    assert not (run / "model_final.pth").exists() and not temporaries(run)
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    a, b = (load_checkpoint(r / "model_final.pth")["model"] for r in (full, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    iters = [json.loads(line)["iteration"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert iters == [2, 4, 6]


def test_disk_full_during_predict_keeps_the_previous_results(trained_run, tmp_path, disk_full, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    argv = ["predict", "--run", str(run), "--max-images", "4", "--batch-size", "4", "--no-progress"]
    assert main(argv) == 0
    head = run / "predictions" / "val-first4" / "orig"
    before = snapshot(head)
    capsys.readouterr()
    disk_full("results.json")
    assert main(argv) == 2
    one_line(capsys.readouterr().err, f"{head / 'results.json'}: (file system): no space left on the device")
    assert snapshot(head) == before and not temporaries(run)


def _predict_process(run: Path, tiny_data: Path) -> subprocess.Popen:
    """``python -m simcal predict`` on the val images one at a time (slow enough to be stopped)."""
    argv = ["predict", "--run", str(run), "--batch-size", "1", "--no-eval", "--no-progress"]
    return subprocess.Popen(
        [sys.executable, "-m", "simcal", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _when_writing(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> list[Path]:
    """Wait until ``proc`` is writing a temporary results file under ``folder`` and its loader
    worker runs (a signal during the fork itself is dropped by Python, a case of its own)."""
    end = time.monotonic() + timeout
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while time.monotonic() < end and proc.poll() is None:
        found = temporaries(folder) if folder.exists() else []
        if found and children.read_text().strip():
            time.sleep(0.3)
            return found
        time.sleep(0.02)
    raise AssertionError(f"predict never started writing: {proc.communicate()}")


def test_sigterm_during_predict_is_one_line_exit_143_and_leaves_nothing(trained_run, tiny_data, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    proc = _predict_process(run, tiny_data)
    _when_writing(proc, run / "predictions")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "simcal: SIGTERM: stopped; no file was left half-written (train and calibrate continue with --resume)"
    ]
    assert not temporaries(run) and not list((run / "predictions").rglob("results.json"))


def test_kill_9_leftovers_are_removed_by_the_next_writer_of_the_file(trained_run, tiny_data, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    proc = _predict_process(run, tiny_data)
    left = _when_writing(proc, run / "predictions")
    proc.kill()
    proc.communicate(timeout=60)
    assert temporaries(run) == left and not list((run / "predictions").rglob("results.json"))
    again = _predict_process(run, tiny_data)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert not temporaries(run)
    assert json.loads((run / "predictions" / "val" / "orig" / "results.json").read_text())


def test_atomic_open_removes_only_dead_writers_temporaries(tmp_path):
    """The next writer of a file removes its temporaries whose writer (this host, that pid) is
    gone; those of a live writer and those of other files stay."""
    target = tmp_path / "results.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    stale = tmp_path / f".results.json.{host}-{int(dead.stdout)}-abc.tmp"
    live = tmp_path / f".results.json.{host}-{os.getppid()}-abc.tmp"
    other = tmp_path / f".metrics.json.{host}-{int(dead.stdout)}-abc.tmp"
    for p in (stale, live, other):
        p.write_text("half")
    with atomic_open(target, "w") as f:
        f.write("[]")
    assert not stale.exists() and live.exists() and other.exists() and target.read_text() == "[]"


def test_a_loader_worker_that_dies_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    """A worker killed from outside (the out-of-memory killer): torch reports it from a SIGCHLD
    handler, wherever the main process is; the command ends in one line naming the setting."""
    from simcal.data.dataset import DetectionDataset

    real = DetectionDataset.__getitem__

    def die_in_worker(self, key):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, key)

    monkeypatch.setattr(DetectionDataset, "__getitem__", die_in_worker)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    one_line(
        capsys.readouterr().err,
        "simcal: error: data.num_workers: num_workers: DataLoader worker (pid",  # "is killed by signal" or
        ": the machine may be out of memory",  # "exited unexpectedly", as torch notices it first
    )
    assert not (run / "model_final.pth").exists() and not temporaries(run)


class _SigtermInWorker(torch.utils.data.Dataset):
    """Each item is whether SIGTERM has its default action in the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> bool:
        return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_loader_workers_end_silently_on_sigterm(tmp_path):
    """A worker forked from a command inherits its SIGTERM handler (which raises, for the command's
    one line); when the loader, shutting down after the command stopped, terminates a worker slow
    to join, that worker printed a traceback (seen once in CI under load). Workers get the default
    action back: killed at once, silently. A worker_init_fn of the caller still runs."""
    from simcal.data.dataset import data_loader
    from simcal.errors import handle_sigterm

    previous = handle_sigterm()
    marker = tmp_path / "worker_init_ran"
    try:
        loader = data_loader(_SigtermInWorker(), batch_size=1, num_workers=1, collate_fn=lambda b: b[0])
        assert list(loader) == [True, True]
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # the command's own handler stays
        loader = data_loader(
            _SigtermInWorker(),
            batch_size=1,
            num_workers=1,
            collate_fn=lambda b: b[0],
            worker_init_fn=lambda worker_id: marker.write_text(str(worker_id)),
        )
        assert list(loader) == [True, True] and marker.read_text() == "0"
    finally:
        signal.signal(signal.SIGTERM, previous)
