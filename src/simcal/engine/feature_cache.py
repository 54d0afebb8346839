"""Calibration's cache of the frozen detector: the backbone + RPN outputs of an (image, flip) never
change while the head calibrates, so :class:`FrozenDetector` keeps them (``calibration.cache_mb``),
planned by the known schedule (each kept until its last use, Belady eviction); an image drawn again
costs only RoIAlign and the head."""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from simcal.data.dataset import DetectionDataset
from simcal.modeling.detector import proposal_counts, training_proposal_counts

Key = tuple[int, bool]  # (image index, horizontal flip)


class FrozenDetector:
    """The frozen backbone + RPN of a trained detector, per (image, flip), with a cache.

    ``fetch(keys)`` returns, per ``(index, flip)``, ``(features {level: (1, C, h, w)}, proposals
    (P, 4), gt_boxes (N, 4), gt_labels (N,), image_size (h, w))`` in the model's resized frame. Proposals
    use the RPN's TRAINING counts although the model is in eval mode. Features are stored contiguous
    (NCHW), the layout RoIAlign reads, so a channels_last model does not pay a copy per RoIAlign call.

    Misses are computed ``miss_batch`` same-size images at a time, and a lone miss together with a
    copy of itself: a convolution over one image takes another code path (and rounding) than over
    several, while for two or more images each image's result does not depend on the others or on
    their number (oneDNN; a test checks it), so features are the same whatever missed together,
    with or without the cache, resumed or not. Batched misses cost ~35 % less per image on this
    CPU. ``miss_batch=1`` computes one image at a time (equally reproducible, slower).

    The cache holds at most ``cache_mb`` MiB. With ``schedule`` (the keys of every calibration step,
    known in advance because every draw is a pure function of (seed, step)) it knows the future:
    an output is kept only while a later step uses it (dropped after its last use), and when the
    cache is full the output used farthest in the future is evicted, or the new one is not stored
    if it is used later still (Belady's optimal policy: fewest recomputations for the memory).
    Without a schedule, or for keys outside it: least recently used.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: DetectionDataset,
        cache_mb: int,
        device: torch.device,
        schedule: list[list[Key]] | None = None,
        miss_batch: int = 16,
    ) -> None:
        self.model, self.dataset, self.device = model, dataset, device
        self.miss_batch = max(1, miss_batch)
        self.cache: OrderedDict[Key, tuple[Any, ...]] = OrderedDict()
        self.cache_bytes, self.limit = 0, cache_mb * 2**20
        self.hits = self.misses = 0
        self._uses: dict[Key, list[int]] = {}  # the planned steps that use each key, ascending (past ones dropped)
        self._expire: dict[int, list[Key]] = {}  # step -> keys whose last planned use is that step
        for step, keys in enumerate(schedule or []):
            self.plan(step, keys)
        self._proposal_counts = training_proposal_counts(model)  # the RPN runs in eval mode with these

    def plan(self, step: int, keys: list[Key]) -> None:
        """Add step ``step``'s keys to the plan (steps are planned in increasing order, a window
        ahead of the loop: :class:`CalibrationSchedule`). A key used again later than its last
        planned use keeps its output until then."""
        for key in keys:
            uses = self._uses.setdefault(key, [])
            if not uses or uses[-1] != step:
                uses.append(step)
                self._expire.setdefault(step, []).append(key)

    def _size(self, item: tuple[Any, ...]) -> int:
        return sum(t.numel() * t.element_size() for t in item[0].values()) + item[1].numel() * 4

    def next_use(self, key: Key, step: int) -> float:
        """The first step after ``step`` that uses ``key`` in the schedule (``inf``: none)."""
        uses = self._uses.get(key)
        if not uses:
            return float("inf")
        i = bisect.bisect_right(uses, step)
        return uses[i] if i < len(uses) else float("inf")

    @torch.inference_mode()
    def _compute(self, keys: list[Key]) -> list[tuple[Any, ...]]:
        """Backbone + RPN of several (image, flip) in one batch (callers group keys by image size,
        so the batch needs no extra padding). With ``miss_batch > 1`` a single key is computed
        in a batch of two copies of itself, so that every key takes the batched code path."""
        images, targets = [], []
        for index, flip in keys:
            image, target = self.dataset[(index, flip)]
            images.append(image.to(self.device))
            targets.append({"boxes": target["boxes"].to(self.device), "labels": target["labels"].to(self.device)})
        if len(keys) == 1 and self.miss_batch > 1:  # the pair reuses the loaded image, not a second read
            images, targets = images * 2, targets * 2
        batch, targets = self.model.transform(images, targets)
        feats = self.model.backbone(batch.tensors)
        with proposal_counts(self.model, *self._proposal_counts):
            proposals, _ = self.model.rpn(batch, feats)
        return [
            (
                {k: v[i : i + 1].contiguous() for k, v in feats.items()},
                proposals[i],
                targets[i]["boxes"],
                targets[i]["labels"],
                batch.image_sizes[i],
            )
            for i in range(len(keys))
        ]

    def fetch(self, keys: list[Key], step: int | None = None) -> list[tuple[Any, ...]]:
        """Outputs for each key, computing what the cache lacks (in batches of same-size images).

        ``step``: the schedule step these keys belong to (enables the planned cache; outputs whose
        last use is ``step`` leave the cache afterwards).
        """
        found: dict[Key, tuple[Any, ...] | None] = {}
        missing = []
        for key in keys:
            if key in found:
                self.hits += 1
            elif key in self.cache:
                self.hits += 1
                self.cache.move_to_end(key)
                found[key] = self.cache[key]
            else:
                self.misses += 1
                found[key] = None  # placeholder: computed below
                missing.append(key)
        groups: dict[tuple[int, int], list[Key]] = {}
        for key in missing:
            info = self.dataset.image_info(key[0])
            groups.setdefault((info["height"], info["width"]), []).append(key)
        for group in groups.values():
            for i in range(0, len(group), self.miss_batch):
                chunk = group[i : i + self.miss_batch]
                for key, item in zip(chunk, self._compute(chunk)):
                    found[key] = item
                    if self.limit > 0:
                        self._store(key, item, step)
        if step is not None:
            for key in self._expire.pop(step, []):
                uses = self._uses.get(key)
                if uses and uses[-1] > step:
                    continue  # planned again since: kept until its new last use
                self._uses.pop(key, None)
                old = self.cache.pop(key, None)
                if old is not None:
                    self.cache_bytes -= self._size(old)
            for key in set(keys):  # the plan forgets the past: its memory follows the window, not the run
                uses = self._uses.get(key)
                while uses and uses[0] <= step:
                    uses.pop(0)
        return [found[k] for k in keys]  # type: ignore[misc]

    def _store(self, key: Key, item: tuple[Any, ...], step: int | None) -> None:
        size = self._size(item)
        if step is None or key not in self._uses:  # no plan: least recently used
            self.cache[key] = item
            self.cache_bytes += size
            while self.cache_bytes > self.limit and len(self.cache) > 1:
                _, old = self.cache.popitem(last=False)
                self.cache_bytes -= self._size(old)
            return
        mine = self.next_use(key, step)
        if mine == float("inf"):
            return  # never used again
        while self.cache_bytes + size > self.limit and self.cache:
            far_use, far = max((self.next_use(k, step), k) for k in self.cache)
            if far_use <= mine:
                return  # the new output is the one needed last: do not store it
            self.cache_bytes -= self._size(self.cache.pop(far))
        if self.cache_bytes + size <= self.limit:
            self.cache[key] = item
            self.cache_bytes += size
