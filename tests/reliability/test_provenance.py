"""Calibrated heads and predictions record what made them (issue 28, point 2): a head calibrated on
a detector that has changed since is refused, and so are predictions made by one."""

from __future__ import annotations

import json
import shutil

import torch

from simcal.cli import main
from simcal.io import file_sha256
from tests.reliability.conftest import one_line


def test_a_head_of_an_earlier_detector_is_refused_and_predictions_say_what_made_them(run, capsys):
    assert main(["calibrate", "--run", str(run), "--steps", "2", "--no-progress"]) == 0
    head = run / "calibration" / "3fc_ft" / "head.pth"
    detector = torch.load(head, weights_only=False)["meta"]["detector"]
    assert detector == {
        "checkpoint": str(run / "model_final.pth"),
        "sha256": file_sha256(run / "model_final.pth"),
        "iteration": 3,
    }
    assert main(["predict", "--run", str(run), "--head", "orig,cal", "--max-images", "4", "--no-progress"]) == 0
    made_by = json.loads((run / "predictions" / "val-first4" / "cal" / "made_by.json").read_text())
    assert made_by["model"]["sha256"] == detector["sha256"]
    assert made_by["calibrated_heads"]["3fc_ft"]["sha256"] == file_sha256(head)
    assert made_by["calibrated_heads"]["3fc_ft"]["detector"] == detector
    metrics = json.loads((run / "predictions" / "val-first4" / "cal" / "metrics_bbox.json").read_text())
    assert metrics["model"] == made_by["model"]
    # a calibration interrupted on this detector (its checkpoint stays, no head yet)
    half = ["calibrate", "--run", str(run), "--steps", "2", "--name", "half", "calibration.checkpoint_period=1"]
    assert main([*half, "--no-progress"]) == 0
    assert (run / "calibration" / "half" / "checkpoint.pth").exists()
    (run / "calibration" / "half" / "head.pth").unlink()
    capsys.readouterr()

    # the run trains on: the head was calibrated on iteration 3's detector, the run's is now iteration 5's
    assert main(["train", "--out", str(run), "--resume", "train.max_iter=5", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--head", "cal", "--max-images", "4", "--no-progress"]) == 2
    one_line(
        capsys.readouterr().err,
        f"{head}: meta.detector: calibrated on another detector (model_final.pth at iteration 3",
        "than model_final.pth now (iteration 5",
        f"calibrate again (simcal calibrate --run {run} --name NEW_NAME)",
    )
    # the interrupted calibration does not resume on the new detector
    assert main([*half, "--resume", "--no-progress"]) == 2
    one_line(
        capsys.readouterr().err,
        f"{run / 'calibration' / 'half' / 'checkpoint.pth'}: detector: this interrupted calibration ran on another "
        "detector (iteration 3) than the run's now (iteration 5): calibrate under another --name",
    )
    assert not (run / "calibration" / "half" / "head.pth").exists()
    # ... and the predictions made by the earlier detector are not reported as the run's
    assert main(["report", "--run", str(run), "--split", "val-first4", "--gallery", "0"]) == 2
    one_line(capsys.readouterr().err, "(predictions): made by a detector that has changed since", "predict again")
    # a new calibration of the new detector is taken; the original head predicts as before
    assert main(["calibrate", "--run", str(run), "--steps", "2", "--name", "again", "--no-progress"]) == 0
    argv = ["predict", "--run", str(run), "--head", "orig,cal", "--calibration", "again", "--max-images", "4"]
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    # the stale head's predictions (of the head calibrated on iteration 3) still stop the report ...
    assert main(["report", "--run", str(run), "--split", "val-first4", "--gallery", "0"]) == 2
    one_line(capsys.readouterr().err, "val-first4/cal: (predictions): made by a detector that has changed since")
    shutil.rmtree(run / "predictions" / "val-first4" / "cal")  # ... until they are gone
    assert main(["report", "--run", str(run), "--split", "val-first4", "--gallery", "0"]) == 0
