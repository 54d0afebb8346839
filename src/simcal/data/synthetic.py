"""A deterministic synthetic long-tail instance-segmentation set: PNG images plus LVIS json.

A stand-in for LVIS that a small Mask R-CNN trained from scratch on a CPU can learn in minutes
(see ``shared/reference/CPU-FACTS.md``), with a long tail steep enough that the tail classes
suffer, as in the paper.

**Classes.** Class ``k`` (category id ``k + 1``) is shape ``SHAPES[k % 8]`` in hue
``k // 8`` of ``ceil(classes / 8)`` hues evenly spaced on the colour wheel (hue ``h`` sits at
``360 * h / n_hues`` degrees). Names read ``hue03_circle``. Neighbouring hues and similar shapes
(pentagon / hexagon / circle, square / diamond) are confusable on purpose: every object gets a
hue jitter of up to +-15 % of the hue spacing, random saturation and value, a size and a
rotation jitter, and every image a colour cast (a common hue shift of up to +-10 % of the
spacing and per-channel gains of 0.9-1.1), on a noisy, graded background.

**Objects.** Filled polygons (circles are 32-gons), circumradius 7-24 px at ``size=128``
(14-48 px across; both ends scale with ``size``, the lower one never below 3 px), 1-6 per
image, placed by rejection sampling so that their circumscribed circles keep 2 px apart and
lie inside the image; a full layout that fails is retried with smaller objects and, as a last
resort, laid on a 3 x 2 grid, so placement never fails. Objects never touch, so the polygon is
the exact mask: each object is painted from its own pycocotools rasterisation of the stored
(rounded) polygon, so image pixels, ``segmentation``, ``area`` and ``bbox`` agree exactly.
``bbox`` is the tight box of that rasterised mask (whole pixels), not of the polygon's
vertices: a sharp tip (star, triangle) can poke up to ~1.5 px past the last pixel it covers,
and a box the pixels do not show would only add noise to box regression and box AP.

**Counts.** ``plan_counts`` fixes the training instances per class: ``T = round(3.5 *
train_images)`` instances (3.5 objects per image on average) spread over the classes along a
shifted power law ``n(r) = M * (1 + r / s) ** -a`` in the rank ``r`` (``s = classes / 2``; ``a``
makes the last rank exactly 1; ``M`` is the largest value whose rounded total stays within
``T``; the rounding remainder goes to rank 0). The ranking of classes is a permutation drawn
from ``seed``, so which shape / hue is frequent changes with the seed and frequency is not tied
to a shape or a hue. The planned counts are met exactly: the training split is the multiset of
class labels with those counts, shuffled and cut into ``train_images`` images of 1-6 objects.
``val`` follows the same ranking, ``n_val(r) = max(20, round(q * n(r)))`` with ``q`` chosen so
that it holds about 3.5 objects per image; ``val_balanced`` holds about the same number of
instances of every class (never fewer than 20). Both use ``val_images`` images.

**Like LVIS v1** (``like="lvis_v1"``, ``simcal synth --like lvis_v1``). 1,203 classes, class
``k`` standing for LVIS v1 category ``k + 1`` (its training statistics ship as package data,
``lvis_v1_category_counts.json``). Training counts are LVIS's scaled to ``round(3.5 *
train_images)`` by a power, ``max(1, round(n ** g))`` (:func:`plan_like_counts`): the order of the
classes holds and they fall into the bins with edges ``10 ** g, 100 ** g, 1000 ** g`` as LVIS's
classes fall into [0, 10) / [10, 100) / [100, 1000) / [1000, inf) (200 / 412 / 334 / 257); the edges
are in the json's ``info.bins`` (:func:`simcal.data.stats.declared_bins`: predict, the analyses
and ``evaluate --bins auto`` use them). Measured bins: 231 / 366 / 345 / 261 at
3,000 training images (rounding merges counts near the edges at this size), exactly LVIS's at
10,000, 189 / 424 / 333 / 257 at 30,000, exactly at 100,000; from LVIS's own total (about 363,000
images at 3.5 objects each) up the scale is linear. Categories keep their LVIS ``frequency``, so
r / c / f are 337 / 461 / 405 at any size (``image_count`` / ``instance_count`` are this set's,
as always). Looks: 8 shapes x 16 hues x 10 fill patterns (:data:`PATTERNS`, darker parts of the
object: stripes three ways, checks, ring, disc, dots, grid, halves). ``val_floor`` (default 20)
sets the least val instances per class: at 1,203 classes a floor of 20 needs 4,010 val images.
Measured (same CPU): ``--like lvis_v1 --train-images 10000 --val-images 4010`` at 128 px writes
18,020 images (35,000 + 2 x 24,060 instances) in 3.6 min, 486 MB, peak 0.9 GB; train.json is
72 MB because every image lists its ~1,200 absent classes in ``neg_category_ids`` (exhaustive,
as for every synthetic set; LVIS's own negative lists are short).

**LVIS fields.** Categories carry the *training* ``image_count`` / ``instance_count`` (in every
split's json, the LVIS convention) and ``frequency`` from :func:`simcal.data.stats.frequency_of`
on the training image count. The data is exhaustively annotated: every image lists all absent
categories in ``neg_category_ids`` and none in ``not_exhaustive_category_ids``.

**Determinism.** Every random draw comes from a ``numpy.random.SeedSequence(seed)`` stream keyed
by purpose: the ranking, each split's label layout, and each image (so an image depends only on
``seed``, its split and its index). The same arguments give byte-identical json and PNG files
(with the same numpy, pycocotools, Pillow and zlib); another seed gives other data.

**Default set** (``classes=80, train_images=3000, val_images=600, size=128, seed=0``), measured
on the 2-core development CPU, one process, with or without progress bars: 4,200 images and
14,700 instances in 17 s, 82 MB on disk (78 MB of PNG at ~19 KB each, 5.7 MB of json).
train: 3,000 images / 10,500 instances, 1 to 1,381 instances per class (8 classes with a single
one); frequency groups from the training image counts r 35, c 25, f 20. val: 600 images / 2,100
instances (20 to 125 per class: at 3.5 objects per image the floor of 20 takes 1,600 of them, so
below the top ~13 classes val is flat at the floor; raise ``val_images`` for a longer val tail).
val_balanced: 600 images / 2,100 instances, 26 or 27 per class. Most of the time goes to PNG
encoding (``compress_level=3``) and drawing.
"""

