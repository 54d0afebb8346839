"""Conflicting resumes are refused or applied honestly; partial predictions never pass for full ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from simcal.cli import main
from simcal.io import load_checkpoint
from tests.conftest import copy_run
from tests.reliability.conftest import one_line, snapshot, temporaries, write_config

torch.set_num_threads(1)


def test_train_resume_lists_every_conflicting_setting_and_changes_nothing(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run)
    argv = ["train", "--out", str(run), "--resume", "train.base_lr=0.5", "model.min_size=32", "train.max_iter=9"]
    assert main([*argv, "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err, "(command line): model.min_size: differs from the resumed run")
    assert "2 setting(s): model.min_size 32 (run: 64); train.base_lr 0.5 (run: 0.001)" in line
    assert "train.max_iter" not in line  # a longer budget alone would have been fine
    assert "start another run with another --out" in line
    assert snapshot(run) == before


@pytest.mark.slow
def test_train_resume_with_a_longer_budget_is_the_longer_run(tiny_data, tmp_path, capsys):
    """More iterations (and bookkeeping) are applied, written into the run, and the weights are
    those of a run given the longer budget from the start."""
    short = write_config(tmp_path / "short.yaml", tiny_data, max_iter=4)
    long = write_config(tmp_path / "long.yaml", tiny_data, max_iter=6)
    assert main(["train", "--config", str(long), "--out", str(tmp_path / "long"), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--config", str(short), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        main(["train", "--out", str(run), "--resume", "train.max_iter=6", "train.log_period=1", "--no-progress"]) == 0
    )
    assert "resume: train.max_iter 4 -> 6, train.log_period 2 -> 1 (written to" in capsys.readouterr().out
    stored = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert stored["max_iter"] == 6 and stored["log_period"] == 1
    a, b = (load_checkpoint(r / "model_final.pth")["model"] for r in (tmp_path / "long", run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", "--out", str(run), "--resume", "train.max_iter=5", "--no-progress"]) == 2  # shorter
    one_line(capsys.readouterr().err, "train.max_iter 5 (run: 6)")


def test_calibrate_resume_never_retrains_over_a_finished_head(calibrated_run, tmp_path, capsys):
    run = copy_run(calibrated_run, tmp_path / "run")
    cal = run / "calibration" / "3fc_ft"
    before = snapshot(cal)
    assert main(["calibrate", "--run", str(run), "--resume", "--lr", "0.5", "--no-progress"]) == 2
    one_line(
        capsys.readouterr().err,
        f"{cal / 'head.pth'}: calibration.lr: calibration 3fc_ft was made with other settings: "
        "calibration.lr 0.5 (it has 0.01)",
        "under another --name",
    )
    assert main(["calibrate", "--run", str(run), "--resume", "--no-progress"]) == 0  # same settings: done already
    assert "already finished with these settings: nothing to do" in capsys.readouterr().out
    assert main(["calibrate", "--run", str(run), "--no-progress"]) == 2  # without --resume: refused as before
    one_line(capsys.readouterr().err, "already done: pass --resume to continue it, or another --name")
    assert snapshot(cal) == before
    # an interrupted calibration (checkpoint, no head) resumed with other settings: refused too
    (cal / "head.pth").unlink()
    assert main(["calibrate", "--run", str(run), "--resume", "--momentum", "0", "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{cal / 'checkpoint.pth'}: calibration.momentum:", "0.0 (it has 0.9)")
    assert main(["calibrate", "--run", str(run), "--name", "other", "--lr", "0.5", "--no-progress"]) == 0
    assert (run / "calibration" / "other" / "head.pth").exists() and not temporaries(run)


def test_partial_predictions_go_beside_the_full_ones_and_the_report_says_so(calibrated_run, tmp_path, capsys):
    run = copy_run(calibrated_run, tmp_path / "run")
    assert main(["predict", "--run", str(run), "--head", "orig,cal,dual", "--no-progress"]) == 0
    full = run / "predictions" / "val"
    before = snapshot(full)
    argv = ["predict", "--run", str(run), "--max-images", "2", "--no-progress"]
    assert main(argv) == 0
    assert "the first 2 of 20 images: predictions go to" in capsys.readouterr().out
    assert snapshot(full) == before
    partial = json.loads((run / "predictions" / "val-first2" / "orig" / "metrics_bbox.json").read_text())
    assert partial["num_images"] == 2
    assert main(["predict", "--run", str(run), "--split", "val-first2"]) == 2  # the name is not a split
    one_line(capsys.readouterr().err, "--split: split: val-first2 names predictions on the first 2 images")
    # the report on val: every head covers the 20 images, and says so
    assert main(["report", "--run", str(run), "--gallery", "0"]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "<th>images</th>" in page and "Not comparable" not in page
    # a head evaluated on other images in the same table: the report says it is not comparable
    shutil.rmtree(full / "orig")
    shutil.copytree(run / "predictions" / "val-first2" / "orig", full / "orig")
    capsys.readouterr()
    assert main(["report", "--run", str(run), "--gallery", "0"]) == 0
    assert "report: warning: the heads were evaluated on different images (orig 2 images" in capsys.readouterr().out
    page = (run / "report" / "index.html").read_text()
    assert "Not comparable:" in page and "cal 20 images" in page
    assert main(["analyze", "confusion", "--run", str(run), "--heads", "orig,cal"]) == 0
    assert "warning: not comparable: the heads' predictions cover different images: orig 2, cal 20" in (
        capsys.readouterr().out
    )
    confusion = json.loads((run / "analysis" / "confusion.json").read_text())
    assert confusion["heads"]["orig"]["num_images"] == 2 and "not_comparable" in confusion


def test_a_damaged_checkpoint_stops_a_resume_before_the_run_is_touched(trained_run, tmp_path, capsys):
    """Before: the resumed settings were written into config.yaml, then the checkpoint cut in half
    was read (one clean line, but a changed run)."""
    run = copy_run(trained_run, tmp_path / "run")
    whole = (run / "model_final.pth").read_bytes()
    (run / "checkpoint_last.pth").write_bytes(whole[: len(whole) // 2])
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", "train.max_iter=6", "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{run / 'checkpoint_last.pth'}: (checkpoint): cannot read")
    assert snapshot(run) == before  # config.yaml included


def test_a_command_never_writes_over_its_own_input(tiny_data, tmp_path, capsys):
    gt = tmp_path / "val.json"
    shutil.copy(tiny_data / "val.json", gt)
    results = tmp_path / "results.json"
    results.write_text("[]")
    link = tmp_path / "link.json"
    link.symlink_to(results)
    for argv, message in [
        (["--results", str(results), "--out", str(results)], f"{results}: --out: is the --results file"),
        (["--results", str(results), "--out", str(gt)], f"{gt}: --out: is the --gt file"),
        (["--results", str(results), "--out", str(link)], f"{link}: --out: is the --results file"),
        (["--results", str(results), "--per-class", str(gt)], f"{gt}: --per-class: is the --gt file"),
    ]:
        before = snapshot(tmp_path)
        assert main(["evaluate", "--gt", str(gt), *argv]) == 2
        one_line(capsys.readouterr().err, message, "a command never writes over its own input")
        assert snapshot(tmp_path) == before
    assert main(["coco-lt", "--coco", str(gt), "--out", str(gt)]) == 2
    one_line(capsys.readouterr().err, f"{gt}: --out: is the --coco file")
