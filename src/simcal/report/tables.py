"""Tables of AP in percent (torch-free): the demo's and the leaderboard's Table-3 rows, markdown and
HTML tables, images embedded in a page, and the median / mean / std over seeds.

The numbers go through :func:`simcal.formatting.pct`, the one formatter.
"""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path
from typing import Any

from simcal.formatting import pct

#: Table 3's AP columns (the paper's instance-count bins, the LVIS frequency groups, AP)
TABLE_KEYS = ("AP1", "AP2", "AP3", "AP4", "APr", "APc", "APf", "AP")
HEADER = ["head", "AP on", *TABLE_KEYS]
#: the IoU types of a Table-3 table, as its "AP on" column names them
IOUS = (("bbox", "box"), ("segm", "mask"))


def _rows(names: dict[str, str], cell: Any, ious: tuple[tuple[str, str], ...] = IOUS) -> list[list[str]]:
    """One row per (box/mask, head): name, AP on, then ``cell(head, iou, key)`` per Table-3 column."""
    return [
        [name, label, *(cell(head, iou, k) for k in TABLE_KEYS)] for iou, label in ious for head, name in names.items()
    ]


def results_rows(
    metrics: dict[str, dict[str, dict[str, float | None]]],
    names: dict[str, str],
    ious: tuple[tuple[str, str], ...] = IOUS,
) -> list[list[str]]:
    """Table 3's rows, values in percent (``ious``: which of box / mask)."""
    return _rows(names, lambda h, iou, k: pct(metrics[h][iou][k], 5), ious)


def mean_std_rows(agg: dict[str, Any], names: dict[str, str]) -> list[list[str]]:
    """Rows of ``mean +- std`` in percent (Table 11's form)."""

    def cell(h: str, iou: str, k: str) -> str:
        mean, std = agg["mean"][h][iou][k], agg["std"][h][iou][k]
        return "-" if mean is None else f"{pct(mean)} ± {pct(std)}"

    return _rows(names, cell)


def markdown_table(rows: list[list[str]], header: list[str] | None = None) -> str:
    """Rows under ``header`` (default Table 3's: head, AP on, then the AP columns right-aligned;
    another header has one text column)."""
    header = header or HEADER
    text_columns = 2 if header is HEADER else 1
    lines = ["| " + " | ".join(header) + " |", "|---" * text_columns + "|" + "---:|" * (len(header) - text_columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of text cells (escaped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(path: Path, alt: str) -> str:
    """A PNG embedded in the page (a data URI), so the page is one file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(path.name)}">'


def aggregate(per_seed: list[dict[str, dict[str, dict[str, float | None]]]]) -> dict[str, Any]:
    """Median, mean and (sample) std over seeds of every (head, iou, key); ``None`` where any seed has none."""
    out: dict[str, Any] = {"median": {}, "mean": {}, "std": {}}
    for head, ious in per_seed[0].items():
        for stat in out.values():
            stat[head] = {}
        for iou, keys in ious.items():
            for stat in out.values():
                stat[head][iou] = {}
            for k in keys:
                vals = [s[head][iou][k] for s in per_seed]
                ok = None not in vals
                out["median"][head][iou][k] = statistics.median(vals) if ok else None
                out["mean"][head][iou][k] = statistics.fmean(vals) if ok else None
                out["std"][head][iou][k] = (statistics.stdev(vals) if len(vals) > 1 else 0.0) if ok else None
    return out
