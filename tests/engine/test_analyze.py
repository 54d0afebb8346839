"""The analysis tools on a tiny trained and calibrated run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from simcal.cli import main
from simcal.engine.calibrate import calibrate

torch.set_num_threads(1)


def _drawn(tool: str, data: dict, tmp_path) -> list[int]:
    """An analysis writes numbers only; the report draws its figure(s) from the json: their sizes."""
    from simcal.report.figures import draw

    return [p.stat().st_size for p in draw(tool, data, tmp_path / f"{tool}.png")]


def test_recall(calibrated_run, capsys, tmp_path):
    assert main(["analyze", "recall", "--run", str(calibrated_run), "--max-images", "8", "--no-progress"]) == 0
    out = json.loads((calibrated_run / "analysis" / "recall.json").read_text())
    assert 0 < out["AR@100"] <= out["AR@1000"] <= 1
    assert not list((calibrated_run / "analysis").glob("*.png"))  # json only
    assert _drawn("recall", out, tmp_path) > [1000]
    assert "AR@100" in capsys.readouterr().out


def test_oracle_beats_the_original_classifier(calibrated_run, tmp_path):
    assert main(["analyze", "oracle", "--run", str(calibrated_run), "--max-images", "10", "--no-progress"]) == 0
    data = json.loads((calibrated_run / "analysis" / "oracle.json").read_text())
    out = data["heads"]
    assert set(out) == {"orig", "oracle", "dual"}
    assert out["oracle"]["AP"] > out["orig"]["AP"]
    assert _drawn("oracle", data, tmp_path) > [1000]


def test_sweep_T_ends_at_the_original_and_the_calibrated_head(calibrated_run, tmp_path):
    # T below every training count: dual == orig; T above every count: dual == cal
    assert (
        main(
            [
                "analyze",
                "sweep-T",
                "--run",
                str(calibrated_run),
                "--T",
                "0,100000",
                "--max-images",
                "10",
                "--no-progress",
            ]
        )
        == 0
    )
    out = json.loads((calibrated_run / "analysis" / "sweep_T.json").read_text())
    low, high = out["sweep"]
    assert {k: v for k, v in low.items() if k != "T"} == out["orig"]
    assert {k: v for k, v in high.items() if k != "T"} == out["cal"]
    assert not (calibrated_run / "analysis" / "sweep_T.png").exists()
    assert out["run_T"] == 300.0 and _drawn("sweep-T", out, tmp_path) > [1000]


def test_dynamics_last_snapshot_is_the_final_head(calibrated_run, tmp_path):
    assert main(["analyze", "dynamics", "--run", str(calibrated_run), "--max-images", "10", "--no-progress"]) == 0
    out = json.loads((calibrated_run / "analysis" / "dynamics.json").read_text())
    assert [r["step"] for r in out["steps"]] == [3, 6]
    assert _drawn("dynamics", out, tmp_path) > [1000]
    assert (
        main(
            ["analyze", "sweep-T", "--run", str(calibrated_run), "--T", "100000", "--max-images", "10", "--no-progress"]
        )
        == 0
    )
    final_cal = json.loads((calibrated_run / "analysis" / "sweep_T.json").read_text())["cal"]
    assert out["steps"][-1]["cal"] == final_cal


def test_dynamics_without_snapshots_is_a_clear_error(run, capsys):
    calibrate(run, progress=False)
    assert main(["analyze", "dynamics", "--run", str(run), "--no-progress"]) == 2
    assert "run simcal calibrate --snapshot-every K first" in capsys.readouterr().err


def test_confusion_reads_the_predictions_and_only_removes_false_positives(calibrated_run, capsys, tmp_path):
    run = calibrated_run
    shutil.rmtree(run / "predictions", ignore_errors=True)
    assert main(["analyze", "confusion", "--run", str(run)]) == 2
    assert "run simcal predict first" in capsys.readouterr().err
    argv = ["predict", "--run", str(run), "--head", "orig,cal", "--max-images", "10", "--no-progress"]
    assert main(argv) == 0
    # the 10-image predictions went beside val's, under val-first10, and are named so
    assert main(["analyze", "confusion", "--run", str(run)]) == 2
    assert main(["analyze", "confusion", "--run", str(run), "--split", "val-first10"]) == 0
    out = json.loads((run / "analysis" / "confusion.json").read_text())
    assert set(out["heads"]) == {"cal", "orig"} and _drawn("confusion", out, tmp_path) > [1000]
    for head, r in out["heads"].items():
        # as is, it is predict's own evaluation (same 10 images, though the json holds all of val)
        predicted = json.loads((run / "predictions" / "val-first10" / head / "metrics_bbox.json").read_text())
        assert r["num_images"] == predicted["num_images"] == 10
        assert r["as is"]["AP"] == pytest.approx(100 * predicted["AP"], abs=1e-9)
        # the dropped detections are false positives at every IoU >= 0.5: AP can only rise
        for key, v in r["as is"].items():
            if v is not None:
                mid, least = r["without dets on tail objects"][key], r["without dets on other-class objects"][key]
                assert v <= mid <= least
        assert set(r["dets_on_other_objects"]) == {"r", "c", "f"}
    assert "-on other" in capsys.readouterr().out
    assert main(["analyze", "confusion", "--run", str(run), "--split", "val-first10", "--heads", "dual"]) == 2
    assert "no predictions of head 'dual'" in capsys.readouterr().err


def test_errors_and_compare_from_the_cli(calibrated_run, tmp_path, capsys):
    """analyze errors and compare read predict's results: a table each, json and figures."""
    from tests.conftest import copy_run

    run = copy_run(calibrated_run, tmp_path / "run")
    argv = ["predict", "--run", str(run), "--head", "orig,dual", "--max-images", "8", "--no-progress"]
    assert main(argv) == 0
    split = ["--run", str(run), "--split", "val-first8"]
    assert main(["analyze", "errors", *split]) == 0
    out = capsys.readouterr().out
    assert "Cls" in out and "ECE" in out
    errors = json.loads((run / "analysis" / "errors.json").read_text())
    assert set(errors["heads"]) == {"orig", "dual"}
    for r in errors["heads"].values():
        assert r["num_images"] == 8 and set(r["tide"]["counts"]) == {"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"}
        # ECE is the count-weighted gap between confidence and accuracy over the bins, MCE the largest
        cal = r["calibration"]
        bins = [b for b in cal["bins"] if b["count"]]
        n = sum(b["count"] for b in bins)
        assert n == cal["num_detections"] > 0
        gaps = [abs(b["avg_confidence"] - b["avg_accuracy"]) for b in bins]
        assert cal["ece"] == pytest.approx(sum(b["count"] * g for b, g in zip(bins, gaps)) / n, abs=1e-9)
        assert cal["mce"] == pytest.approx(max(gaps), abs=1e-9)
    assert not (run / "analysis" / "errors.png").exists()
    assert [size > 1000 for size in _drawn("errors", errors, tmp_path)] == [True, True]  # TIDE, reliability
    assert main(["compare", *split, "--heads", "orig,dual", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "dual - orig, bbox AP in %, 8 images of val-first8" in out
    compared = json.loads((run / "analysis" / "compare.json").read_text())
    assert compared["heads"] == ["orig", "dual"] and set(compared["metrics"]) >= {"AP", "APr", "AP1", "AP4"}
    metrics = json.loads((run / "predictions" / "val-first8" / "dual" / "metrics_bbox.json").read_text())
    assert compared["metrics"]["AP"]["b"] == pytest.approx(metrics["AP"], abs=1e-9)
    assert main(["compare", *split, "--heads", "orig"]) == 2
    assert "expected two heads A,B" in capsys.readouterr().err


def test_errors_compare_and_confusion_of_top_k_predictions_are_ap_fixed(calibrated_run, tmp_path):
    """Per-class top-k predictions (``val-first8-topk5``) are AP-fixed's: the diagnostics evaluate
    them without LVIS's per-image cap, with their k per class, and say so."""
    from tests.conftest import copy_run

    run = copy_run(calibrated_run, tmp_path / "run")
    argv = ["predict", "--run", str(run), "--head", "orig,dual", "--max-images", "8", "--topk-per-class", "5"]
    assert main([*argv, "--no-progress"]) == 0
    split = ["--run", str(run), "--split", "val-first8-topk5"]
    assert main(["analyze", "errors", *split]) == 0
    assert main(["analyze", "confusion", *split]) == 0
    assert main(["compare", *split, "--heads", "orig,dual", "--bootstrap", "20"]) == 0
    for tool in ("errors", "confusion", "compare"):
        out = json.loads((run / "analysis" / f"{tool}.json").read_text())
        assert (out["protocol"], out["dets_per_class"]) == ("fixed", 5), tool
    compared = json.loads((run / "analysis" / "compare.json").read_text())
    fixed = json.loads((run / "predictions" / "val-first8-topk5" / "dual" / "metrics_bbox_fixed.json").read_text())
    assert compared["metrics"]["AP"]["b"] == pytest.approx(fixed["AP"], abs=1e-9)
