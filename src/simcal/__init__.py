"""simcal: long-tail instance segmentation with SimCal calibration and LVIS evaluation."""

__version__ = "0.1.0"
