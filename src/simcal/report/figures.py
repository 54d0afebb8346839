"""The figures of the analyses, drawn from the json each writes (``RUN/analysis/<tool>.json``):
``simcal analyze`` computes and writes numbers only; the report draws (:func:`draw`).

One function per analysis, each ``(data, path) -> [written PNGs]``; the plot primitives are
:mod:`simcal.report.plots`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from simcal.evaluation.analysis import CONFUSION_LABELS, CONFUSION_VARIANTS
from simcal.evaluation.diagnostics import ERROR_TYPES
from simcal.report.plots import grouped_bars, line_plot, reliability_plot

BIN_KEYS = ("AP1", "AP2", "AP3", "AP4")


def _images(data: dict[str, Any]) -> str:
    return f"{data['split']}, {data['num_images']} images"


def recall(data: dict[str, Any], path: Path) -> list[Path]:
    """RPN recall against the IoU threshold (Fig. 1b)."""
    line_plot(
        path,
        data["iou_thresholds"],
        {f"{k} proposals": [100 * v for v in vals] for k, vals in data["recall_by_iou"].items()},
        title=f"RPN recall on {data.get('split', 'val')} (AR@100 {100 * data['AR@100']:.1f}, "
        f"AR@1000 {100 * data['AR@1000']:.1f})",
        xlabel="IoU threshold",
        ylabel="recall (%)",
    )
    return [path]


def oracle(data: dict[str, Any], path: Path) -> list[Path]:
    """AP of the original head against the props-gt oracle (Fig. 1c)."""
    heads = data["heads"]
    groups = [k for k in ("AP", "APr", "APc", "APf", *BIN_KEYS) if any(k in r for r in heads.values())]
    title = f"{data['iou']} AP: original vs props-gt oracle ({_images(data)})"
    grouped_bars(path, groups, {name: [r.get(k) for k in groups] for name, r in heads.items()}, title=title)
    return [path]


def sweep_T(data: dict[str, Any], path: Path) -> list[Path]:
    """The dual head's AP against the threshold T (Fig. 4c), the run's T marked."""
    rows = data["sweep"]
    keys = ["AP", *[k for k in BIN_KEYS if k in rows[0]]]
    run_T = data.get("run_T")
    line_plot(
        path,
        [r["T"] for r in rows],
        {k: [r[k] for r in rows] for k in keys},
        title=f"dual head (sel) {data['iou']} AP against T ({_images(data)})",
        xlabel="T (training instances)",
        logx=True,
        **({"vline": run_T, "vline_label": f"T = {run_T:g} (the run's)"} if run_T is not None else {}),
    )
    return [path]


def dynamics(data: dict[str, Any], path: Path) -> list[Path]:
    """The calibrated head's AP during calibration (Fig. 4a)."""
    rows = data["steps"]
    keys = ["AP", *[k for k in BIN_KEYS if k in rows[0]["cal"]]]
    line_plot(
        path,
        [r["step"] for r in rows],
        {f"cal {k}": [r["cal"][k] for r in rows] for k in keys},
        title=f"calibrated head {data['iou']} AP during calibration ({_images(data)})",
        xlabel="calibration step",
    )
    return [path]


def confusion(data: dict[str, Any], path: Path) -> list[Path]:
    """The head classes' AP as is, without the detections on tail objects, without any on other objects."""
    short = dict(zip(CONFUSION_VARIANTS, CONFUSION_LABELS))
    cells = [(key, name) for key in ("APf", "AP4") for name in CONFUSION_VARIANTS]
    grouped_bars(
        path,
        [f"{key}\n{short[name]}" for key, name in cells],
        {head: [r[name].get(key) for key, name in cells] for head, r in data["heads"].items()},
        title=f"head classes' {data['iou']} AP without the detections on other-class objects ({data['split']})"
        + (" - NOT COMPARABLE: different images" if "not_comparable" in data else ""),
        values=True,
    )
    return [path]


def errors(data: dict[str, Any], path: Path) -> list[Path]:
    """What each error type costs (TIDE) and the reliability diagram beside it (``<path>_calibration``)."""
    iou, split = data["iou"], data["split"]
    grouped_bars(
        path,
        list(ERROR_TYPES),
        {h: [100 * r["tide"]["delta_ap"][k] for k in ERROR_TYPES] for h, r in data["heads"].items()},
        title=f"what each error type costs (TIDE, {iou}, IoU 0.5), {split}",
        ylabel="AP50 gained if fixed (points)",
        values=True,
    )
    reliability = path.with_name(f"{path.stem}_calibration{path.suffix}")
    reliability_plot(
        reliability,
        {h: r["calibration"] for h, r in data["heads"].items()},
        title=f"score calibration ({iou}, IoU 0.5), {split}",
    )
    return [path, reliability]


#: analysis tool -> its figure(s)
FIGURES: dict[str, Callable[[dict[str, Any], Path], list[Path]]] = {
    "recall": recall,
    "oracle": oracle,
    "sweep-T": sweep_T,
    "dynamics": dynamics,
    "confusion": confusion,
    "errors": errors,
}


def draw(tool: str, data: dict[str, Any], path: Path) -> list[Path]:
    """The figure(s) of analysis ``tool`` from its json ``data``, written at ``path`` (and beside it)."""
    return FIGURES[tool](data, path)