from __future__ import annotations

import colorsys
import json
import math
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from simcal import choices
from simcal.data.annotations import validate_dataset
from simcal.data.stats import BIN_PRESETS, count_instances, frequency_of
from simcal.io import write_json

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_TRAIN_IMAGES",
    "DEFAULT_VAL_IMAGES",
    "MASK_FORMATS",
    "MAX_OBJECTS",
    "MEAN_OBJECTS",
    "SHAPES",
    "PATTERNS",
    "SPLITS",
    "VAL_FLOOR",
    "category_names",
    "class_look",
    "generate_synthetic",
    "like_statistics",
    "plan_like_counts",
    "plan_balanced_counts",
    "plan_counts",
    "plan_val_counts",
]

DEFAULT_CLASSES = choices.SYNTH_CLASSES  # 80
DEFAULT_TRAIN_IMAGES = choices.SYNTH_TRAIN_IMAGES  # 3000
DEFAULT_VAL_IMAGES = choices.SYNTH_VAL_IMAGES  # 600
DEFAULT_SIZE = choices.SYNTH_SIZE  # 128 px

#: Objects per image: 1 to MAX_OBJECTS, MEAN_OBJECTS on average.
MAX_OBJECTS = 6
MEAN_OBJECTS = 3.5
#: Least instances of every class in ``val`` and ``val_balanced``.
VAL_FLOOR = 20
SPLITS = ("train", "val", "val_balanced")
MASK_FORMATS = choices.MASK_FORMATS

#: Relative position of the power law's knee (``s = classes * _KNEE``), see the module docstring.
_KNEE = 0.5
_HUE_JITTER = 0.15  # of the hue spacing, per object
_HUE_CAST = 0.10  # of the hue spacing, per image
_ROTATION_JITTER = 15.0  # degrees
_MARGIN = 2.0  # px between the circumscribed circles of two objects
_PNG_OPTIONS = {"format": "PNG", "compress_level": 3, "optimize": False}
#: ``image_format`` -> (file suffix, Pillow save options); JPEG at quality 90, as datasets ship
_IMAGE_FORMATS = {"png": (".png", _PNG_OPTIONS), "jpg": (".jpg", {"format": "JPEG", "quality": 90})}
# SeedSequence spawn keys: (_STREAM_RANKING,) for the ranking, (split, 0) for a split's layout,
# (split, 1, i) for image i of a split (split = 1 + index in SPLITS).
_STREAM_RANKING = 0


