"""Build COCO-LT, the long-tailed sub-sample of COCO train (METHOD.md "COCO-LT", paper supp. I).

The 80 COCO classes are ranked by training instance count. The top 20 keep every annotation;
the classes ranked 21-40, 41-60 and 61-80 are sub-sampled to a random per-class count drawn
from ``GROUP_RANGES`` = (800, 8000), (80, 800), (8, 80). Unsampled instances are removed from
their images and images left with no annotation are dropped. Only the training split is
rebuilt: the validation json stays the original.

The paper leaves several details open; this module pins them down as follows.

* **Ranking.** By :func:`simcal.data.stats.count_instances` (crowd annotations counted, as
  COCO's own statistics do), descending; ties are broken by the smaller category id first.
  Rank 1 is the largest class. Ranks 1-20 form group 0, 21-40 group 1, 41-60 group 2,
  61-80 group 3.
* **Target count.** Drawn *uniformly* over the integers ``[lo, hi)`` of the group's range
  (``numpy.random.Generator.integers(lo, hi)``), then capped at the class's available count
  (a class with fewer instances than the draw keeps all of them). Uniform rather than
  log-uniform because it matches the authors' json: on COCO train2017 the top 20 classes hold
  568,135 instances, so 666,493 leaves ~98k to ranks 21-80; uniform draws give ~95k +- 8k in
  expectation there, log-uniform draws ~68k.
* **Which instances.** A uniform random subset (without replacement) of the class's
  non-crowd annotations, chosen by a seeded :class:`numpy.random.Generator`.
* **Crowd annotations.** Kept untouched for the top-20 classes. For the sub-sampled classes
  they are dropped: a crowd region is an ignore region for training and evaluation, not a
  usable instance, so it neither counts towards the target nor survives the sub-sampling.
  Every sub-sampled class therefore ends with exactly its target count of instances.
* **Images.** Every image with no annotation left is dropped, including images that had none
  to begin with; every output image has at least one annotation.
* **Output.** A new dict: ``info``, ``licenses`` and any other top-level key are deep copies
  of the input's; ``categories`` is the same list of categories, unchanged and in the same
  order (categories of COCO carry no counts to go stale). Image and annotation ids are
  unchanged and the input order of ``images`` and ``annotations`` is preserved. Kept images,
  annotations and categories are shallow copies: their nested values (``bbox``,
  ``segmentation``) are shared with the input, so treat them as read-only.
* **Randomness.** ``numpy.random.SeedSequence(seed)`` is split into two independent streams,
  one for the 60 target draws (in rank order) and one for the subsets (in rank order), so
  :func:`coco_lt_plan` alone reproduces the targets of :func:`build_coco_lt`. Same input and
  seed give the same output, on any platform numpy's ``PCG64`` supports.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from simcal.data.stats import count_instances
from simcal.errors import InputError

#: Per-class target ranges ``[lo, hi)`` for the classes ranked 21-40, 41-60 and 61-80.
GROUP_RANGES: tuple[tuple[int, int], ...] = ((800, 8000), (80, 800), (8, 80))
#: Classes per group; group 0 (the top 20) is kept untouched.
GROUP_SIZE = 20
#: Number of categories COCO-LT is defined on.
NUM_CATEGORIES = GROUP_SIZE * (1 + len(GROUP_RANGES))


@dataclass(frozen=True)
class PlanEntry:
    """What COCO-LT does to one category.

    Attributes:
        category_id: the COCO category id.
        name: the category name.
        rank: 1-based rank by training instance count (1 = most instances).
        group: 0 for ranks 1-20 (kept), 1-3 for ranks 21-40, 41-60, 61-80 (sub-sampled).
        instance_count: instances in the input, crowd included (what the ranking uses).
        available: instances the sub-sampling can draw from: the non-crowd ones for groups
            1-3, ``instance_count`` for group 0.
        drawn: the random draw from the group's range, ``None`` for group 0.
        target: instances in the output: ``instance_count`` for group 0, else
            ``min(drawn, available)``.
    """

    category_id: int
    name: str
    rank: int
    group: int
    instance_count: int
    available: int
    drawn: int | None
    target: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_input(coco: dict[str, Any], seed: int, source: str) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError("--seed", "seed", f"expected a non-negative integer, got {seed!r}")
    n = len(coco["categories"])
    if n != NUM_CATEGORIES:
        raise InputError(source, "categories", f"COCO-LT needs exactly {NUM_CATEGORIES} categories, got {n}")


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the target draws and for the instance subsets."""
    targets, subsets = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(targets), np.random.default_rng(subsets)


