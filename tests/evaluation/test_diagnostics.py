"""TIDE errors, score calibration and bootstrap comparisons: the engine's, on cases worked by hand."""

from __future__ import annotations

import copy

import pytest

from simcal.data.annotations import validate_dataset
from simcal.evaluation import diagnostics
from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats
from simcal.evaluation.perturb import perturb_ground_truth, random_lvis_gt
from tests.evaluation.test_lvis_eval import EDGES
from tests.evaluation.test_protocols import _one_image


def _det(cat, box, score):
    return {"image_id": 1, "category_id": cat, "bbox": list(box), "score": score}


def test_tide_names_each_error_and_ece_reads_the_scores():
    """On one image with objects a (10,10,20,20) and b (50,40,30,20): a detection of class b on
    a's box is a classification error, a second one of a on a's box a duplicate, one far from any
    object a background error; b's object is found. The classification error outscores b's true
    positive, so fixing it gains AP. Scores: true positives 0.9 and 0.9, false positives 0.95,
    0.8, 0.7: in the [0.9, 1) bin 2 of 3 are right, in the 0.7 and 0.8 bins none."""
    gt = _one_image()
    stats = resolve_category_stats(gt, "gt")
    dets = [
        _det(1, (10, 10, 20, 20), 0.9),  # true positive
        _det(2, (50, 40, 30, 20), 0.9),  # true positive
        _det(2, (10, 10, 20, 20), 0.95),  # classification error: class b on a's object
        _det(1, (10, 10, 20, 20), 0.8),  # duplicate
        _det(1, (70, 0, 8, 8), 0.7),  # background
    ]
    out = diagnostics.errors(gt, dets, "bbox", stats)
    counts = out["tide"]["counts"]
    assert (counts["Cls"], counts["Dupe"], counts["Bkg"], counts["Miss"], counts["Loc"]) == (1, 1, 1, 0, 0)
    assert out["tide"]["delta_ap"]["Miss"] == 0 and out["tide"]["delta_ap"]["Cls"] > 0
    cal = out["calibration"]
    assert cal["num_detections"] == 5
    by_bin = {round(b["bin_lower"], 1): b for b in cal["bins"] if b["count"]}
    assert by_bin[0.9]["count"] == 3 and by_bin[0.9]["avg_accuracy"] == pytest.approx(2 / 3)
    # ECE = sum over bins of count/N * |confidence - accuracy|
    expected = (3 * abs((0.9 + 0.9 + 0.95) / 3 - 2 / 3) + 1 * abs(0.8 - 0) + 1 * abs(0.7 - 0)) / 5
    assert cal["ece"] == pytest.approx(expected, abs=1e-9)


@pytest.fixture(scope="module")
def lt():
    gt = validate_dataset(random_lvis_gt(80, 30, seed=7, not_exhaustive_fraction=0.2))
    base = perturb_ground_truth(gt, seed=8, false_positives=30, confuse_rate=0.2)
    return gt, base


def test_compare_deltas_intervals_and_bins(lt):
    gt, a = lt
    stats = resolve_category_stats(gt, "gt", edges=EDGES)
    # b: a's detections with half the true class scores lowered below every false positive
    b = copy.deepcopy(a)
    for i, d in enumerate(b):
        if i % 2 == 0:
            d["score"] *= 0.01
    out = diagnostics.compare(gt, a, b, "bbox", stats, len(EDGES) + 1, n_bootstrap=300, seed=1)
    ea, eb = (evaluate(gt, r, "bbox", stats, EDGES) for r in (a, b))
    for key in ("AP", "APr", "APc", "AP1", "AP2", "AP3", "AP4"):
        m = out["metrics"][key]
        assert m["a"] == pytest.approx(ea.metrics[key], abs=1e-9), key
        assert m["b"] == pytest.approx(eb.metrics[key], abs=1e-9), key
        assert m["delta"] == pytest.approx(m["b"] - m["a"], abs=1e-9)
        assert m["lower"] <= m["delta"] <= m["upper"]
    assert out["metrics"]["AP"]["upper"] < 0  # a clear loss: the whole interval is below zero
    assert out["num_images"] == 80 and out["n_bootstrap"] == 300
    same = diagnostics.compare(gt, a, a, "bbox", stats, len(EDGES) + 1, n_bootstrap=50, seed=1)
    assert all(m["delta"] in (0.0, None) for m in same["metrics"].values())
    assert same["metrics"]["AP"]["lower"] == same["metrics"]["AP"]["upper"] == 0.0


def test_the_bins_intervals_come_from_the_same_bootstrap_samples(lt):
    """AP does not depend on the groups: its interval from the relabelled run (bins as r/c/f)
    equals the first run's, so the engine drew the same images for the same seed."""
    gt, a = lt
    stats = resolve_category_stats(gt, "gt", edges=EDGES)
    b = [dict(d, score=d["score"] ** 2) if d["category_id"] % 3 == 0 else d for d in a]
    import hotcoco

    from simcal.evaluation.lvis_eval import engine_eval

    runs = []
    for groups in (stats, diagnostics._relabelled(stats, {0: "r", 1: "c", 2: "f"})):
        ev_a, _ = engine_eval(gt, a, "bbox", groups)
        ev_b, _ = engine_eval(gt, b, "bbox", groups)
        runs.append(hotcoco.compare(ev_a, ev_b, n_bootstrap=200, seed=3, confidence=0.9)["ci"]["AP"])
    assert runs[0] == runs[1]


def test_the_diagnostics_follow_the_protocol():
    """400 detections on one image: under LVIS rules the engine sees its 300 best, under AP-fixed
    (no per-image cap) all 400; the calibration counts and the comparison say so."""
    gt = _one_image()
    stats = resolve_category_stats(gt, "gt")
    dets = [_det(1 + i % 2, (10 + i % 50, 10, 20, 20), 0.9 - i / 1000) for i in range(400)]
    lvis = diagnostics.errors(gt, dets, "bbox", stats)
    fixed = diagnostics.errors(gt, dets, "bbox", stats, protocol="fixed", dets_per_class=10000)
    assert lvis["calibration"]["num_detections"] == 300
    assert fixed["calibration"]["num_detections"] == 400
    capped = diagnostics.errors(gt, dets, "bbox", stats, protocol="fixed", dets_per_class=50)
    assert capped["calibration"]["num_detections"] == 100  # 50 per class, two classes