def _regular(n: int, phase: float) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    pts = np.array(
        [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)],
        dtype=np.float64,
    )
    return pts / math.hypot(1.0, w)


#: Unit shapes (circumradius 1, image axes: y points down), in class order.
SHAPES: dict[str, np.ndarray] = {
    "square": _regular(4, np.pi / 4),
    "circle": _regular(32, 0.0),
    "triangle": _regular(3, -np.pi / 2),
    "diamond": np.array([(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]),
    "pentagon": _regular(5, -np.pi / 2),
    "hexagon": _regular(6, 0.0),
    "star": _star(),
    "cross": _cross(),
}
_SHAPE_NAMES = tuple(SHAPES)

#: Fill patterns, a third class attribute for sets of more classes than 8 shapes x a few hues can
#: tell apart (``--like lvis_v1``: 1,203 classes = 8 shapes x 16 hues x 10 patterns, 77 unused).
#: A pattern darkens part of the object (value x 0.45) in a layout fixed to the object's own
#: frame: stripes and checks of period ``~ r / 2``, a ring, a centre disc, dots, a cross.
PATTERNS = ("solid", "hstripes", "vstripes", "dstripes", "checks", "ring", "disc", "dots", "grid", "halves")
_PATTERN_SHADE = 0.45


def _pattern_mask(pattern: str, mask: np.ndarray, centre: np.ndarray, radius: float, rotation: float) -> np.ndarray:
    """The pixels of ``mask`` (H x W bool) that ``pattern`` darkens, in the object's frame
    (``centre`` (x, y), circumradius ``radius``, ``rotation`` in radians)."""
    if pattern == "solid":
        return np.zeros_like(mask)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    c, s = math.cos(rotation), math.sin(rotation)
    u = ((xx - centre[0]) * c + (yy - centre[1]) * s) / radius  # object frame, in radii
    v = (-(xx - centre[0]) * s + (yy - centre[1]) * c) / radius
    period = 0.5  # of the radius: about 4 stripes across the object
    band = lambda t: np.floor(t / (period / 2)).astype(np.int64) % 2 == 0  # noqa: E731
    r = np.hypot(u, v)
    on = {
        "hstripes": band(v),
        "vstripes": band(u),
        "dstripes": band((u + v) / math.sqrt(2)),
        "checks": band(u) ^ band(v),
        "ring": r > 0.6,
        "disc": r < 0.45,
        "dots": (np.hypot((u % 0.5) - 0.25, (v % 0.5) - 0.25) < 0.12),
        "grid": (np.abs((u % 0.5) - 0.25) > 0.17) | (np.abs((v % 0.5) - 0.25) > 0.17),
        "halves": u < 0,
    }[pattern]
    return mask & on


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_train(classes: Any, train_images: Any, seed: Any) -> tuple[int, int, int]:
    classes = _check_int("classes", classes, 2)
    train_images = _check_int("train_images", train_images, 1)
    seed = _check_int("seed", seed, 0)
    if classes > MAX_OBJECTS * train_images:
        raise ValueError(
            f"train_images={train_images} is too few for classes={classes}: every class needs "
            f"at least one training instance and an image holds at most {MAX_OBJECTS} objects, "
            f"so train_images must be >= {math.ceil(classes / MAX_OBJECTS)}"
        )
    return classes, train_images, seed


def _check_val(classes: int, val_images: Any, floor: int = VAL_FLOOR) -> int:
    val_images = _check_int("val_images", val_images, 1)
    need = math.ceil(floor * classes / MAX_OBJECTS)
    if val_images < need:
        raise ValueError(
            f"val_images={val_images} is too few for classes={classes}: the val splits hold at "
            f"least {floor} instances of every class and at most {MAX_OBJECTS} objects per "
            f"image, so val_images must be >= {need}"
        )
    return val_images


def _total(images: int) -> int:
    return int(math.floor(MEAN_OBJECTS * images + 0.5))


# ----------------------------------------------------------------------------------------------
# count planning (pure, no drawing)


def _curve(peak: float, classes: int) -> np.ndarray:
    """Rounded counts along the rank for a given peak: power law ending at exactly 1."""
    s = _KNEE * classes
    ranks = np.arange(classes, dtype=np.float64)
    a = math.log(peak) / math.log1p((classes - 1) / s)
    return np.maximum(1, np.rint(peak * (1.0 + ranks / s) ** -a)).astype(np.int64)


def _ranking(classes: int, seed: int) -> np.ndarray:
    """Class index at each rank (rank 0 is the most frequent), drawn from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_RANKING,)))
    return rng.permutation(classes)


def plan_counts(classes: int, train_images: int, seed: int = 0) -> list[int]:
    """Training instances per class, indexed by class (category id - 1).

    A shifted power law over a seed-drawn ranking of the classes, totalling
    ``round(3.5 * train_images)`` instances (or ``classes`` when that is larger, every class
    having at least one); see the module docstring. :func:`generate_synthetic` meets these
    counts exactly.

    Raises:
        ValueError: on invalid arguments, or when ``classes > 6 * train_images``.
    """
    classes, train_images, seed = _check_train(classes, train_images, seed)
    total = _total(train_images)
    if total <= classes:
        curve = np.ones(classes, dtype=np.int64)
    else:
        lo, hi = 1.0, float(total)  # _curve(lo) sums to `classes` < total, _curve(hi) >= total
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            if int(_curve(mid, classes).sum()) <= total:
                lo = mid
            else:
                hi = mid
        curve = _curve(lo, classes)
        curve[0] += total - int(curve.sum())
    counts = np.empty(classes, dtype=np.int64)
    counts[_ranking(classes, seed)] = curve
    return [int(c) for c in counts]


def like_statistics(like: str) -> list[dict[str, Any]]:
    """The per-class training statistics a ``--like`` set follows (package data), by category id:
    ``{id, name, frequency, image_count, instance_count}``."""
    if like not in choices.SYNTH_LIKE:
        raise ValueError(f"like must be one of {', '.join(choices.SYNTH_LIKE)}, got {like!r}")
    path = resources.files("simcal.data").joinpath(f"{like}_category_counts.json")
    return sorted(json.loads(path.read_text(encoding="utf-8")), key=lambda c: c["id"])


def plan_like_counts(like: str, train_images: int) -> tuple[list[int], float, float]:
    """Training instances per class that follow a real dataset's (``like_statistics``), scaled to
    ``round(3.5 * train_images)`` instances by a power: ``n'_c = max(1, round(q * n_c ** g))``.

    Below the real total, ``q = 1`` and ``g`` in (0, 1] is the largest exponent whose total stays
    within budget: the order of the classes is kept and a class with one instance keeps one, so
    the classes fall into the bins with edges ``q * e ** g`` (:func:`like_bins`) as they fall into
    the real bins with edges ``e``; at or above the real total, ``g = 1`` and ``q >= 1`` scales
    linearly. The rounding remainder goes to the most frequent class. Class ``k`` stands for the
    dataset's ``k``-th category by id. Returns the counts, ``q`` and ``g``.

    Raises:
        ValueError: when ``train_images`` cannot hold one instance of every class.
    """
    real = np.array([c["instance_count"] for c in like_statistics(like)], dtype=np.float64)
    _check_train(len(real), train_images, 0)
    total = _total(train_images)

    def counts(q: float, g: float) -> np.ndarray:
        return np.maximum(1, np.rint(q * real**g)).astype(np.int64)

    q, g = 1.0, 1.0
    if int(counts(1.0, 1.0).sum()) > total:
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            if int(counts(1.0, mid).sum()) <= total:
                lo = mid
            else:
                hi = mid
        g = lo
    else:
        lo, hi = 1.0, float(total)
        for _ in range(100):
            mid = (lo + hi) / 2
            if int(counts(mid, 1.0).sum()) <= total:
                lo = mid
            else:
                hi = mid
        q = lo
    out = counts(q, g)
    out[int(np.argmax(real))] += max(0, total - int(out.sum()))
    return [int(c) for c in out], q, g


def plan_val_counts(train_counts: Sequence[int], val_images: int, floor: int = VAL_FLOOR) -> list[int]:
    """Long-tailed ``val`` instances per class: the training counts scaled, floored at ``floor`` (20).

    The scale is the largest that keeps the total within ``round(3.5 * val_images)``; the
    rounding remainder goes to the most frequent class, so the ranking is the training one.
    When the floor alone exceeds that total, every class gets exactly 20.

    Raises:
        ValueError: when ``val_images`` cannot hold 20 instances of every class.
    """
    train = np.asarray(train_counts, dtype=np.int64)
    floor = _check_int("val_floor", floor, 1)
    val_images = _check_val(len(train), val_images, floor)
    total = _total(val_images)

    def scaled(q: float) -> np.ndarray:
        return np.maximum(floor, np.rint(q * train)).astype(np.int64)

    counts = scaled(0.0)
    if int(counts.sum()) < total:
        lo, hi = 0.0, float(total)
        for _ in range(100):
            mid = (lo + hi) / 2
            if int(scaled(mid).sum()) <= total:
                lo = mid
            else:
                hi = mid
        counts = scaled(lo)
        counts[int(np.argmax(train))] += total - int(counts.sum())
    return [int(c) for c in counts]


def plan_balanced_counts(classes: int, val_images: int, seed: int = 0, floor: int = VAL_FLOOR) -> list[int]:
    """``val_balanced`` instances per class: equal up to one, never below ``floor`` (20).

    ``max(floor * classes, round(3.5 * val_images))`` instances; the remainder of the even split
    goes, one each, to classes drawn from ``seed``.

    Raises:
        ValueError: on invalid arguments or when ``val_images`` cannot hold 20 per class.
    """
    classes = _check_int("classes", classes, 2)
    seed = _check_int("seed", seed, 0)
    floor = _check_int("val_floor", floor, 1)
    val_images = _check_val(classes, val_images, floor)
    total = max(floor * classes, _total(val_images))
    counts = np.full(classes, total // classes, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(len(SPLITS) + 1, 0)))
    counts[rng.choice(classes, total % classes, replace=False)] += 1
    return [int(c) for c in counts]


def category_names(classes: int, patterns: int = 1) -> list[str]:
    """Readable unique names in class order, e.g. ``hue00_square``, ``hue00_circle``, ... (with
    ``patterns`` > 1: ``hue00_square_solid``, ..., ``hue00_square_hstripes``, ...); see
    :func:`class_look`."""
    classes = _check_int("classes", classes, 1)
    n_hues = math.ceil(classes / (len(SHAPES) * patterns))
    width = max(2, len(str(n_hues - 1)))
    names = []
    for k in range(classes):
        shape, hue, pattern = class_look(k, patterns)
        suffix = f"_{PATTERNS[pattern]}" if patterns > 1 else ""
        names.append(f"hue{hue:0{width}d}_{_SHAPE_NAMES[shape]}{suffix}")
    return names


def class_look(label: int, patterns: int = 1) -> tuple[int, int, int]:
    """``(shape, hue, pattern)`` indices of class ``label``: the shape varies fastest, then the
    pattern, then the hue (with one pattern: shape ``label % 8``, hue ``label // 8``)."""
    n_shapes = len(SHAPES)
    return label % n_shapes, label // (n_shapes * patterns), (label // n_shapes) % patterns


# ----------------------------------------------------------------------------------------------
# layout and drawing


def _image_sizes(total: int, images: int, rng: np.random.Generator) -> np.ndarray:
    """Objects per image: ``images`` values in [1, MAX_OBJECTS] summing to ``total``."""
    sizes = rng.integers(1, MAX_OBJECTS + 1, size=images)
    diff = total - int(sizes.sum())
    while diff:
        step = 1 if diff > 0 else -1
        movable = np.flatnonzero(sizes < MAX_OBJECTS if step > 0 else sizes > 1)
        pick = rng.choice(movable, size=min(abs(diff), movable.size), replace=False)
        sizes[pick] += step
        diff -= step * pick.size
    return sizes


def _split_labels(counts: Sequence[int], images: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The label multiset with the given per-class counts, shuffled and cut into ``images``."""
    multiset = np.repeat(np.arange(len(counts)), np.asarray(counts, dtype=np.int64))
    rng.shuffle(multiset)
    sizes = _image_sizes(int(multiset.size), images, rng)
    return np.split(multiset, np.cumsum(sizes)[:-1])


def _place(radii: np.ndarray, size: int, rng: np.random.Generator, tries: int = 64) -> np.ndarray | None:
    """Centres for circles of ``radii`` (largest first), apart and inside; None on failure."""
    centres = np.zeros((len(radii), 2))
    for i, r in enumerate(radii):
        lo, hi = r + 1.0, size - 1.0 - r
        cand = lo + (hi - lo) * rng.random((tries, 2))
        if i:
            d = np.linalg.norm(cand[:, None, :] - centres[None, :i, :], axis=2)
            ok = np.all(d >= radii[None, :i] + r + _MARGIN, axis=1)
            hits = np.flatnonzero(ok)
            if not hits.size:
                return None
            cand = cand[hits]
        centres[i] = cand[0]
    return centres


def _grid(n: int, r_min: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Last-resort layout: up to 6 objects on a 3 x 2 grid of cells, all of one small radius."""
    cw, ch = size / 3, size / 2
    r = min(r_min, cw / 2 - _MARGIN, ch / 2 - _MARGIN)
    cells = [((c + 0.5) * cw, (row + 0.5) * ch) for row in range(2) for c in range(3)]
    return np.full(n, r), np.array(cells[:n], dtype=np.float64)


def _hsv(hue_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg / 360.0) % 1.0, s, v)) * 255.0


def _draw_image(
    labels: np.ndarray, n_hues: int, size: int, rng: np.random.Generator, patterns: int = 1
) -> tuple[np.ndarray, list[list[float]], list[dict[str, Any]]]:
    """One image: uint8 HxWx3 pixels, the polygons and the pycocotools RLEs (labels' order)."""
    n = len(labels)
    spacing = 360.0 / n_hues
    r_min = max(3.0, 7.0 * size / 128)
    r_max = max(r_min, 24.0 * size / 128)

    # background: low-saturation base colour, a linear gradient, coarse noise (added last)
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.8))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    ramp = (xx * np.cos(angle) + yy * np.sin(angle) - 0.5) * rng.uniform(0, 40)
    img = base[None, None, :] + ramp[:, :, None]

    # per-image colour cast
    hue_cast = rng.uniform(-_HUE_CAST, _HUE_CAST) * spacing
    gains = rng.uniform(0.9, 1.1, size=3)

    # object geometry
    radii = np.exp(rng.uniform(math.log(r_min), math.log(r_max), size=n))
    order = np.argsort(-radii, kind="stable")
    centres = None
    for attempt in range(4):
        scaled = np.maximum(r_min, radii[order] * 0.8**attempt)
        placed = _place(scaled, size, rng)
        if placed is not None:
            centres = np.empty((n, 2))
            centres[order] = placed
            radii = np.empty(n)
            radii[order] = scaled
            break
    if centres is None:
        radii, centres = _grid(n, r_min, size)
    rotations = np.deg2rad(rng.uniform(-_ROTATION_JITTER, _ROTATION_JITTER, size=n))

    polygons: list[list[float]] = []
    rles: list[dict[str, Any]] = []
    for i, label in enumerate(labels):
        shape, hue_index, pattern = class_look(int(label), patterns)
        unit = SHAPES[_SHAPE_NAMES[shape]]
        c, s = math.cos(rotations[i]), math.sin(rotations[i])
        pts = unit @ np.array([[c, s], [-s, c]]) * radii[i] + centres[i]
        poly = [round(float(v), 2) for v in pts.reshape(-1)]
        rle = mask_utils.frPyObjects([poly], size, size)[0]
        mask = mask_utils.decode(rle).astype(bool)
        jitter = rng.uniform(-_HUE_JITTER, _HUE_JITTER) * spacing
        hue = hue_index * spacing + hue_cast + jitter
        colour = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        img[mask] = colour
        if pattern:
            img[_pattern_mask(PATTERNS[pattern], mask, centres[i], radii[i], rotations[i])] = colour * _PATTERN_SHADE
        polygons.append(poly)
        rles.append(rle)

    half = (size + 1) // 2
    noise = rng.normal(0.0, 8.0, size=(half, half, 3))
    img = img + np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)[:size, :size]
    img = np.clip(np.rint(img * gains[None, None, :]), 0, 255).astype(np.uint8)
    return img, polygons, rles


