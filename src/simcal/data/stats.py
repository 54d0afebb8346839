"""Per-class statistics of a training split: counts, LVIS frequency groups, instance-count bins.

Counts are always computed from the annotations themselves (LVIS ships ``image_count`` and
``instance_count`` fields, COCO does not, and either may be stale).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from simcal.errors import InputError

#: Inner bin edges on the training instance count (METHOD.md, paper Table 1).
BIN_PRESETS: dict[str, tuple[float, ...]] = {
    "lvis": (10, 100, 1000),
    "coco-lt": (20, 400, 8000),
}


@dataclass(frozen=True)
class CategoryStat:
    """One category's training statistics."""

    id: int
    name: str
    instance_count: int
    image_count: int
    frequency: str  # "r", "c" or "f"
    bin: int  # 0-based index into the instance-count bins

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def declared_bins(dataset: dict[str, Any] | None) -> tuple[float, ...]:
    """The instance-bin edges a training set declares for itself (``info.bins``: a ``synth
    --like`` set, whose counts are LVIS's scaled, so LVIS's bins are scaled too), else LVIS's."""
    edges = ((dataset or {}).get("info") or {}).get("bins")
    if (
        isinstance(edges, list)
        and edges
        and all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0 for e in edges)
        and all(a < b for a, b in zip(edges, edges[1:]))
    ):
        return tuple(float(e) for e in edges)
    return BIN_PRESETS["lvis"]


