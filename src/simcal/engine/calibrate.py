"""``simcal calibrate``: SimCal's bi-level class-balanced calibration of the classification head.

The trained detector is frozen (every parameter, eval mode); only a new classification head is
trained on its RoI features (METHOD.md, SimCal calibration):

- bi-level sampling: each step draws ``classes_per_batch`` classes uniformly (with replacement)
  over the classes with training instances, and one image containing each;
- proposals from the RPN with the TRAINING proposal counts, ground-truth boxes appended, matched
  at IoU 0.5, RoIs sub-sampled per image as in normal training (the model's own RoI batch and
  positive fraction, seeded per image);
- object level: in each image only the foreground RoIs of its sampled class are kept (other
  classes' foregrounds are dropped, not relabelled background); the batch's background RoIs are
  pooled and as many are kept as there are kept foregrounds (1:1);
- cross-entropy over the kept RoIs; SGD lr 0.01, x0.1 at 8/12 and 11/12 of the steps.

``sampler=random|repeat_factor`` draws images instead of classes and keeps every sampled RoI
(image-centric): with ``loss=lr|focal|cm`` these are the decoupled baselines of Table 4.

torchrun: the slots of each step are shared by the processes (slot ``p`` on rank ``p mod world``),
each with its own cache; the per-slot RoI counts are summed over processes so that the 1:1
background choice is the one process's, the loss of each process is its RoIs' share of the global
mean, and the head's gradients are summed (only the head trains: nothing else is wrapped).

Cost: the frozen part (backbone + RPN) of an (image, flip) never changes, so its outputs are
cached (``cache_mb``; planned by the known schedule: kept until their last use, Belady eviction);
an image drawn again costs only RoIAlign and the head. The frozen box head runs only for ``ncm``.
Deterministic and resumable: every draw is a pure function of (seed, step).
"""

from __future__ import annotations

import bisect
import copy
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from simcal import seeds as streams
from simcal.config import CalibrationConfig, Config, apply_overrides
from simcal.data.annotations import load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap
from simcal.data.samplers import BatchStream, BiLevelSampler, RepeatFactorSampler, TrainingSampler, repeat_factors
from simcal.data.stats import TrainingStats
from simcal.engine import distributed as dist_utils
from simcal.engine.checkpoint import load_model
from simcal.engine.runtime import default_device, setup_torch
from simcal.errors import InputError
from simcal.io import append_line, load_checkpoint, rewrite_lines, save_checkpoint, write_json, writes_run
from simcal.modeling.calibration import (
    CalibratedHead,
    StagedHead,
    build_calibrated_head,
    build_staged_head,
    decoupled_classifier,
    load_head,
    save_head,
)
from simcal.modeling.detector import LongTailMaskRCNN, eval_mode, proposal_counts, training_proposal_counts
from simcal.modeling.losses import build_classification_loss
from simcal.run import CalibrationFiles, Run, calibration_name

#: what ``simcal calibrate`` accepts as ``section.key=value`` overrides
OVERRIDABLE = ("calibration.",)


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


def calibration_batch(
    frozen: FrozenDetector,
    draws: list[tuple[int, int | None]],
    flips: list[bool],
    seeds: list[int],
    label_map: LabelMap,
    bg_seed: int,
    step: int | None = None,
    box_feats: bool = False,
    mine: list[int] | None = None,
) -> CalibrationBatch | None:
    """The RoIs of one calibration step for a one-stage detector (:func:`calibration_batches`'s only batch)."""
    return calibration_batches(frozen, draws, flips, seeds, label_map, bg_seed, step, box_feats, mine)[0]


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


def calibration_config(cfg: Config, overrides: list[str] | None, source: str) -> Config:
    """``cfg`` with ``calibration.*`` overrides applied and validated (the run's config otherwise)."""
    return apply_overrides(cfg, overrides, source, OVERRIDABLE, stored=True) if overrides else cfg


