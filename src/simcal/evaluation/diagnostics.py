"""What calibration changed, from the engine's own diagnostics: TIDE errors, score calibration
(ECE) and bootstrap confidence intervals of AP deltas between two heads.

Every number comes from hotcoco (its ``tide_errors``, ``calibration`` and ``compare``); this
module chooses their inputs and names their outputs. Two choices are ours:

* the r/c/f groups are the training statistics' (``stats``), as in :mod:`lvis_eval`;
* the bins AP1..AP4 get their intervals from the engine's group bootstrap: the comparison runs
  once with the groups as r/c/f and once per three bins relabelled r/c/f (the engine resamples the
  same images for a seed, so every interval is over the same bootstrap samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from simcal.choices import FIXED_DETS_PER_CLASS
from simcal.data.stats import CategoryStat
from simcal.formatting import pct

# the engine is imported where it runs: the report reads this module's names and tables only

#: TIDE error types (Bolya et al. 2020), in the order the tables show them
ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
ERROR_NAMES = {
    "Cls": "classification (right box, wrong class)",
    "Loc": "localisation (right class, box IoU 0.1-0.5)",
    "Both": "classification and localisation",
    "Dupe": "duplicate detection",
    "Bkg": "background (no object)",
    "Miss": "missed object",
}
#: the metrics a comparison reports, in order
COMPARED = ("AP", "AP50", "AP75", "APr", "APc", "APf")


def errors(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    iou_type: str,
    stats: list[CategoryStat],
    *,
    bins: int = 10,
    protocol: str = "lvis",
    dets_per_class: int = FIXED_DETS_PER_CLASS,
) -> dict[str, Any]:
    """TIDE error breakdown and score calibration of one head's detections (under ``protocol``:
    ``fixed`` for per-class top-k predictions, whose images are not capped at 300).

    Returns ``{"tide": {"delta_ap": {type: AP gained if fixed}, "counts": {type: n}, "ap_base"},
    "calibration": {"ece", "mce", "bins": [{bin_lower, bin_upper, avg_confidence, avg_accuracy,
    count}], "num_detections"}}`` (fractions; TIDE at IoU 0.5, background below 0.1).
    """
    from simcal.evaluation.lvis_eval import engine_eval

    ev, _ = engine_eval(gt, results, iou_type, stats, protocol=protocol, dets_per_class=dets_per_class)
    tide = ev.tide_errors(pos_thr=0.5, bg_thr=0.1)
    cal = ev.calibration(n_bins=bins, iou_threshold=0.5)
    return {
        "tide": {
            "delta_ap": {k: float(tide["delta_ap"][k]) for k in ERROR_TYPES},
            "counts": {k: int(tide["counts"][k]) for k in ERROR_TYPES},
            "ap_base": float(tide["ap_base"]),
        },
        "calibration": {
            "ece": float(cal["ece"]),
            "mce": float(cal["mce"]),
            "bins": cal["bins"],
            "num_detections": int(cal["num_detections"]),
        },
    }


def _relabelled(stats: list[CategoryStat], groups: dict[int, str]) -> list[CategoryStat]:
    """``stats`` with each class's frequency group replaced by ``groups[bin]`` (``"-"``: in no group)."""
    return [dataclasses.replace(s, frequency=groups.get(s.bin, "-")) for s in stats]


def compare(
    gt: dict[str, Any],
    results_a: list[dict[str, Any]],
    results_b: list[dict[str, Any]],
    iou_type: str,
    stats: list[CategoryStat],
    num_bins: int = 4,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    protocol: str = "lvis",
    dets_per_class: int = FIXED_DETS_PER_CLASS,
) -> dict[str, Any]:
    """Metric deltas ``b - a`` with bootstrap confidence intervals over images (the engine's),
    under ``protocol`` (``fixed``: AP-fixed, for per-class top-k predictions).

    Returns ``{"num_images", "n_bootstrap", "confidence", "metrics": {key: {"a", "b", "delta",
    "lower", "upper", "prob_positive"}}}`` for :data:`COMPARED` and ``AP1..AP<num_bins>``; a key
    whose group has no ground truth has ``None`` values.
    """

    import hotcoco

    from simcal.evaluation.lvis_eval import engine_eval

    def run(groups: list[CategoryStat]) -> dict[str, Any]:
        ev_a, _ = engine_eval(gt, results_a, iou_type, groups, protocol=protocol, dets_per_class=dets_per_class)
        ev_b, _ = engine_eval(gt, results_b, iou_type, groups, protocol=protocol, dets_per_class=dets_per_class)
        return hotcoco.compare(ev_a, ev_b, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)

    def row(out: dict[str, Any], key: str) -> dict[str, float | None]:
        a, b = out["metrics_a"].get(key, -1.0), out["metrics_b"].get(key, -1.0)
        if a < 0 or b < 0:
            return {"a": None, "b": None, "delta": None, "lower": None, "upper": None, "prob_positive": None}
        ci = (out.get("ci") or {}).get(key) or {}
        return {
            "a": float(a),
            "b": float(b),
            "delta": float(out["deltas"][key]),
            "lower": ci.get("lower"),
            "upper": ci.get("upper"),
            "prob_positive": ci.get("prob_positive"),
        }

    first = run(stats)
    metrics = {key: row(first, key) for key in COMPARED}
    for start in range(0, num_bins, 3):  # three bins at a time as the engine's r / c / f
        chunk = list(range(start, min(start + 3, num_bins)))
        out = run(_relabelled(stats, dict(zip(chunk, "rcf"))))
        for b, group in zip(chunk, "rcf"):
            metrics[f"AP{b + 1}"] = row(out, f"AP{group}")
    return {
        "num_images": int(first["num_images"]),
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "metrics": metrics,
    }


def comparison_rows(out: dict[str, Any], keys: Sequence[str] | None = None) -> list[list[str]]:
    """Table rows ``metric, a, b, delta, interval, P(delta > 0)`` in percent points."""
    rows = []
    for key in keys or out["metrics"]:
        m = out["metrics"][key]
        interval = "-" if m["lower"] is None else f"[{pct(m['lower'], signed=True)}, {pct(m['upper'], signed=True)}]"
        prob = "-" if m["prob_positive"] is None else f"{m['prob_positive']:.2f}"
        delta = pct(m["delta"], signed=True)
        rows.append([key, pct(m["a"]), pct(m["b"]), delta, interval, prob])
    return rows
