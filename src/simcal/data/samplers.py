"""Seeded, deterministic, distributed-aware index samplers for iteration-based training.

Design: everything is a pure function of ``(seed, epoch)`` or ``(seed, step)``, never of a
hidden RNG state, so a run resumed at any iteration sees exactly the data the uninterrupted run
would have seen, whatever the number of processes.

* :class:`TrainingSampler` and :class:`RepeatFactorSampler` give the GLOBAL list of image
  indices of any epoch (``epoch_indices(epoch)``), from ``numpy.random.default_rng([seed, epoch])``.
* :class:`BatchStream` concatenates epochs 0, 1, 2, ... and cuts the stream into global batches
  of ``global_batch_size`` indices (a batch may straddle two epochs); rank ``r`` of ``W``
  processes takes ``global_batch(it)[r::W]``.
* :class:`BiLevelSampler` is SimCal's class-balanced sampler for calibration: per step,
  ``classes_per_batch`` classes drawn uniformly, one image containing each.

Image indices are positions in ``dataset["images"]`` (the order of
:class:`simcal.data.dataset.DetectionDataset`).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from simcal.seeds import data_order

__all__ = [
    "BatchStream",
    "BiLevelSampler",
    "EpochSampler",
    "RepeatFactorSampler",
    "TrainingSampler",
    "repeat_factors",
]


def _check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_nonneg(value: int, what: str) -> int:
    if int(value) != value or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


# --------------------------------------------------------------------------------------------
# Repeat factors (LVIS / detectron2)
# --------------------------------------------------------------------------------------------


def repeat_factors(dataset: dict[str, Any], t: float = 0.001) -> np.ndarray:
    """Image-level repeat factors of LVIS repeat-factor sampling [Gupta et al. 2019, detectron2].

    ``f_c`` is the fraction of the dataset's images (``len(dataset["images"])``, images without
    annotations included) that contain at least one annotation of category ``c``;
    ``r(c) = max(1, sqrt(t / f_c))``; ``r(I) = max_{c in I} r(c)``, and 1 for an image without
    annotations. All annotations count (crowd ones too, as detectron2 does; LVIS has none);
    annotations of images absent from ``dataset["images"]`` are ignored.

    Args:
        dataset: a COCO / LVIS dict with ``images`` and ``annotations``.
        t: the frequency threshold (paper: 0.001); categories in more than a fraction ``t`` of
            the images are not repeated.

    Returns:
        ``float64`` array ``(num_images,)``, in ``dataset["images"]`` order, every entry ``>= 1``.
    """
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"repeat threshold t must be finite and >= 0, got {t!r}")
    images = dataset["images"]
    position = {img["id"]: i for i, img in enumerate(images)}
    cats_of: list[set[int]] = [set() for _ in images]
    for ann in dataset["annotations"]:
        i = position.get(ann["image_id"])
        if i is not None:
            cats_of[i].add(ann["category_id"])
    image_count: dict[int, int] = {}
    for cats in cats_of:
        for c in cats:
            image_count[c] = image_count.get(c, 0) + 1
    n = len(images)
    cat_factor = {c: max(1.0, math.sqrt(t / (k / n))) for c, k in image_count.items()}
    return np.array([max((cat_factor[c] for c in cats), default=1.0) for cats in cats_of], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Epoch samplers
# --------------------------------------------------------------------------------------------


class EpochSampler(Protocol):
    """What :class:`BatchStream` needs: the global index list of any epoch, and its length."""

    def epoch_indices(self, epoch: int) -> list[int]: ...

    def epoch_length(self, epoch: int) -> int: ...


class TrainingSampler:
    """Every image once per epoch, in a seeded random order (or in order, ``shuffle=False``).

    ``epoch_indices(e)`` is ``numpy.random.default_rng([seed, e]).permutation(num_images)``: a
    function of ``(seed, epoch)`` alone.
    """

    def __init__(self, num_images: int, *, seed: int = 0, shuffle: bool = True) -> None:
        """
        Args:
            num_images: dataset size, ``>= 1``.
            seed: non-negative integer.
            shuffle: permute each epoch; ``False`` gives ``0..num_images-1`` every epoch.
        """
        if int(num_images) != num_images or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        self.num_images = int(num_images)
        self.seed = _check_seed(seed)
        self.shuffle = bool(shuffle)

    def epoch_array(self, epoch: int) -> np.ndarray:
        """:meth:`epoch_indices` as an ``int64`` array ``(num_images,)``."""
        epoch = _check_nonneg(epoch, "epoch")
        if not self.shuffle:
            return np.arange(self.num_images, dtype=np.int64)
        return data_order(self.seed, epoch).permutation(self.num_images)

    def epoch_indices(self, epoch: int) -> list[int]:
        """Global image indices of ``epoch``: a permutation of ``0..num_images-1``."""
        return self.epoch_array(epoch).tolist()

    def epoch_length(self, epoch: int) -> int:
        """``num_images``, whatever the epoch."""
        _check_nonneg(epoch, "epoch")
        return self.num_images


class RepeatFactorSampler:
    """Each image ``i`` repeated about ``factors[i]`` times per epoch, then shuffled.

    Per epoch, with the generator ``numpy.random.default_rng([seed, epoch])``:

    * ``rounding="stochastic"`` (default; LVIS paper, detectron2): image ``i`` appears
      ``floor(r_i) + Bernoulli(r_i - floor(r_i))`` times, so an epoch has ``sum(r)`` images on
      average and its length varies from epoch to epoch;
    * ``rounding="ceil"``: image ``i`` appears ``ceil(r_i)`` times every epoch (the authors'
      code; "+23k images per epoch" on LVIS v0.5 with ``t = 0.001``).

    The repeated list is then permuted with the same generator.
    """

    ROUNDINGS = ("stochastic", "ceil")

    def __init__(self, factors: Sequence[float] | np.ndarray, *, seed: int = 0, rounding: str = "stochastic") -> None:
        """
        Args:
            factors: ``(num_images,)`` repeat factors, finite and ``> 0`` (see
                :func:`repeat_factors`, which gives factors ``>= 1``).
            seed: non-negative integer.
            rounding: ``"stochastic"`` or ``"ceil"``.
        """
        if rounding not in self.ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(self.ROUNDINGS)}, got {rounding!r}")
        r = np.asarray(factors, dtype=np.float64)
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"factors must be a non-empty 1-d sequence, got shape {r.shape}")
        if not (np.isfinite(r).all() and (r > 0).all()):
            raise ValueError("repeat factors must be finite and > 0")
        self.factors = r
        self.seed = _check_seed(seed)
        self.rounding = rounding
        self._floor = np.floor(r).astype(np.int64)
        self._frac = r - self._floor
        self._ceil = np.ceil(r).astype(np.int64)

    @property
    def num_images(self) -> int:
        return int(self.factors.size)

    def _rng_and_counts(self, epoch: int) -> tuple[np.random.Generator, np.ndarray]:
        epoch = _check_nonneg(epoch, "epoch")
        rng = data_order(self.seed, epoch)
        if self.rounding == "ceil":
            return rng, self._ceil
        return rng, self._floor + (rng.random(self.factors.size) < self._frac)

    def repeat_counts(self, epoch: int) -> np.ndarray:
        """``int64`` ``(num_images,)``: how many times each image appears in ``epoch``."""
        return self._rng_and_counts(epoch)[1].astype(np.int64, copy=False)

    def epoch_array(self, epoch: int) -> np.ndarray:
        """:meth:`epoch_indices` as an ``int64`` array."""
        rng, counts = self._rng_and_counts(epoch)
        repeated = np.repeat(np.arange(self.factors.size, dtype=np.int64), counts)
        return rng.permutation(repeated)

    def epoch_indices(self, epoch: int) -> list[int]:
        """Global image indices of ``epoch``, image ``i`` present ``repeat_counts(epoch)[i]`` times."""
        return self.epoch_array(epoch).tolist()

    def epoch_length(self, epoch: int) -> int:
        """``len(epoch_indices(epoch))``, without building the list."""
        return int(self._rng_and_counts(epoch)[1].sum())


# --------------------------------------------------------------------------------------------
# Iteration-based batches
# --------------------------------------------------------------------------------------------


class BatchStream:
    """Global batches of any iteration over the endless concatenation of a sampler's epochs.

    The stream is ``epoch_indices(0) + epoch_indices(1) + ...``; global batch ``it`` is the
    slice ``[it * B, (it + 1) * B)`` of it (``B = global_batch_size``), so a batch may straddle
    two (or, for tiny datasets, more) epochs. Rank ``r`` of ``W`` processes trains on
    ``global_batch(it)[r::W]``.

    Epoch lengths are accumulated lazily (cumulative sums, found by bisection) and the last few
    epoch lists are cached, so increasing iterations cost O(B) amortised; asking for a far
    iteration first (a resume) only computes the earlier epochs' lengths, not their lists.
    """

    def __init__(self, sampler: EpochSampler, global_batch_size: int, *, cache_epochs: int = 4) -> None:
        """
        Args:
            sampler: a :class:`TrainingSampler` or :class:`RepeatFactorSampler` (anything with
                ``epoch_indices(epoch)`` and ``epoch_length(epoch)``).
            global_batch_size: images per iteration over all processes, ``>= 1``.
            cache_epochs: how many epoch lists to keep in memory.
        """
        if int(global_batch_size) != global_batch_size or global_batch_size < 1:
            raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
        self.sampler = sampler
        self.global_batch_size = int(global_batch_size)
        self._cache_size = max(1, int(cache_epochs))
        self._starts: list[int] = [0]  # _starts[e] = stream position of epoch e's first index
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _epoch_array(self, epoch: int) -> np.ndarray:
        arr = self._cache.get(epoch)
        if arr is None:
            get = getattr(self.sampler, "epoch_array", None)
            arr = np.asarray(get(epoch) if get else self.sampler.epoch_indices(epoch), dtype=np.int64)
            self._cache[epoch] = arr
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(epoch)
        return arr

    def _cover(self, position: int) -> None:
        """Extend the epoch starts until the known epochs cover stream ``position``."""
        while self._starts[-1] <= position:
            epoch = len(self._starts) - 1
            self._starts.append(self._starts[-1] + int(self.sampler.epoch_length(epoch)))

    def _epoch_at(self, position: int) -> int:
        self._cover(position)
        return bisect.bisect_right(self._starts, position) - 1

    def epoch_of(self, iteration: int) -> int:
        """The epoch of the first index of global batch ``iteration``."""
        iteration = _check_nonneg(iteration, "iteration")
        return self._epoch_at(iteration * self.global_batch_size)

    def global_batch(self, iteration: int) -> list[int]:
        """The ``global_batch_size`` image indices of ``iteration``, over all processes."""
        iteration = _check_nonneg(iteration, "iteration")
        start = iteration * self.global_batch_size
        stop = start + self.global_batch_size
        self._cover(stop - 1)
        epoch = bisect.bisect_right(self._starts, start) - 1
        parts = []
        pos = start
        while pos < stop:
            e_start, e_stop = self._starts[epoch], self._starts[epoch + 1]
            if e_stop > pos:  # skip empty epochs
                arr = self._epoch_array(epoch)
                take = min(stop, e_stop)
                parts.append(arr[pos - e_start : take - e_start])
                pos = take
            epoch += 1
        return np.concatenate(parts).tolist()

    def shard(self, iteration: int, rank: int, world_size: int) -> list[int]:
        """This process's part of global batch ``iteration``: ``global_batch(iteration)[rank::world_size]``.

        Raises:
            ValueError: ``global_batch_size`` is not divisible by ``world_size``, or ``rank`` is
                outside ``[0, world_size)``.
        """
        _check_rank(rank, world_size)
        if self.global_batch_size % world_size:
            raise ValueError(f"global batch size {self.global_batch_size} is not divisible by world size {world_size}")
        return self.global_batch(iteration)[rank::world_size]


# --------------------------------------------------------------------------------------------
# SimCal bi-level sampling
# --------------------------------------------------------------------------------------------


class BiLevelSampler:
    """SimCal's bi-level class-balanced sampler [paper 4.2, METHOD.md].

    Per step: ``classes_per_batch`` categories drawn uniformly WITH replacement over the
    categories that have non-crowd training instances; for each, one image containing a
    non-crowd instance of it, uniformly (over images, not instances) with replacement. Crowd
    annotations are ignored because :class:`simcal.data.dataset.DetectionDataset` drops them:
    a sampled image must yield foreground RoIs of its sampled class. Everything comes from
    ``numpy.random.default_rng([seed, step])``, so any step can be asked for first.
    """

    def __init__(self, dataset: dict[str, Any], *, classes_per_batch: int = 16, seed: int = 0) -> None:
        """
        Args:
            dataset: the TRAINING dict (``images``, ``annotations``).
            classes_per_batch: classes (= images) per global batch, ``n`` in the paper (16).
            seed: non-negative integer.

        Raises:
            ValueError: no category has a non-crowd annotation on a listed image.
        """
        if int(classes_per_batch) != classes_per_batch or classes_per_batch < 1:
            raise ValueError(f"classes_per_batch must be a positive integer, got {classes_per_batch!r}")
        self.classes_per_batch = int(classes_per_batch)
        self.seed = _check_seed(seed)
        position = {img["id"]: i for i, img in enumerate(dataset["images"])}
        images_of: dict[int, set[int]] = {}
        for ann in dataset["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            i = position.get(ann["image_id"])
            if i is not None:
                images_of.setdefault(ann["category_id"], set()).add(i)
        if not images_of:
            raise ValueError("no category has a (non-crowd) training instance to sample")
        #: category ids that can be drawn, increasing
        self.category_ids: list[int] = sorted(images_of)
        #: per drawable category (same order), the increasing image indices containing it
        self.images_per_class: list[np.ndarray] = [
            np.array(sorted(images_of[c]), dtype=np.int64) for c in self.category_ids
        ]
        self._sizes = np.array([len(a) for a in self.images_per_class], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """How many categories can be drawn."""
        return len(self.category_ids)

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The global batch of ``step``: ``classes_per_batch`` ``(image_index, category_id)`` pairs."""
        step = _check_nonneg(step, "step")
        rng = data_order(self.seed, step)
        cls = rng.integers(0, self.num_classes, size=self.classes_per_batch)
        pick = rng.integers(0, self._sizes[cls])
        return [
            (int(self.images_per_class[k][j]), self.category_ids[k])
            for k, j in zip(cls.tolist(), pick.tolist(), strict=True)
        ]

    def shard(self, step: int, rank: int, world_size: int) -> list[tuple[int, int]]:
        """This process's part of :meth:`batch`: ``batch(step)[rank::world_size]``.

        Shards may differ in size by one when ``classes_per_batch % world_size != 0``.
        """
        _check_rank(rank, world_size)
        return self.batch(step)[rank::world_size]