@writes_run
def calibrate(
    run: str | Path,
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
    resume: bool = False,
    snapshot_every: int = 0,
    progress: bool = True,
) -> Path:
    """Calibrate a trained run's classification head; returns ``RUN/calibration/<name>/head.pth``.

    ``overrides``: ``calibration.key=value`` (``calibration.steps=300``, ``calibration.head=ncm``,
    ``calibration.loss_kwargs={gamma: 2}``) on top of the run config's ``calibration`` section.
    ``name``: the folder under ``RUN/calibration`` (default from the settings,
    :func:`simcal.run.calibration_name`). With ``snapshot_every`` K, the head is also saved every K
    steps (for the dynamics analysis).

    Under torchrun each process computes its share of every step's slots (the global batch stays
    ``classes_per_batch``) with its own frozen-feature cache; the head's gradients are summed over
    the processes and rank 0 writes the files.
    """
    _, _, device = dist_utils.init_distributed()
    r = Run(run)
    cfg = calibration_config(r.load_config(), overrides, str(r.config))
    files = r.calibration(name or calibration_name(cfg.calibration))
    if _finished(files, cfg.calibration, resume):
        return files.head
    model, label_map, cfg = load_model(run, cfg=cfg)
    train_json = load_dataset(cfg.data.train_json)
    dataset = DetectionDataset(
        train_json, cfg.data.train_images, label_map=label_map, with_masks=False, source=cfg.data.train_json
    )
    calibrate_head(
        model,
        dataset,
        train_json,
        cfg.calibration,
        files=files,
        resume=resume,
        snapshot_every=snapshot_every,
        progress=progress,
        threads=cfg.train.threads,
        device=device,
    )
    return files.head


#: calibration settings that do not change the head a calibration trains (bookkeeping and caching)
RESUME_SAFE = ("checkpoint_period", "log_period", "cache_mb", "miss_batch")


def _finished(files: CalibrationFiles | None, c: CalibrationConfig, resume: bool) -> bool:
    """Whether ``files`` holds a finished calibration with settings ``c`` (then nothing is to be done).

    A finished head is never trained over: without ``resume`` it is refused, and with other
    settings too (:func:`_check_resume`), pointing at ``--name``.
    """
    if files is None or not files.head.exists():
        return False
    if not resume:
        raise InputError(files.root, "(calibration)", "already done: pass --resume to continue it, or another --name")
    _check_resume(files.head, c, files)
    if dist_utils.is_main():
        print(f"calibration {files.name} is already finished with these settings: nothing to do")
    return True


def _check_resume(path: Path, c: CalibrationConfig, files: CalibrationFiles, stored: Any = None) -> None:
    """Refuse to resume the calibration in ``files`` (its head or checkpoint ``path``, whose
    settings are ``stored``, read from ``path`` when ``None``) with settings other than its own."""
    if stored is None:
        state = load_checkpoint(path)
        stored = (state.get("meta") or {}).get("calibration") if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        return  # written before calibrations recorded their settings
    differs = [
        (k, v, stored.get(k)) for k, v in vars(c).items() if k not in RESUME_SAFE and k in stored and stored[k] != v
    ]
    if differs:
        listed = "; ".join(f"calibration.{k} {new!r} (it has {old!r})" for k, new, old in differs)
        raise InputError(
            path,
            f"calibration.{differs[0][0]}",
            f"calibration {files.name} was made with other settings: {listed}. It is kept as it is: "
            "calibrate with these settings under another --name",
        )


def calibrate_head(
    model: LongTailMaskRCNN,
    dataset: DetectionDataset,
    train_json: dict[str, Any],
    c: CalibrationConfig,
    *,
    files: CalibrationFiles | None = None,
    resume: bool = False,
    snapshot_every: int = 0,
    progress: bool = True,
    threads: int = 0,
    device: torch.device | None = None,
) -> CalibratedHead:
    """SimCal on a trained detector: a calibrated classification head trained on its frozen RoI features.

    Args:
        model: the trained detector; frozen (eval mode, no gradients) during the calibration and
            given back as it was; its weights never change.
        dataset: the training images (``dataset.label_map`` is the detector's label map).
        train_json: the training annotations of ``dataset`` (the samplers and the counts read them).
        c: the calibration settings.
        files: where the head, the resumable checkpoint, the log, the summary and the snapshots
            go (``None``: nothing is written, the head is only returned).
        resume: continue from ``files.checkpoint`` when it exists. A finished head in ``files``
            is returned as it is when its settings are ``c``, refused otherwise (and without
            ``resume``): a finished calibration is never trained over.
        device: where to run (default: CUDA when available, else the CPU); the model is moved there.

    Returns:
        The calibrated head, in eval mode.
    """
    setup_torch(threads)
    device = device or default_device()
    if _finished(files, c, resume):
        return load_head(files.head, model.roi_heads)[0].to(device).eval()
    label_map = dataset.label_map
    model.to(device)
    with eval_mode(model, frozen=True):  # every parameter frozen, BatchNorm and the RPN in eval mode
        head = _calibrate(model, dataset, train_json, label_map, c, device, files, resume, snapshot_every, progress)
    return head.eval()


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


