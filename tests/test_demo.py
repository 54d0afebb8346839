"""The demo end to end on a tiny budget: the Table-3 shaped output, and resuming skips finished stages."""

from __future__ import annotations

import json

import simcal.demo as demo
from simcal.cli import main


def test_demo_tiny_budget_table_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        demo.BUDGETS,
        "quick",
        {
            "synth": dict(classes=6, train_images=24, val_images=20, size=64),
            "overrides": [
                "model.min_size=64",
                "model.max_size=64",
                "train.max_iter=2",
                "train.steps=[]",
                "train.warmup_iters=1",
                "train.batch_size=2",
                "train.threads=1",
                "data.num_workers=0",
                "calibration.steps=3",
                "calibration.classes_per_batch=4",
            ],
        },
    )
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = (out / "demo_results.md").read_text().splitlines()
    assert table[0] == "| head | AP on | AP1 | AP2 | AP3 | AP4 | APr | APc | APf | AP |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["original", "calibrated only", "dual head (SimCal)"] * 2
    assert "\n".join(table) in printed
    summary = json.loads((out / "demo_results.json").read_text())
    assert set(summary["metrics"]) == {"orig", "cal", "dual"}
    assert 0.0 <= summary["metrics"]["dual"]["segm"]["AP"] <= 1.0

    # a second run finds every stage done and only predicts again
    weights = (out / "run" / "model_final.pth").stat().st_mtime_ns
    assert main(["demo", "--budget", "quick", "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "(exists)" in again and again.count("(exists)") == 3
    assert (out / "run" / "model_final.pth").stat().st_mtime_ns == weights
