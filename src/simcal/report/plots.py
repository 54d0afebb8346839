"""PNG plots of analysis results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(
    path: str | os.PathLike[str],
    x: Sequence[float],
    series: dict[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
    ylabel: str = "AP (%)",
    logx: bool = False,
) -> None:
    """One line per series (``None`` points are skipped); saved as PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys) if b is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grouped_bars(
    path: str | os.PathLike[str],
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str = "AP (%)",
) -> None:
    """Grouped bar chart: one group per x label, one bar per series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if y is None else y for y in ys], width=width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