def parse_bins(spec: str | Sequence[float], option: str = "--bins") -> tuple[float, ...]:
    """Turn ``"lvis"``, ``"coco-lt"`` or ``"E1,E2,E3"`` into increasing inner edges.

    The bins are ``[0, E1), [E1, E2), ..., [Ek, inf)``.
    """
    if isinstance(spec, str):
        if spec in BIN_PRESETS:
            return BIN_PRESETS[spec]
        try:
            edges = tuple(float(x) for x in spec.split(","))
        except ValueError:
            raise InputError(option, "bins", f"expected lvis, coco-lt or E1,E2,...; got {spec!r}") from None
    else:
        edges = tuple(float(x) for x in spec)
    if not edges or any(not math.isfinite(e) or e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise InputError(option, "bins", f"edges must be positive and strictly increasing, got {spec!r}")
    return edges


def bin_index(count: float, edges: Sequence[float]) -> int:
    """0-based bin of a training instance count: bin i holds ``edges[i-1] <= count < edges[i]``."""
    return bisect.bisect_right(list(edges), count)


def bin_labels(edges: Sequence[float]) -> list[str]:
    """Human-readable ranges, e.g. ``['[0, 10)', '[10, 100)', ..., '[1000, inf)']``."""
    bounds = [0.0, *edges, math.inf]
    fmt = lambda v: "inf" if math.isinf(v) else f"{v:g}"  # noqa: E731
    return [f"[{fmt(a)}, {fmt(b)})" for a, b in zip(bounds[:-1], bounds[1:])]


def frequency_of(image_count: int) -> str:
    """LVIS frequency group from a training image count, as METHOD.md pins it.

    rare: fewer than 10 images; common: 10 to 100; frequent: more than 100.
    """
    if image_count < 10:
        return "r"
    if image_count <= 100:
        return "c"
    return "f"


def count_instances(dataset: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """Per category id: ``(instance_count, image_count)`` from the annotations.

    Crowd annotations are counted too (LVIS has none; COCO counts them in its statistics).
    Categories without annotations get ``(0, 0)``.
    """
    instances = {cat["id"]: 0 for cat in dataset["categories"]}
    images: dict[int, set[int]] = {cat["id"]: set() for cat in dataset["categories"]}
    for ann in dataset["annotations"]:
        instances[ann["category_id"]] += 1
        images[ann["category_id"]].add(ann["image_id"])
    return {cid: (instances[cid], len(images[cid])) for cid in instances}


@dataclass(frozen=True)
class TrainingStats:
    """The training statistics the losses are built from, computed once per run (label order, ``(C,)``
    each): instance counts (LR's weights, CM's margins, BAGS's groups) and image counts (the
    federated loss's weights)."""

    instance_counts: list[int]
    image_counts: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.instance_counts)

    @classmethod
    def from_dataset(
        cls, dataset: dict[str, Any], category_ids: Sequence[int], source: str = "<annotations>"
    ) -> TrainingStats:
        """Both counts of every category of ``category_ids`` in one pass (as :func:`class_instance_counts`)."""
        pairs = _per_label(dataset, category_ids, source)
        return cls([n for n, _ in pairs], [n for _, n in pairs])

    @classmethod
    def of(cls, counts: TrainingStats | Sequence[int]) -> TrainingStats:
        """``counts`` itself, or instance counts alone (their image counts taken to be the same)."""
        return counts if isinstance(counts, TrainingStats) else cls(list(counts), list(counts))


def class_instance_counts(
    dataset: dict[str, Any], category_ids: Sequence[int], source: str = "<annotations>"
) -> list[int]:
    """Training instance count per category of ``category_ids``, in that order.

    With a label map's ``category_ids`` this is ``N_j`` for the labels ``1..C`` (length C), the
    counts the remedies, the dual head and the post-hoc calibrations read. An id the dataset
    (read from ``source``) has no category for is an :class:`InputError`: the label map and the
    annotations are from different datasets.
    """
    return [n for n, _ in _per_label(dataset, category_ids, source)]


def class_image_counts(
    dataset: dict[str, Any], category_ids: Sequence[int], source: str = "<annotations>"
) -> list[int]:
    """Training image count per category of ``category_ids`` (the federated loss's weights), as
    :func:`class_instance_counts`."""
    return [n for _, n in _per_label(dataset, category_ids, source)]


def _per_label(dataset: dict[str, Any], category_ids: Sequence[int], source: str) -> list[tuple[int, int]]:
    counts = count_instances(dataset)
    missing = [cid for cid in category_ids if cid not in counts]
    if missing:
        raise InputError(
            source,
            "categories",
            f"no category with id {missing[0]} ({len(missing)} of the label map's {len(category_ids)} ids are "
            "missing): the run's label_map.json and these annotations are from different datasets",
        )
    return [counts[cid] for cid in category_ids]


def category_stats(train: dict[str, Any], edges: Sequence[float] = BIN_PRESETS["lvis"]) -> list[CategoryStat]:
    """Statistics of every category of a training split, ordered by category id.

    The frequency group is the json's ``frequency`` field when the category has one (LVIS),
    else computed from the image count.
    """
    counts = count_instances(train)
    out = []
    for cat in sorted(train["categories"], key=lambda c: c["id"]):
        n_inst, n_img = counts[cat["id"]]
        out.append(
            CategoryStat(
                id=cat["id"],
                name=cat.get("name", str(cat["id"])),
                instance_count=n_inst,
                image_count=n_img,
                frequency=cat.get("frequency") or frequency_of(n_img),
                bin=bin_index(n_inst, edges),
            )
        )
    return out


def stats_from_fields(
    dataset: dict[str, Any], source: str, edges: Sequence[float] = BIN_PRESETS["lvis"]
) -> list[CategoryStat]:
    """Statistics from the categories' own ``instance_count`` / ``image_count`` / ``frequency``.

    This is how an LVIS *val* json carries the training statistics. Raises :class:`InputError`
    when a category lacks ``instance_count``, or has neither ``frequency`` nor ``image_count``.
    """
    out = []
    for i, cat in enumerate(sorted(dataset["categories"], key=lambda c: c["id"])):
        if "instance_count" not in cat:
            raise InputError(
                source,
                f"categories[{i}].instance_count",
                "missing: give the training annotations with --train to compute the counts",
            )
        if not cat.get("frequency") and "image_count" not in cat:
            raise InputError(
                source,
                f"categories[{i}].frequency",
                "missing, and no image_count to derive it from: give the training annotations with --train",
            )
        n_img = cat.get("image_count", 0)
        out.append(
            CategoryStat(
                id=cat["id"],
                name=cat.get("name", str(cat["id"])),
                instance_count=cat["instance_count"],
                image_count=n_img,
                frequency=cat.get("frequency") or frequency_of(n_img),
                bin=bin_index(cat["instance_count"], edges),
            )
        )
    return out