def _calibrate(
    model: LongTailMaskRCNN,
    dataset: DetectionDataset,
    train_json: dict[str, Any],
    label_map: LabelMap,
    c: CalibrationConfig,
    device: torch.device,
    files: CalibrationFiles | None,
    resume: bool,
    snapshot_every: int,
    progress: bool,
) -> CalibratedHead:
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if world > c.classes_per_batch:
        raise InputError(
            "calibration.classes_per_batch",
            "classes_per_batch",
            f"{c.classes_per_batch} slots per step cannot be shared by {world} processes: use at most "
            f"{c.classes_per_batch} processes",
        )
    main = rank == 0
    stats = TrainingStats.from_dataset(train_json, label_map.category_ids, dataset.source)
    counts = stats.instance_counts
    torch.manual_seed(c.seed)
    stages = getattr(model.roi_heads, "num_stages", 1)
    classifier = decoupled_classifier(c.loss, counts)
    if stages > 1:  # a cascade: one calibrated head per stage (calibration.stages: all or the last)
        head: CalibratedHead | StagedHead = build_staged_head(
            c.head, model.roi_heads, layers=c.layers, seed=c.seed, stages=c.stages, classifier=classifier
        ).to(device)
    else:
        head = build_calibrated_head(c.head, model.roi_heads, layers=c.layers, seed=c.seed, classifier=classifier)
        head = head.to(device)
    # the loop knows no kind: an optimiser for the kinds with parameters to train, the hooks for the rest
    stage_heads = [h for _, h in head.stage_heads()]
    params = list(head.trainable_parameters())
    optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay) if params else None
    try:
        loss_fn = build_classification_loss(c.loss, stats, activation=head.activation, **c.loss_kwargs).to(device)
    except ValueError as e:
        raise InputError("calibration.loss", "loss", str(e)) from None
    # one loss per stage head: a loss with state (Seesaw's counts, EQLv2's statistics) keeps it per stage
    loss_fns = {k: loss_fn if i == 0 else copy.deepcopy(loss_fn) for i, (k, _) in enumerate(head.stage_heads())}
    decay_steps = [int(round(f * c.steps)) for f in c.decay]

    start = 0
    if files is not None and resume and files.checkpoint.exists():
        ckpt = load_checkpoint(files.checkpoint)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("head"), dict) or "step" not in ckpt:
            raise InputError(files.checkpoint, "head", "not a calibration checkpoint: remove it to start over")
        _check_resume(files.checkpoint, c, files, ckpt.get("calibration"))
        was, now = ckpt.get("detector"), getattr(model, "provenance", None)
        if isinstance(was, dict) and now is not None and was.get("sha256") != now["sha256"]:
            raise InputError(
                files.checkpoint,
                "detector",
                f"this interrupted calibration ran on another detector (iteration {was.get('iteration')}) than the "
                f"run's now (iteration {now['iteration']}): calibrate under another --name",
            )
        head.load_state_dict(ckpt["head"])
        for k, state in (ckpt.get("loss") or {}).items():  # the losses' state (absent before it existed)
            loss_fns[int(k)].load_state_dict(state)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        for h in stage_heads:  # what only rank 0's checkpoint may hold (NCM's sums so far)
            h.resumed(rank)
        start = int(ckpt["step"])
        if main:
            rewrite_lines(files.log, lambda line: json.loads(line)["step"] <= start)
    if files is not None and main:
        files.root.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()

    # every draw is a pure function of (seed, step): the schedule is generated a window ahead of the loop,
    # and the cache plans by it; under torchrun each process fetches (and caches) only its own slots
    schedule = CalibrationSchedule(c, train_json, len(dataset), world, rank)
    frozen = FrozenDetector(model, dataset, c.cache_mb, device, miss_batch=c.miss_batch)
    schedule.frozen = frozen
    schedule.skip_to(start)
    name = files.name if files is not None else "(in memory)"
    meta = {
        "kind": c.head,
        "layers": c.layers,
        "steps": c.steps,
        "name": name,
        "calibration": vars(c).copy(),
        "num_classes": label_map.num_classes,
        # the detector it is calibrated on (checkpoint, sha256, iteration): predict refuses it on another
        "detector": getattr(model, "provenance", None),
    }
    bar = tqdm(
        total=c.steps, initial=start, desc=f"calibrate {name}", disable=not (progress and main), dynamic_ncols=True
    )
    writes = files is not None and main
    t0 = time.perf_counter()
    head.train()
    for step in range(start, c.steps):
        lr = c.lr * 0.1 ** sum(step >= s for s in decay_steps)
        draws, flips, mine = schedule.step(step)
        seeds = [streams.slot_seed(c.seed, step, p) for p in range(len(draws))]
        batches = calibration_batches(
            frozen,
            draws,
            flips,
            seeds,
            label_map,
            streams.slot_seed(c.seed, step, streams.CALIBRATION_BACKGROUND),
            step=step,
            box_feats=any(h.needs_box_feats for h in stage_heads),
            mine=mine,
            stages=stages,
        )
        record: dict[str, Any] = {"step": step + 1, "lr": lr, "fg": 0, "bg": 0}
        first = batches[0]
        if first is not None:
            record.update(fg=first.fg, bg=first.bg)
        if stages > 1:  # per stage: stage k keeps the RoIs still foreground at its own threshold
            record.update(fg_stages=[b.fg if b else 0 for b in batches], bg_stages=[b.bg if b else 0 for b in batches])
        work = [(k, h, batches[k]) for k, h in head.stage_heads() if batches[k] is not None]
        for _, h, batch in work:
            h.observe(batch)
        if work and optimizer is not None:
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = torch.zeros((), device=device)
            for k, h, batch in work:  # the stages' heads are separate: their losses add up
                stage_loss = loss_fns[k](h(batch.pooled), batch.labels)
                if world > 1:  # this process's RoIs' share of the step's mean over every process
                    stage_loss = stage_loss * (batch.labels.numel() / batch.total)
                loss = loss + stage_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            record["loss"] = _sum_gradients(params, loss) if world > 1 else float(loss.detach())
            optimizer.step()
        done = step + 1
        bar.update(1)
        if done % c.log_period == 0 or done == c.steps:
            hits, misses = dist_utils.all_reduce_sum(torch.tensor([frozen.hits, frozen.misses])).tolist()
            record.update(
                cache_hits=hits,
                cache_misses=misses,
                sec_per_step=(time.perf_counter() - t0) / (done - start),
            )
            if writes:
                append_line(files.log, json.dumps(record))
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
        if writes and snapshot_every and done % snapshot_every == 0 and all(h.takes_snapshots for h in stage_heads):
            save_head(head, files.snapshot(done), {**meta, "step": done})
        if files is not None and done % c.checkpoint_period == 0 and done != c.steps:
            for h in stage_heads:
                h.sync(dist_utils.all_reduce_sum, rank, keep_on_rank0=True)
            if main:
                save_checkpoint(
                    files.checkpoint,
                    {
                        "head": head.state_dict(),
                        "step": done,
                        "optimizer": optimizer.state_dict() if optimizer else None,
                        "loss": {k: f.state_dict() for k, f in loss_fns.items()},
                        "calibration": vars(c).copy(),
                        "detector": getattr(model, "provenance", None),
                    },
                )
    bar.close()
    for h in stage_heads:
        h.sync(dist_utils.all_reduce_sum, rank, keep_on_rank0=False)
        h.finalize()
    elapsed = time.perf_counter() - t0
    hits, misses = dist_utils.all_reduce_sum(torch.tensor([frozen.hits, frozen.misses])).tolist()
    if writes:
        save_head(head, files.head, {**meta, "step": c.steps})
        write_json(
            files.summary,
            {**meta, "seconds": elapsed, "cache_hits": hits, "cache_misses": misses, "processes": world},
            indent=1,
        )
    dist_utils.barrier()  # the head is on disk before any process returns its path
    return head


def _sum_gradients(params: list[nn.Parameter], loss: Tensor) -> float:
    """Sum the head's gradients and this step's loss over processes, in one all-reduce; returns the
    step's loss. Each process's loss is its RoIs' share of the global mean (the losses are means over
    RoIs), so the summed gradient is the one process's gradient over the whole global batch."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist_utils.all_reduce_sum(torch.cat([*(g.reshape(-1) for g in grads), loss.detach().reshape(1)]))
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return float(flat[-1])