def _plan(coco: dict[str, Any], rng: np.random.Generator) -> list[PlanEntry]:
    counts = count_instances(coco)
    non_crowd = {cid: 0 for cid in counts}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            non_crowd[ann["category_id"]] += 1
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in coco["categories"]}
    ranked = sorted(counts, key=lambda cid: (-counts[cid][0], cid))
    plan = []
    for i, cid in enumerate(ranked):
        group = i // GROUP_SIZE
        n_inst = counts[cid][0]
        if group == 0:
            available, drawn, target = n_inst, None, n_inst
        else:
            lo, hi = GROUP_RANGES[group - 1]
            available = non_crowd[cid]
            drawn = int(rng.integers(lo, hi))
            target = min(drawn, available)
        plan.append(
            PlanEntry(
                category_id=cid,
                name=names[cid],
                rank=i + 1,
                group=group,
                instance_count=n_inst,
                available=available,
                drawn=drawn,
                target=target,
            )
        )
    return plan


def coco_lt_plan(coco: dict[str, Any], *, seed: int = 0, source: str = "<coco>") -> list[PlanEntry]:
    """The COCO-LT plan of a validated COCO train dict, ordered by rank.

    Gives, per category, its rank, group, original count and target count: exactly the
    targets :func:`build_coco_lt` reaches with the same ``seed``.

    Raises:
        InputError: the dataset does not have exactly 80 categories, or ``seed`` is not a
            non-negative integer.
    """
    _check_input(coco, seed, source)
    return _plan(coco, _streams(seed)[0])


def build_coco_lt(coco: dict[str, Any], *, seed: int = 0, source: str = "<coco>") -> dict[str, Any]:
    """Sub-sample a validated COCO train dict into COCO-LT (see the module docstring).

    Args:
        coco: a COCO dataset dict validated by :func:`simcal.data.annotations.load_dataset`
            with exactly 80 categories. It is not modified.
        seed: a non-negative integer; the same seed gives the same output.
        source: the name used in error messages (normally the json's path).

    Returns:
        A new COCO dataset dict with the same ``info``, ``licenses`` and ``categories``, the
        kept annotations and the images that still have at least one, in input order.

    Raises:
        InputError: the dataset does not have exactly 80 categories, or ``seed`` is not a
            non-negative integer.
    """
    _check_input(coco, seed, source)
    target_rng, subset_rng = _streams(seed)
    plan = _plan(coco, target_rng)

    by_cat: dict[int, list[int]] = {entry.category_id: [] for entry in plan}
    for idx, ann in enumerate(coco["annotations"]):
        if not ann.get("iscrowd", 0):
            by_cat[ann["category_id"]].append(idx)

    keep = np.zeros(len(coco["annotations"]), dtype=bool)
    kept_cats = {entry.category_id for entry in plan if entry.group == 0}
    for idx, ann in enumerate(coco["annotations"]):
        if ann["category_id"] in kept_cats:
            keep[idx] = True
    for entry in plan:
        if entry.group == 0:
            continue
        pool = np.asarray(by_cat[entry.category_id], dtype=np.int64)
        chosen = subset_rng.choice(pool.size, size=entry.target, replace=False)
        keep[pool[chosen]] = True

    annotations = [dict(ann) for ann, k in zip(coco["annotations"], keep, strict=True) if k]
    used_images = {ann["image_id"] for ann in annotations}
    images = [dict(img) for img in coco["images"] if img["id"] in used_images]

    out: dict[str, Any] = {}
    for key, value in coco.items():
        if key == "images":
            out[key] = images
        elif key == "annotations":
            out[key] = annotations
        elif key == "categories":
            out[key] = [dict(cat) for cat in value]
        else:
            out[key] = copy.deepcopy(value)
    return out
