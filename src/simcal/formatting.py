"""The one way simcal shows a fraction as a percentage (torch-free, imports nothing of simcal).

Every table (the evaluator's summary, the demo's and the leaderboard's rows, the report, the
diagnostics) formats through :func:`pct`, so a number reads the same wherever it is printed.
"""

from __future__ import annotations


def pct(value: float | None, width: int = 0, signed: bool = False) -> str:
    """``value`` (a fraction) in percent with one decimal, right-aligned in ``width`` characters;
    ``"-"`` (aligned the same) when there is none. ``signed``: always a sign (``+1.5``)."""
    if value is None:
        return f"{'-':>{width}}" if width else "-"
    spec = f"{'+' if signed else ''}{width if width else ''}.1f"
    return format(100 * value, spec)
