"""The long-tail leaderboard of ``simcal demo --compare`` (issue: today's remedies beside SimCal).

On the same data, per training seed: the plain detector (cross-entropy, no remedy); each method
beyond the paper trained end to end (``train.loss=seesaw|eqlv2|fed|bags``, Seesaw with its
normalised classifier); the paper's decoupled baselines (LR / FL / CM / IS, Table 4) and the newer
methods as decoupled calibration losses on the frozen plain detector (image-centric sampling, BAGS
its last layer only), each alone and as a dual head; SimCal (calibrated head and dual head);
the post-hoc NorCal and logit adjustment. Every row is evaluated on box and mask (AP1..AP4,
APr/c/f, AP); over several seeds the median and mean +- std of every cell.

Written to ``<demo out>/leaderboard.md`` and ``leaderboard.json`` (with the command behind every
row, the seeds and the commit), and as a section of the demo's report (the table and a plot of
APr against APf per method).
"""

from __future__ import annotations

import html
import subprocess
from pathlib import Path
from typing import Any

from simcal import choices
from simcal.io import atomic_open, write_json
from simcal.report.tables import aggregate, html_table, img, markdown_table, mean_std_rows, results_rows
from simcal.run import HeadTag

#: how a row's name shows the settings a method implies (its :data:`simcal.choices.LOSSES` row)
_SETTING_NAMES = {"model.cls_head=normed": "normed classifier", "calibration.layers=last1": "last layer"}


def _named(title: str, overrides: list[str]) -> str:
    shown = [_SETTING_NAMES[o] for o in overrides if o in _SETTING_NAMES]
    return f"{title} ({', '.join(shown)})" if shown else title


def _e2e(name: str, spec: choices.LossSpec) -> tuple[str, list[str]]:
    over = [f"train.loss={name}", *spec.end_to_end]
    return _named(f"{spec.title}, end to end", over), over


def _decoupled(name: str, spec: choices.LossSpec) -> tuple[str, list[str]]:
    layers = [f"calibration.layers={spec.calibration_layers}"] if spec.calibration_layers else []
    over = [f"calibration.loss={name}", "calibration.sampler=random", *layers]
    return _named(f"{spec.title}, decoupled", over), over


#: the losses with a ``title`` in :data:`simcal.choices.LOSSES` trained end to end: ``(row name, train overrides)``
E2E: dict[str, tuple[str, list[str]]] = {m: _e2e(m, s) for m, s in choices.LOSSES.items() if s.title}
#: the same as decoupled calibration losses on the frozen detector (image-centric sampling, the layers
#: their authors trained): ``(row name, calibration overrides)``
DECOUPLED: dict[str, tuple[str, list[str]]] = {m: _decoupled(m, s) for m, s in choices.LOSSES.items() if s.title}
#: the post-hoc rows: ``(head kind, row name)``; their parameter is the run's ``inference.param``
POSTHOC_ROWS = (("norcal", "NorCal, post hoc"), ("logit-adj", "logit adjustment, post hoc"))
KEYS = ("AP1", "AP2", "AP3", "AP4", "APr", "APc", "APf", "AP")
HEADER = ["method", "AP on", *KEYS]


def e2e_run_dir(out: Path, method: str, seed: int) -> Path:
    """Where the end-to-end run of ``method`` with training seed ``seed`` lives under the demo's ``out``."""
    return out / "e2e" / f"{method}_seed{seed}"


def row_names(paper_baselines: dict[str, str], decoupled: dict[str, str], param: float) -> dict[str, str]:
    """Row key (``e2e:<method>`` or a head tag of the plain run) -> row name, in the table's order.

    ``paper_baselines`` / ``decoupled``: row label / method -> the calibration's name on the run.
    """
    rows = {"orig": "cross-entropy, no remedy (end to end)"}
    rows.update({f"e2e:{m}": label for m, (label, _) in E2E.items()})
    rows.update({str(HeadTag("dual", name)): f"{label} + dual" for label, name in paper_baselines.items()})
    for m, name in decoupled.items():
        rows[str(HeadTag("cal", name))] = DECOUPLED[m][0]
        rows[str(HeadTag("dual", name))] = f"{DECOUPLED[m][0]} + dual"
    rows.update({f"{kind}_{param:g}": label for kind, label in POSTHOC_ROWS})
    rows.update({"cal": "SimCal, calibrated head", "dual": "SimCal + dual head"})
    return rows