def _image_record(
    image_id: int,
    file_name: str,
    labels: np.ndarray,
    polygons: list[list[float]],
    rles: list[dict[str, Any]],
    *,
    classes: int,
    size: int,
    mask_format: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The LVIS image entry and its annotations (without annotation ids)."""
    present = {int(lab) + 1 for lab in labels}
    image = {
        "id": image_id,
        "file_name": file_name,
        "width": size,
        "height": size,
        "neg_category_ids": [c for c in range(1, classes + 1) if c not in present],
        "not_exhaustive_category_ids": [],
    }
    anns = []
    for label, poly, rle in zip(labels, polygons, rles, strict=True):
        if mask_format == "rle":
            segmentation: Any = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = [poly]
        anns.append(
            {
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": float(mask_utils.area(rle)),
                "segmentation": segmentation,
                "iscrowd": 0,
            }
        )
    return image, anns


def _make_split(
    split: str,
    counts: Sequence[int],
    images: int,
    *,
    out: Path,
    size: int,
    seed: int,
    mask_format: str,
    progress: bool,
    patterns: int = 1,
    image_format: str = "png",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draw one split's images to ``out/images/<split>/`` and return its images and annotations."""
    classes = len(counts)
    n_hues = math.ceil(classes / (len(SHAPES) * patterns))
    key = 1 + SPLITS.index(split)
    layout_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, 0)))
    per_image = _split_labels(counts, images, layout_rng)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)

    image_entries: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    bar = tqdm(range(images), desc=f"synthetic {split}", unit="img", disable=not progress)
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation on every call
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        for i in bar:
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, 1, i)))
            pixels, polygons, rles = _draw_image(per_image[i], n_hues, size, rng, patterns)
            suffix, options = _IMAGE_FORMATS[image_format]
            file_name = f"{split}/{i + 1:06d}{suffix}"
            Image.fromarray(pixels).save(out / "images" / file_name, **options)
            image, image_anns = _image_record(
                i + 1,
                file_name,
                per_image[i],
                polygons,
                rles,
                classes=classes,
                size=size,
                mask_format=mask_format,
            )
            image_entries.append(image)
            for ann in image_anns:
                anns.append({"id": len(anns) + 1, **ann})
    return image_entries, anns


