"""simcal: long-tail instance segmentation with SimCal calibration and LVIS evaluation.

The Python API (``simcal.evaluate``, ``simcal.train``, ``simcal.calibrate``, ``simcal.predict``)
is :mod:`simcal.api`, imported on first use so that ``import simcal`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "calibrate", "evaluate", "predict", "train"]


def __getattr__(name: str) -> Any:
    if name in ("calibrate", "evaluate", "predict", "train"):
        from simcal import api

        return getattr(api, name)
    raise AttributeError(f"module 'simcal' has no attribute {name!r}")
