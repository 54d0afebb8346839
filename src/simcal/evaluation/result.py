"""What an evaluation gives: :class:`EvalResult` (the metrics of one results file against one
ground truth, its json and its text table), the per-class CSV, and :class:`SettingError` for a
setting out of range (the command line names its flag). Computed by :mod:`simcal.evaluation.lvis_eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simcal.data.stats import bin_labels
from simcal.formatting import pct

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@dataclass
class EvalResult:
    """Metrics of one results file against one ground truth.

    ``metrics`` holds fractions in [0, 1] under flat keys ``AP AP50 AP75 APs APm APl APr APc APf
    AP1 .. APk`` (k = number of bins); a key is ``None`` when no category with ground truth falls
    in its group, bin or size range. ``per_class`` has one row per category of the ground truth.
    """

    iou_type: str
    mode: str  # "lvis" or "coco"
    max_dets: int
    bin_edges: tuple[float, ...]
    metrics: dict[str, float | None]
    per_class: list[dict[str, Any]]
    num_images: int
    num_detections: int  # as given
    num_detections_evaluated: int  # after the guards
    extra: dict[str, Any] = field(default_factory=dict)
    protocol: str = "lvis"  # simcal.choices.PROTOCOLS
    dets_per_class: int | None = None  # AP-fixed / AP-pool: the per-class cap over the dataset
    dilation: float | None = None  # boundary IoU: the band, as a fraction of the image diagonal

    def to_json(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "iou_type": self.iou_type,
            "mode": self.mode,
            "max_dets": self.max_dets,
            "bins": bin_labels(self.bin_edges),
            "bin_edges": list(self.bin_edges),
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "num_detections_evaluated": self.num_detections_evaluated,
            "protocol": self.protocol,
            "dets_per_class": self.dets_per_class,
            **({"dilation": self.dilation} if self.dilation is not None else {}),
            "per_class": self.per_class,
        }

    def table(self) -> str:
        """The metrics in percent as a fixed-width text table, with a legend for the bins."""
        keys = metric_keys(len(self.bin_edges) + 1)
        head = " ".join(f"{k:>6}" for k in keys)
        row = " ".join(pct(self.metrics[k], 6) for k in keys)
        legend = ", ".join(f"AP{i + 1} {lab}" for i, lab in enumerate(bin_labels(self.bin_edges)))
        caps = (
            f"{self.max_dets} dets/img"
            if self.protocol == "lvis"
            else f"no per-image cap, {self.dets_per_class} dets/class"
        )
        if self.dilation is not None:
            caps += f", band {self.dilation:g} x diagonal"
        name = {"lvis": "AP", "fixed": "AP-fixed", "pool": "AP-pool (pooled over each group's classes)"}
        title = (
            f"{self.iou_type} {name[self.protocol]} ({self.mode.upper()} rules, {caps}, "
            f"{self.num_images} images, {self.num_detections_evaluated}/{self.num_detections} detections)"
        )
        return f"{title}\n{head}\n{row}\nbins on training instances: {legend}"


class SettingError(ValueError):
    """An evaluation setting out of its range; ``setting`` names the parameter (``iou``,
    ``dilation``, ``protocol``, ``dets_per_class``), for the command line to name its flag."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting, self.message = setting, message


def metric_keys(num_bins: int) -> list[str]:
    """``AP AP50 AP75 APs APm APl APr APc APf AP1 .. AP<num_bins>``."""
    return [*SUMMARY_KEYS, *(f"AP{i + 1}" for i in range(num_bins))]


def write_per_class_csv(result: EvalResult, path: str) -> None:
    """Per-class AP table as CSV (atomic)."""
    import csv

    from simcal.io import atomic_open

    cols = [
        "id",
        "name",
        "frequency",
        "bin",
        "train_instance_count",
        "train_image_count",
        "eval_instance_count",
        "AP",
        "AP50",
    ]
    with atomic_open(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in result.per_class:
            w.writerow({c: ("" if row[c] is None else row[c]) for c in cols})