# ----------------------------------------------------------------------------------------------
# public entry point


def generate_synthetic(
    out: str | Path,
    *,
    classes: int = DEFAULT_CLASSES,
    train_images: int = DEFAULT_TRAIN_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    mask_format: str = "polygon",
    progress: bool = True,
    like: str | None = None,
    val_floor: int = VAL_FLOOR,
    image_format: str = "png",
) -> dict[str, Any]:
    """Write the synthetic long-tail set under ``out`` and return a summary.

    Writes ``out/train.json``, ``out/val.json``, ``out/val_balanced.json`` (LVIS format, each
    passing :func:`simcal.data.annotations.validate_dataset`) and the PNG images under
    ``out/images/<split>/``; ``file_name`` is relative to ``out/images``. Existing files of the
    same names are overwritten; other files under ``out`` are left alone.

    Args:
        out: output folder (created).
        classes: number of categories, >= 2 (8 shapes x ``ceil(classes / 8)`` hues).
        train_images: training images, >= ``ceil(classes / 6)``.
        val_images: images of ``val`` and of ``val_balanced`` each, >= ``ceil(20 * classes / 6)``.
        size: image width and height in pixels, >= 32.
        seed: non-negative seed; the same arguments give byte-identical files.
        mask_format: ``"polygon"`` (``[[x1, y1, ...]]``) or ``"rle"`` (compressed RLE, str counts).
        progress: show tqdm progress bars.
        like: ``"lvis_v1"``: the classes and training counts follow LVIS v1's (1,203 classes, each
            LVIS category's training instances scaled by :func:`plan_like_counts`; ``classes`` must
            be left at its default or be 1,203); classes are 8 shapes x 16 hues x 10 patterns and
            keep their LVIS category's ``frequency`` (r/c/f), so LVIS's group sizes hold at any size.
        val_floor: least instances of every class in ``val`` and ``val_balanced`` (default 20).
        image_format: ``"png"`` (lossless: pixels, masks and boxes agree exactly) or ``"jpg"``
            (quality 90, as real datasets ship; the decode cost of real data loading).

    Returns:
        ``{"out", "images_dir", "classes", "size", "seed", "mask_format", "splits": {split:
        {"images", "instances", "json"}}, "frequency": {"r", "c", "f"}, "train_instances_per_class":
        {"min", "max"}}``, paths as strings.

    Raises:
        ValueError: on an invalid argument (named in the message).
    """
    real: list[dict[str, Any]] | None = None
    scale: list[float] = []
    patterns = 1
    if like is not None:
        real = like_statistics(like)
        if classes not in (DEFAULT_CLASSES, len(real)):
            raise ValueError(f"like={like} has {len(real)} classes: leave classes unset, got classes={classes}")
        classes, patterns = len(real), len(PATTERNS)
    classes, train_images, seed = _check_train(classes, train_images, seed)
    val_floor = _check_int("val_floor", val_floor, 1)
    val_images = _check_val(classes, val_images, val_floor)
    size = _check_int("size", size, 32)
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
    if image_format not in _IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(_IMAGE_FORMATS)}, got {image_format!r}")
    out = Path(out)

    if like is not None:
        train_counts, *scale = plan_like_counts(like, train_images)
    else:
        train_counts = plan_counts(classes, train_images, seed)
    plans = {
        "train": (train_counts, train_images),
        "val": (plan_val_counts(train_counts, val_images, val_floor), val_images),
        "val_balanced": (plan_balanced_counts(classes, val_images, seed, val_floor), val_images),
    }
    drawn = {
        split: _make_split(
            split,
            counts,
            n,
            out=out,
            size=size,
            seed=seed,
            mask_format=mask_format,
            progress=progress,
            patterns=patterns,
            image_format=image_format,
        )
        for split, (counts, n) in plans.items()
    }

    names = category_names(classes, patterns)
    train_stats = count_instances(
        {"categories": [{"id": k + 1} for k in range(classes)], "annotations": drawn["train"][1]}
    )
    categories = []
    for k, name in enumerate(names):
        n_inst, n_img = train_stats[k + 1]
        categories.append(
            {
                "id": k + 1,
                "name": name,
                "frequency": frequency_of(n_img) if real is None else real[k]["frequency"],
                "image_count": n_img,
                "instance_count": n_inst,
                "synonyms": [],
                "def": "" if real is None else f"stands for {like} category {real[k]['id']} {real[k]['name']}",
            }
        )

    summary_splits: dict[str, dict[str, Any]] = {}
    for split, (image_entries, anns) in drawn.items():
        dataset = {
            "info": {
                "description": f"simcal synthetic long-tail set, split {split}",
                "classes": classes,
                "size": size,
                "seed": seed,
                **({} if like is None else {"like": like, "scale": scale, "bins": like_bins(*scale)}),
            },
            "licenses": [],
            "images": image_entries,
            "annotations": anns,
            "categories": categories,
        }
        path = out / f"{split}.json"
        validate_dataset(dataset, path)
        write_json(path, dataset)
        summary_splits[split] = {
            "images": len(image_entries),
            "instances": len(anns),
            "json": str(path),
        }

    groups = [c["frequency"] for c in categories]
    inst = [c["instance_count"] for c in categories]
    like_info = {}
    if like is not None:
        like_info = {
            "like": like,
            "scale": {"q": scale[0], "g": scale[1]},
            "bins": like_bins(*scale),
            "bin_sizes": bin_sizes(inst, like_bins(*scale)),
            "bin_sizes_at_lvis_edges": bin_sizes(inst, list(BIN_PRESETS["lvis"])),
            "real_bin_sizes": bin_sizes([c["instance_count"] for c in real], list(BIN_PRESETS["lvis"])),
        }
    return {
        "out": str(out),
        "images_dir": str(out / "images"),
        "classes": classes,
        "size": size,
        "seed": seed,
        "mask_format": mask_format,
        "splits": summary_splits,
        "frequency": {g: groups.count(g) for g in ("r", "c", "f")},
        "train_instances_per_class": {"min": min(inst), "max": max(inst)},
        **like_info,
    }


def like_bins(q: float, g: float) -> list[float]:
    """LVIS's instance-bin edges (10, 100, 1000) scaled as a ``--like`` set's counts were
    (``q * e ** g``, :func:`plan_like_counts`): the bins its classes fall into as LVIS's classes fall
    into LVIS's (``--bins E1,E2,E3`` of ``evaluate`` and ``stats``)."""
    return [round(q * e**g, 3) for e in BIN_PRESETS["lvis"]]


def bin_sizes(counts: Sequence[int], edges: Sequence[float]) -> list[int]:
    """How many of ``counts`` fall in each bin ``[0, e1), [e1, e2), ..., [e_last, inf)``."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(counts), side="right")
    return [int(n) for n in np.bincount(index, minlength=len(edges) + 1)]
