"""Calibration's batches: the schedule of draws (SimCal's bi-level class-balanced sampler, or an
image-centric one), generated a window ahead and shared by the torchrun processes slot by slot
(:class:`CalibrationSchedule`, :func:`slot_owners`), and the RoIs of each step kept as METHOD.md
says (:func:`calibration_batches`: the sampled class's foregrounds per image, as many backgrounds
pooled over the batch, 1:1; image-centric: every sampled RoI)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from simcal import seeds as streams
from simcal.config import CalibrationConfig
from simcal.data.dataset import LabelMap
from simcal.data.samplers import BatchStream, BiLevelSampler, RepeatFactorSampler, TrainingSampler, repeat_factors
from simcal.engine import distributed as dist_utils
from simcal.engine.feature_cache import FrozenDetector, Key


@dataclass
class CalibrationBatch:
    """The kept RoIs of one calibration step.

    Attributes:
        pooled: RoI features ``(K, C_fpn, 7, 7)``.
        box_feats: the frozen box head's features ``(K, D)`` (only when asked: the NCM head).
        labels: ``(K,)``, 0 background.
        slot: ``(K,)``, the position in the step's draws of the image each RoI comes from.
        boxes: ``(K, 4)`` xyxy in that image's resized frame.
        total: the RoIs kept in the step over every process (``K`` in one process; under torchrun
            each process holds its slots' share, and the loss is normalised by ``total``).
        fg, bg: the step's kept foreground and background RoIs over every process.
    """

    pooled: Tensor
    box_feats: Tensor | None
    labels: Tensor
    slot: Tensor
    boxes: Tensor
    total: int = 0
    fg: int = 0
    bg: int = 0


def calibration_batches(
    frozen: FrozenDetector,
    draws: list[tuple[int, int | None]],
    flips: list[bool],
    seeds: list[int],
    label_map: LabelMap,
    bg_seed: int,
    step: int | None = None,
    box_feats: bool = False,
    mine: list[int] | None = None,
    stages: int = 1,
) -> list[CalibrationBatch | None]:
    """RoIs of one calibration step, per box stage (an entry is ``None`` when the stage keeps no RoI,
    over every process).

    Args:
        draws: ``(image index, category id)`` per slot (bi-level), or ``(image index, None)``
            (image-centric: every sampled RoI kept, no 1:1 background balancing).
        flips: the horizontal flip of each slot.
        seeds: the RoI sub-sampling seed of each slot.
        bg_seed: the seed that picks which background RoIs of the batch are kept (bi-level);
            stage k uses ``bg_seed + k``.
        step: the step in ``frozen``'s schedule (for its planned cache), if it has one.
        box_feats: also run the frozen box head (only the NCM head needs its features).
        mine: the slots (positions in ``draws``) this process computes (default: all; under
            torchrun :func:`slot_owners` shares them out, and ``draws`` is always the whole global
            batch). The per-slot RoI counts are summed over the processes, so the batch-wide 1:1
            background choice is the one process's: every process draws the same permutation
            over the batch's backgrounds and keeps those of its own slots.
        stages: the detector's box stages (a cascade's 3). Stage 1's RoIs are the sampled ones;
            stage k+1's are stage k's regression of stage k's (the frozen original stage), labelled
            at stage k+1's IoU threshold: each stage's RoIs as that stage saw them in training
            (METHOD.md, "Multi-stage models"). Each stage then keeps its sampled class's
            foregrounds and, over the batch, as many backgrounds.

    ``slot`` in the result is the position in ``draws`` (global), whichever process holds it.
    """
    roi = frozen.model.roi_heads
    mine = list(range(len(draws))) if mine is None else mine
    items = frozen.fetch([(draws[p][0], flips[p]) for p in mine], step=step)
    # per stage: position -> (features, size, fg boxes, fg labels, bg boxes)
    per_stage: list[dict[int, tuple[Any, ...]]] = [{} for _ in range(stages)]
    for p, item in zip(mine, items):
        feats, props, gt_boxes, gt_labels, size = item
        boxes, labels, fg, bg = roi.sample_rois(props, gt_boxes, gt_labels, seeds[p])
        cat_id = draws[p][1]
        wanted = label_map.to_label(cat_id) if cat_id is not None else None
        kept_fg = fg if wanted is None else fg[labels[fg] == wanted]  # object level: only the sampled class
        per_stage[0][p] = (feats, size, boxes[kept_fg], labels[kept_fg], boxes[bg])
        stage_boxes = boxes[torch.cat([fg, bg])]
        for k in range(1, stages):
            with torch.inference_mode():
                _, _, _, deltas = roi.stage_forward(k - 1, feats, [stage_boxes], [size])
                stage_boxes = roi.refine(k - 1, deltas, [stage_boxes], [size])[0]
                lab = roi.stage_targets(k, [stage_boxes], [{"boxes": gt_boxes, "labels": gt_labels}])[0][0]
            is_fg = lab > 0 if wanted is None else lab == wanted
            per_stage[k][p] = (feats, size, stage_boxes[is_fg], lab[is_fg], stage_boxes[lab == 0])
    return [
        _kept_batch(frozen, slots, draws, bg_seed + k, box_feats, k if stages > 1 else None)
        for k, slots in enumerate(per_stage)
    ]


def _kept_batch(
    frozen: FrozenDetector,
    slots: dict[int, tuple[Any, ...]],
    draws: list[tuple[int, int | None]],
    bg_seed: int,
    box_feats: bool,
    stage: int | None,
) -> CalibrationBatch | None:
    """One stage's batch from its slots' foregrounds and backgrounds (see :func:`calibration_batches`)."""
    roi = frozen.model.roi_heads
    counts = torch.zeros(2, len(draws), dtype=torch.long)  # (fg, bg) per slot, summed over processes
    for p, s in slots.items():
        counts[0, p], counts[1, p] = s[2].shape[0], s[4].shape[0]
    counts = dist_utils.all_reduce_sum(counts)
    n_fg, n_bg = int(counts[0].sum()), counts[1]
    if draws and draws[0][1] is not None:  # bi-level: keep as many of the batch's backgrounds as foregrounds
        keep = torch.randperm(int(n_bg.sum()), generator=torch.Generator().manual_seed(bg_seed))[:n_fg]
        owner = torch.repeat_interleave(torch.arange(len(draws)), n_bg)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), n_bg]).cumsum(0)
        kept = keep.sort().values
        for p, (f, size, fb, fl, bb) in slots.items():
            slots[p] = (f, size, fb, fl, bb[(kept[owner[kept] == p] - offsets[p]).to(bb.device)])
        n_kept_bg = min(n_fg, int(n_bg.sum()))
    else:
        n_kept_bg = int(n_bg.sum())
    if n_fg + n_kept_bg == 0:
        return None
    pooled, labels, slot, boxes = [], [], [], []
    with torch.inference_mode():
        for p, (feats, size, fg_boxes, fg_labels, bg_boxes) in slots.items():
            rois = torch.cat([fg_boxes, bg_boxes])
            if rois.shape[0] or not pooled:  # one empty entry keeps the shapes when a process has no RoI
                pooled.append(roi.pool(feats, [rois], [size]))
                labels.append(
                    torch.cat([fg_labels, torch.zeros(bg_boxes.shape[0], dtype=torch.int64, device=fg_labels.device)])
                )
                slot.append(torch.full((rois.shape[0],), p, dtype=torch.int64))
                boxes.append(rois)
        if not pooled:  # this process holds no slot in this step: no RoI, the shapes kept
            channels, size = frozen.model.backbone.out_channels, roi.box_roi_pool.output_size
            pooled = [torch.zeros(0, channels, *size, device=frozen.device)]
            labels = [torch.zeros(0, dtype=torch.int64, device=frozen.device)]
            slot, boxes = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 4, device=frozen.device)]
        pooled_t = torch.cat(pooled)
        box_head = roi.box_head if stage is None else roi.stage_parts(stage)[0]
        feats_t = box_head(pooled_t).clone() if box_feats else None
    # inference tensors cannot enter autograd: clone into normal tensors for the head's training
    return CalibrationBatch(
        pooled_t.clone(),
        feats_t,
        torch.cat(labels).clone(),
        torch.cat(slot),
        torch.cat(boxes),
        total=n_fg + n_kept_bg,
        fg=n_fg,
        bg=n_kept_bg,
    )


def slot_owners(schedule: list[list[Key]], world: int) -> list[list[int]]:
    """The process that computes each slot of each step (``owners[step][slot]``), for ``world``
    processes: balanced (at most ``ceil(slots / world)`` per process and step) and sticky (an
    image goes to the process that computed it before when that one has room), so that each
    process's cache serves its images again as the one process's cache would. A pure function
    of the schedule: every process computes the same table."""
    owner: dict[int, int] = {}
    return [_owners_of_step(keys, world, owner) for keys in schedule]


class CalibrationSchedule:
    """Every step's draws, flips and slot owners, generated a window of steps ahead of the loop.

    Each step's draws and flips are pure functions of (seed, step); the slot owners under
    torchrun (:func:`slot_owners`) carry a sticky table forward from step 0. So the schedule is
    generated lazily, in order: :meth:`step` returns a step's ``(draws, flips, mine)`` and plans
    the frozen detector's cache ``window`` steps ahead; memory follows the window, not the number
    of steps (the whole schedule of a long calibration did not fit in memory).
    """

    def __init__(
        self,
        c: CalibrationConfig,
        train_json: dict[str, Any],
        num_images: int,
        world: int,
        rank: int,
        window: int = 2048,
    ) -> None:
        self.c, self.world, self.rank, self.window = c, world, rank, window
        self._draws_of = _draws_of(c, train_json, num_images)
        self._owner: dict[int, int] = {}  # the sticky owner of each image (slot_owners' table)
        self._next = 0  # the first step not generated yet
        self._ahead: dict[int, tuple[list[tuple[int, int | None]], list[bool], list[int]]] = {}
        self.frozen: FrozenDetector | None = None

    def _generate(self, step: int) -> tuple[list[tuple[int, int | None]], list[bool], list[int]]:
        draws = self._draws_of(step)
        flips = streams.flips(self.c.seed, step, streams.CALIBRATION_FLIP, len(draws), self.c.flip_prob)
        owners = _owners_of_step([(d[0], f) for d, f in zip(draws, flips)], self.world, self._owner)
        return draws, flips, [p for p, r in enumerate(owners) if r == self.rank]

    def skip_to(self, start: int) -> None:
        """Resume at ``start``: the steps before it are generated for the owner table only (one
        process: not at all)."""
        if self.world > 1:
            for step in range(self._next, start):
                self._generate(step)
        self._next = max(self._next, start)

    def step(self, step: int) -> tuple[list[tuple[int, int | None]], list[bool], list[int]]:
        """Step ``step``'s ``(draws, flips, this process's slots)``; the window after it planned."""
        while self._next < min(step + self.window, self.c.steps):
            entry = self._ahead[self._next] = self._generate(self._next)
            if self.frozen is not None:
                draws, flips, mine = entry
                self.frozen.plan(self._next, [(draws[p][0], flips[p]) for p in mine])
            self._next += 1
        return self._ahead.pop(step)


def _owners_of_step(keys: list[Key], world: int, owner: dict[int, int]) -> list[int]:
    """One step of :func:`slot_owners`, its sticky ``owner`` table updated in place."""
    cap = -(-len(keys) // world)
    load = [0] * world
    ranks = [-1] * len(keys)
    for p, (index, _) in enumerate(keys):
        r = owner.get(index)
        if r is not None and load[r] < cap:
            ranks[p] = r
            load[r] += 1
    for p, (index, _) in enumerate(keys):
        if ranks[p] < 0:
            r = min(range(world), key=lambda q: (load[q], q))
            ranks[p] = r
            load[r] += 1
            owner.setdefault(index, r)
    return ranks


def _draws_of(
    c: CalibrationConfig, train_json: dict[str, Any], num_images: int
) -> Callable[[int], list[tuple[int, int | None]]]:
    """A step's draws ``(image index, category id or None)``: a pure function of (seed, step)."""
    if c.sampler == "bilevel":
        bilevel = BiLevelSampler(train_json, classes_per_batch=c.classes_per_batch, seed=c.seed)
        return lambda step: list(bilevel.batch(step))
    base = (
        RepeatFactorSampler(repeat_factors(train_json), seed=c.seed)
        if c.sampler == "repeat_factor"
        else TrainingSampler(num_images, seed=c.seed)
    )
    stream = BatchStream(base, c.classes_per_batch)
    return lambda step: [(int(i), None) for i in stream.global_batch(step)]
