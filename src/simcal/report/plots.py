"""PNG plots of analysis results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simcal.io import atomic_open  # noqa: E402


def _save(fig: plt.Figure, ax: plt.Axes | None, path: str | os.PathLike[str]) -> None:
    """Legend (when ``ax`` is given), tight layout, PNG, and the figure closed."""
    if ax is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def line_plot(
    path: str | os.PathLike[str],
    x: Sequence[float],
    series: dict[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
    ylabel: str = "AP (%)",
    logx: bool = False,
    vline: float | None = None,
    vline_label: str = "",
) -> None:
    """One line per series (``None`` points are skipped), optionally a marked x (``vline``); PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys) if b is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    if vline is not None:
        ax.axvline(vline, color="grey", lw=1, ls=":", label=vline_label or None)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    _save(fig, ax, path)


def grouped_bars(
    path: str | os.PathLike[str],
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str = "AP (%)",
    values: bool = False,
) -> None:
    """Grouped bar chart: one group per x label, one bar per series (``values``: printed on the bars)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [0 if y is None else y for y in ys], width=width, label=name)
        if values:
            ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, ax, path)


def reliability_plot(path: str | os.PathLike[str], curves: dict[str, dict], *, title: str) -> None:
    """Reliability diagram: per series, the accuracy of each confidence bin against its mean
    confidence (``curves[name]["bins"]``: ``avg_confidence``, ``avg_accuracy``, ``count``), the
    diagonal for perfect calibration, and each series' ECE in the legend."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfectly calibrated")
    for name, c in curves.items():
        pts = [(b["avg_confidence"], b["avg_accuracy"]) for b in c["bins"] if b.get("count")]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"{name} (ECE {c['ece']:.3f})")
    ax.set(title=title, xlabel="score (mean of the bin)", ylabel="fraction correct", xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    _save(fig, ax, path)


GROUP_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}


def class_histogram(
    path: str | os.PathLike[str],
    counts: Sequence[int],
    groups: Sequence[str],
    edges: Sequence[float],
    *,
    title: str,
    group_names: Sequence[str] = ("rare (<10 images)", "common (10-100)", "frequent (>100)"),
) -> None:
    """Training instances per class, classes sorted by count (log y), coloured by frequency group
    (rare / common / frequent, named ``group_names`` in the legend), with the instance-count bin
    edges drawn and the bins named."""
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    fig, ax = plt.subplots(figsize=(8.0, 3.8), dpi=110)
    ax.bar(
        range(len(order)),
        [max(counts[i], 0.8) for i in order],
        width=1.0,
        color=[GROUP_COLOURS.get(groups[i], "grey") for i in order],
        edgecolor="none",
    )
    ax.set_yscale("log")
    top = max(max(counts), max(edges) if edges else 1) * 2
    ax.set_ylim(0.7, top)
    bounds = [0.7, *edges, top]
    for e in edges:
        ax.axhline(e, color="black", lw=0.8, ls="--")
    for k in range(len(bounds) - 1):
        n = sum(bounds[k] <= max(c, 0.8) < bounds[k + 1] for c in counts)
        mid = (bounds[k] * bounds[k + 1]) ** 0.5
        ax.text(len(order) - 0.5, mid, f"AP{k + 1}: {n} classes", ha="right", va="center", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in GROUP_COLOURS.values()]
    ax.legend(handles, list(group_names), fontsize=8, loc="upper center")
    ax.set(title=title, xlabel="classes, sorted by training instances", ylabel="training instances")
    _save(fig, None, path)


def per_class_scatter(
    path: str | os.PathLike[str],
    counts: Sequence[int],
    series: dict[str, Sequence[float | None]],
    edges: Sequence[float],
    *,
    title: str,
) -> None:
    """Per-class AP (%) against the class's training instances (log x), one marker set per head."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    markers = "o^sDv"
    for k, (name, ys) in enumerate(series.items()):
        pts = [(max(c, 0.8), y) for c, y in zip(counts, ys) if y is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.7, marker=markers[k % 5], label=name)
    for e in edges:
        ax.axvline(e, color="black", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set(title=title, xlabel="training instances of the class", ylabel="AP (%)")
    ax.grid(alpha=0.3)
    _save(fig, ax, path)


def method_scatter(
    path: str | os.PathLike[str],
    points: dict[str, tuple[float, float, float, float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> None:
    """One labelled point per method at ``(x, y)`` with error bars ``(x_err, y_err)`` (e.g. APf against
    APr, mean +- std over seeds): where a method trades head-class AP for tail-class AP."""
    fig, ax = plt.subplots(figsize=(10.0, 5.0), dpi=110)
    colors = plt.get_cmap("tab20").colors  # 20 colours, 9 markers: 21 methods stay apart
    for k, (name, (x, y, dx, dy)) in enumerate(points.items()):
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="os^Dv<>ph"[k % 9], color=colors[k % 20], ms=6, capsize=2, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if points:  # beside the axes: a legend inside would hide the points
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, "no method has both APr and APf", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
