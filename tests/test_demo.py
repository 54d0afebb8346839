"""The demo end to end on a tiny budget: the Table-3 shaped output, the report, resuming, seeds and
the decoupled baselines."""

from __future__ import annotations

import json
import statistics

import pytest

import simcal.demo as demo
from simcal.cli import main

TINY = {
    "synth": dict(classes=6, train_images=24, val_images=20, size=64),
    "overrides": [
        "model.min_size=64",
        "model.max_size=64",
        "model.detections_per_img=20",  # masks of 100 detections x 7 heads x 20 images dominate otherwise
        "train.max_iter=2",
        "train.steps=[]",
        "train.warmup_iters=1",
        "train.batch_size=2",
        "train.threads=1",
        "data.num_workers=0",
        "calibration.steps=6",
        "calibration.classes_per_batch=4",
    ],
    "analysis_images": 6,
}


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setitem(demo.BUDGETS, "quick", TINY)


def test_demo_tiny_budget_table_report_and_resume(tiny_budget, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    md = (out / "demo_results.md").read_text()
    main_md, without_md, protocols_md, compare_md, errors_md = md.split("### ")[1:]
    table = [line for line in main_md.splitlines() if line.startswith("|")]
    assert table[0] == "| head | AP on | AP1 | AP2 | AP3 | AP4 | APr | APc | APf | AP |"
    heads = ["original", "calibrated only", "dual head (SimCal)"]
    assert [row.split("|")[1].strip() for row in table[2:]] == heads * 2
    assert "\n".join(table) in printed
    summary = json.loads((out / "demo_results.json").read_text())
    assert set(summary["metrics"]) == {"orig", "cal", "dual"}
    # the printed table is the summary's numbers: the dual head's mask AP, last column of its row
    dual_mask = [row for row in table[2:] if row.split("|")[1:3] == [" dual head (SimCal) ", " mask "]]
    assert dual_mask[0].split("|")[-2].strip() == f"{100 * summary['metrics']['dual']['segm']['AP']:.1f}"
    # box AP without the detections on tail objects: only false positives go, so AP can only rise
    assert without_md.startswith("Table 3, box, without the detections on rare and common objects")
    rows = [line.split("|")[1:3] for line in without_md.splitlines() if line.startswith("| ")][1:]
    assert [(a.strip(), b.strip()) for a, b in rows] == [(h, "box") for h in heads]
    without = summary["without_dets_on_tail_objects"]
    for h in ("orig", "cal", "dual"):
        for k, v in summary["metrics"][h]["bbox"].items():
            assert (v is None) == (without[h]["bbox"][k] is None)
            assert v is None or without[h]["bbox"][k] >= v - 1e-12
    page = (out / "run" / "report" / "index.html").read_text()
    assert "dual head (SimCal)" in page and "data:image/png;base64," in page
    assert "Where the classification errors land" in page
    # the dual head against the original with bootstrap intervals, and the error breakdown
    assert compare_md.startswith("dual - orig, box AP, seed 0: 95% bootstrap intervals over")
    assert "| metric | orig | dual | delta | interval | P(delta > 0) |" in compare_md
    assert set(summary["dual_minus_orig"]) >= {"AP", "APr", "AP1", "AP4"}
    assert summary["dual_minus_orig"]["AP"]["b"] == pytest.approx(summary["metrics"]["dual"]["bbox"]["AP"], abs=1e-9)
    assert errors_md.startswith("AP50 points each error type costs") and "| dual head (SimCal) |" in errors_md
    assert "Errors and score calibration" in page and "is the gain more than noise?" in page
    assert (out / "run" / "analysis" / "sweep_T.json").exists()
    assert (out / "run" / "analysis" / "dynamics.json").exists()
    # AP, AP-fixed and AP-pool: LVIS's 10,000 per class over 19,809 val images scaled to 20 images
    assert demo.topk_per_class(20) == 11 and demo.topk_per_class(19809) == 10000
    assert protocols_md.startswith("AP, AP-fixed and AP-pool (11 detections per class over 20 val images")
    rows = [line.split("|")[1:3] for line in protocols_md.splitlines() if line.startswith("| ")][1:]
    protocols = ["AP (per-image cap)", "AP-fixed", "AP-pool"]
    assert [(a.strip(), b.strip()) for a, b in rows] == [(h, p) for h in heads for p in protocols]
    topk = out / "run" / "predictions" / "val-topk11"
    for head in ("orig", "cal", "dual"):
        kept = json.loads((topk / head / "results.json").read_text())
        per_class = {}
        for d in kept:
            per_class[d["category_id"]] = per_class.get(d["category_id"], 0) + 1
        assert max(per_class.values()) == 11
        fixed = json.loads((topk / head / "metrics_bbox_fixed.json").read_text())
        row = next(r for r in summary["protocols"]["rows"] if r[:2] == [demo.HEAD_NAMES[head], "AP-fixed"])
        assert row[5] == f"{100 * fixed['AP']:.1f}"  # box AP column of the AP-fixed row
    assert "AP-fixed and AP-pool (AP in %, 11 detections per class over val)" in page

    # a second run finds every stage done, trains and predicts nothing, and prints the same table
    weights = (out / "run" / "model_final.pth").stat().st_mtime_ns
    results = (out / "run" / "predictions" / "val" / "dual" / "results.json").stat().st_mtime_ns
    assert main(["demo", "--budget", "quick", "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert again.count("(exists)") == 7  # data, train, calibrate, predict, predict top-k, T sweep, dynamics
    assert (out / "run" / "model_final.pth").stat().st_mtime_ns == weights
    assert (out / "run" / "predictions" / "val" / "dual" / "results.json").stat().st_mtime_ns == results
    assert "\n".join(table) in again


def test_demo_seeds_and_compare(tiny_budget, tmp_path, capsys, monkeypatch):
    # two of the four newer methods keep the test short: each method's own path (train end to end,
    # calibrate decoupled, predict) is tested in tests/modeling/test_longtail_losses.py
    import simcal.report.leaderboard as lb

    monkeypatch.setattr(lb, "E2E", {m: lb.E2E[m] for m in ("seesaw", "bags")})
    monkeypatch.setattr(lb, "DECOUPLED", {m: lb.DECOUPLED[m] for m in ("seesaw", "bags")})
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "quick", "--out", str(out), "--seeds", "2", "--compare", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_results.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["per_seed"]) == 2
    assert (out / "run_seed1" / "model_final.pth").exists()
    a, b = (s["dual"]["bbox"]["AP"] for s in summary["per_seed"])
    assert summary["metrics"]["dual"]["bbox"]["AP"] == pytest.approx(statistics.median([a, b]))
    assert summary["mean"]["dual"]["bbox"]["AP"] == pytest.approx((a + b) / 2)
    assert summary["std"]["dual"]["bbox"]["AP"] == pytest.approx(statistics.stdev([a, b]))
    # the decoupled baselines: one calibrated head each, on both detectors, used as dual heads
    names = ["3fc_ft_lr_random", "3fc_ft_focal_random", "3fc_ft_cm_random", "3fc_ft_repeat_factor"]
    for run in ("run", "run_seed1"):
        for n in names:
            assert (out / run / "calibration" / n / "head.pth").exists()
            assert (out / run / "predictions" / "val" / f"dual@{n}" / "metrics_segm.json").exists()
    md = (out / "demo_results.md").read_text()
    assert "mean ± std over 2 seeds" in md and "median of 2 seeds" in md
    rows = [line.split("|")[1].strip() for line in md.split("### Table 4")[1].splitlines() if line.startswith("| ")]
    assert rows[1:7] == [
        "original (no calibration)",
        "LR (re-weighting) + dual",
        "FL (focal loss) + dual",
        "CM (class-aware margin) + dual",
        "IS (repeat-factor sampling) + dual",
        "SimCal (bi-level) + dual",
    ]
    assert "Table 4" in printed
    page = (out / "run" / "report" / "index.html").read_text()
    assert "mean ± std over 2 seeds" in page and "LR (re-weighting) + dual" in page
    assert "Table 3, median of 2 seeds" in page
    # the leaderboard: every method end to end (its own detector per seed) and decoupled (+ dual),
    # SimCal, NorCal, logit adjustment; median and mean +- std of 2 seeds, box and mask
    board = json.loads((out / "leaderboard.json").read_text())
    names = list(board["rows"].values())
    for method in ("seesaw", "bags"):
        for seed in (0, 1):
            assert (out / "e2e" / f"{method}_seed{seed}" / "model_final.pth").exists()
    first = ["cross-entropy, no remedy (end to end)", "Seesaw, end to end (normed classifier)", "BAGS, end to end"]
    assert names[:3] == first
    assert {"Seesaw, decoupled", "Seesaw, decoupled + dual", "BAGS, decoupled (last layer) + dual"} <= set(names)
    assert {"NorCal, post hoc", "logit adjustment, post hoc", "SimCal + dual head"} <= set(names)
    assert len(board["per_seed"]) == 2 and board["seeds"] == [0, 1]
    assert set(board["per_seed"][0]) == set(board["rows"]) and set(board["commands"]) == set(board["rows"])
    e2e = [s["e2e:seesaw"]["segm"]["AP"] for s in board["per_seed"]]
    assert board["median"]["e2e:seesaw"]["segm"]["AP"] == pytest.approx(statistics.median(e2e))
    assert "train.loss=seesaw" in board["commands"]["e2e:seesaw"]
    lb_md = (out / "leaderboard.md").read_text()
    assert lb_md.count("| Seesaw, decoupled + dual | mask |") == 2  # median, then mean +- std
    assert (out / "leaderboard_apr_apf.png").stat().st_size > 0
    assert "APr against APf (mask) per method" in page and "Long-tail leaderboard" in printed


def test_aggregate_median_mean_std():
    per_seed = [{"h": {"bbox": {"AP": v, "APr": None if v == 0.3 else v}}} for v in (0.1, 0.2, 0.3)]
    agg = demo.aggregate(per_seed)
    assert agg["median"]["h"]["bbox"]["AP"] == pytest.approx(0.2)
    assert agg["mean"]["h"]["bbox"]["AP"] == pytest.approx(0.2)
    assert agg["std"]["h"]["bbox"]["AP"] == pytest.approx(0.1)
    assert agg["median"]["h"]["bbox"]["APr"] is None  # a seed without the group: no aggregate


@pytest.mark.parametrize("roi_heads", ["htc"])  # HTC runs every cascade code path, plus its mask heads
def test_demo_on_a_cascade(roi_heads, tiny_budget, tmp_path, capsys):
    """`simcal demo --roi-heads cascade|htc`: the same job on Cascade Mask R-CNN or HTC, every stage calibrated
    (one head per stage), the analyses and the report included."""
    import torch

    from simcal.run import Run

    out = tmp_path / "demo"
    assert main(["demo", "--budget", "quick", "--roi-heads", roi_heads, "--out", str(out), "--no-progress"]) == 0
    assert "dual head (SimCal)" in capsys.readouterr().out
    run = Run(out / "run")
    assert f"roi_heads: {roi_heads}" in run.config.read_text()
    head = torch.load(run.calibration("3fc_ft").head, weights_only=False)
    assert head["meta"]["stages"] == [0, 1, 2]
    for name in ("orig", "cal", "dual"):  # HTC's masks are the mean of its three mask heads'
        segm = json.loads((out / "run" / "predictions" / "val" / name / "metrics_segm.json").read_text())
        assert segm["num_detections"] > 0, name
    assert (out / "run" / "report" / "index.html").is_file()
    assert (out / "run" / "analysis" / "dynamics.json").is_file()