def _commit() -> str | None:
    """The checkout's commit, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def commands(rows: dict[str, str], paper: dict[str, list[str]], decoupled: dict[str, str]) -> dict[str, str]:
    """Row key -> the simcal commands behind it (``RUN``: the seed's plain run, ``S``: the seed)."""
    train = "simcal train --config configs/synthetic_cpu.yaml --out RUN train.seed=S calibration.seed=S (demo budget)"
    out = {}
    for key in rows:
        tag = HeadTag.parse(key)
        if key.startswith("e2e:"):
            m = key[4:]
            out[key] = f"{train.replace('RUN', f'e2e/{m}_seedS')} {' '.join(E2E[m][1])}; simcal predict --head orig"
        elif key == "orig":
            out[key] = f"{train}; simcal predict --run RUN --head orig"
        elif key in ("cal", "dual"):
            out[key] = f"simcal calibrate --run RUN; simcal predict --run RUN --head {key}"
        elif tag.calibration:
            name = tag.calibration
            over = paper.get(name) or next(DECOUPLED[m][1] for m, n in decoupled.items() if n == name)
            predict = f"simcal predict --run RUN --head {tag.base} --calibration {name}"
            out[key] = f"simcal calibrate --run RUN {' '.join(over)}; {predict}"
        else:
            out[key] = f"simcal predict --run RUN --head {tag.kind} (inference.param {tag.param})"
    return out


def table_rows(agg: dict[str, Any], rows: dict[str, str], form: str = "median") -> list[list[str]]:
    """Markdown / HTML rows: per IoU type (box, mask) and row, the median (``form="median"``) or
    ``mean ± std`` of each column, in percent (the demo's Table-3 rows)."""
    return results_rows(agg["median"], rows) if form == "median" else mean_std_rows(agg, rows)


def write_leaderboard(
    out: Path,
    per_seed: list[dict[str, dict[str, dict[str, float | None]]]],
    rows: dict[str, str],
    meta: dict[str, Any],
) -> tuple[str, str]:
    """Write ``leaderboard.json`` / ``leaderboard.md`` and the APr-vs-APf plot under ``out``; return
    ``(markdown, report html)``.

    Args:
        per_seed: per seed, row key -> ``{"bbox"|"segm": {KEYS: fraction or None}}``.
        rows: row key -> name (:func:`row_names`), in order.
        meta: recorded as is (seeds, budget, commands, wall time).
    """
    from simcal.report.plots import method_scatter  # matplotlib: only when a leaderboard is drawn

    agg = aggregate(per_seed)
    n = len(per_seed)
    record = {**meta, "commit": _commit(), "rows": rows, "per_seed": per_seed, **agg}
    write_json(out / "leaderboard.json", record, indent=1)
    title = f"Long-tail leaderboard, median of {n} seed{'s' if n > 1 else ''}"
    md = f"### {title}\n\n{markdown_table(table_rows(agg, rows), HEADER)}\n\n"
    md += f"### mean ± std over {n} seeds\n\n{markdown_table(table_rows(agg, rows, 'mean'), HEADER)}\n"
    with atomic_open(out / "leaderboard.md", "w") as f:
        f.write(md)
    points = {}
    for key, name in rows.items():
        m, s = agg["mean"][key]["segm"], agg["std"][key]["segm"]
        if m["APr"] is not None and m["APf"] is not None:
            points[name] = (100 * m["APf"], 100 * m["APr"], 100 * s["APf"], 100 * s["APr"])
    plot = out / "leaderboard_apr_apf.png"
    method_scatter(
        plot,
        points,
        xlabel="APf, mask (%)",
        ylabel="APr, mask (%)",
        title=f"tail vs head classes per method (mean ± std over {n} seeds)",
    )
    section = (
        f"<h2>{html.escape(title)}</h2>{html_table(HEADER, table_rows(agg, rows))}"
        f"<h3>mean ± std over {n} seeds</h3>{html_table(HEADER, table_rows(agg, rows, 'mean'))}"
        f"<h3>APr against APf (mask) per method</h3>{img(plot, 'APr against APf per method')}"
    )
    return md, section


__all__ = ["DECOUPLED", "E2E", "POSTHOC_ROWS", "e2e_run_dir", "row_names", "write_leaderboard"]
