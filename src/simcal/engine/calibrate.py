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

Cost: the frozen part (backbone + RPN) of an (image, flip) never changes, so its outputs are
cached (``cache_mb``; planned by the known schedule: kept until their last use, Belady eviction);
an image drawn again costs only RoIAlign and the head. The frozen box head runs only for ``ncm``.
Deterministic and resumable: every draw is a pure function of (seed, step).
"""

from __future__ import annotations

import bisect
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from simcal.config import Config
from simcal.data.annotations import load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap
from simcal.data.samplers import BatchStream, BiLevelSampler, RepeatFactorSampler, TrainingSampler, repeat_factors
from simcal.engine.checkpoint import load_checkpoint, save_checkpoint
from simcal.engine.predict import load_model
from simcal.engine.train import class_instance_counts, image_seed, setup_torch
from simcal.errors import InputError
from simcal.io import atomic_open, write_json
from simcal.modeling.calibration import build_calibrated_head, save_head
from simcal.modeling.losses import build_classification_loss

CHECKPOINT = "checkpoint.pth"
HEAD = "head.pth"
LOG = "calibration_log.jsonl"


def calibration_dir(run: Path, name: str) -> Path:
    return run / "calibration" / name


def default_name(cfg: Config) -> str:
    """``3fc_ft`` for SimCal's defaults; variants append what differs (``3fc_ft_focal_random``)."""
    c = cfg.calibration
    parts = [c.head] + ([c.layers] if c.layers != "all3" else [])
    parts += [c.loss] if c.loss != "ce" else []
    parts += [c.sampler] if c.sampler != "bilevel" else []
    return "_".join(parts)


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
        self._uses: dict[Key, list[int]] = {}  # the steps that use each key, ascending
        for step, keys in enumerate(schedule or []):
            for key in keys:
                uses = self._uses.setdefault(key, [])
                if not uses or uses[-1] != step:
                    uses.append(step)
        self._expire: dict[int, list[Key]] = {}  # step -> keys last used at that step
        for key, uses in self._uses.items():
            self._expire.setdefault(uses[-1], []).append(key)
        rpn = model.rpn
        rpn._pre_nms_top_n = {**rpn._pre_nms_top_n, "testing": rpn._pre_nms_top_n["training"]}
        rpn._post_nms_top_n = {**rpn._post_nms_top_n, "testing": rpn._post_nms_top_n["training"]}

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
                old = self.cache.pop(key, None)
                if old is not None:
                    self.cache_bytes -= self._size(old)
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


def calibration_batch(
    frozen: FrozenDetector,
    draws: list[tuple[int, int | None]],
    flips: list[bool],
    seeds: list[int],
    label_map: LabelMap,
    bg_seed: int,
    step: int | None = None,
    box_feats: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor] | None:
    """RoIs of one calibration step (``None`` when no RoI is kept).

    Args:
        draws: ``(image index, category id)`` per slot (bi-level), or ``(image index, None)``
            (image-centric: every sampled RoI kept, no 1:1 background balancing).
        seeds: the RoI sub-sampling seed of each slot.
        step: the step in ``frozen``'s schedule (for its planned cache), if it has one.
        box_feats: also run the frozen box head (only the NCM head needs its features).

    Returns:
        ``(pooled (K, C_fpn, 7, 7), box_feats (K, D) or None, labels (K,))`` of the kept RoIs,
        label 0 background.
    """
    roi = frozen.model.roi_heads
    items = frozen.fetch(list(zip((d[0] for d in draws), flips)), step=step)
    slots = []  # (features, size, fg boxes, fg labels, bg boxes)
    for (_, cat_id), seed, item in zip(draws, seeds, items):
        feats, props, gt_boxes, gt_labels, size = item
        props = torch.cat([props, gt_boxes])
        _, labels = roi.assign_targets_to_proposals([props], [gt_boxes], [gt_labels])
        labels = labels[0]
        roi.fg_bg_sampler.seeds = [seed]
        pos_mask, neg_mask = roi.fg_bg_sampler([labels])
        fg = torch.where(pos_mask[0].bool())[0]
        bg = torch.where(neg_mask[0].bool())[0]
        if cat_id is not None:  # object level: only the sampled class; other foregrounds are dropped
            fg = fg[labels[fg] == label_map.to_label(cat_id)]
        slots.append((feats, size, props[fg], labels[fg], props[bg]))
    roi.fg_bg_sampler.seeds = None
    n_fg = sum(s[2].shape[0] for s in slots)
    if draws and draws[0][1] is not None:  # bi-level: keep as many of the batch's backgrounds as foregrounds
        n_bg = [s[4].shape[0] for s in slots]
        keep = torch.randperm(sum(n_bg), generator=torch.Generator().manual_seed(bg_seed))[:n_fg]
        owner = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(n_bg, dtype=torch.long))
        offsets = torch.tensor([0, *n_bg]).cumsum(0)
        kept = keep.sort().values
        slots = [
            (f, size, fb, fl, bb[(kept[owner[kept] == i] - offsets[i]).to(bb.device)])
            for i, (f, size, fb, fl, bb) in enumerate(slots)
        ]
    pooled, labels = [], []
    with torch.inference_mode():
        for feats, size, fg_boxes, fg_labels, bg_boxes in slots:
            rois = torch.cat([fg_boxes, bg_boxes])
            if rois.shape[0]:
                pooled.append(roi.box_roi_pool(feats, [rois], [size]))
                labels.append(
                    torch.cat([fg_labels, torch.zeros(bg_boxes.shape[0], dtype=torch.int64, device=fg_labels.device)])
                )
        if not pooled:
            return None
        pooled_t = torch.cat(pooled)
        feats_t = roi.box_head(pooled_t).clone() if box_feats else None
    # inference tensors cannot enter autograd: clone into normal tensors for the head's training
    return pooled_t.clone(), feats_t, torch.cat(labels).clone()


def calibrate(
    run: str | Path,
    cfg_overrides: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    resume: bool = False,
    snapshot_every: int = 0,
    progress: bool = True,
) -> Path:
    """Calibrate a trained run's classification head; returns ``RUN/calibration/<name>/head.pth``.

    ``cfg_overrides`` replace fields of the run's ``calibration`` config (``steps``, ``head``, ...).
    With ``snapshot_every`` K, the head is also saved every K steps (for the dynamics analysis).
    """
    run = Path(run)
    model, label_map, cfg = load_model(run)
    for key, value in (cfg_overrides or {}).items():
        if value is not None:
            if not hasattr(cfg.calibration, key):
                raise InputError("simcal calibrate", key, "unknown calibration setting")
            setattr(cfg.calibration, key, value)
    from simcal.config import validate_config

    validate_config(cfg, "simcal calibrate")
    c = cfg.calibration
    setup_torch(cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = name or default_name(cfg)
    out = calibration_dir(run, name)
    if (out / HEAD).exists() and not resume:
        raise InputError(out, "(calibration)", "already done: pass --resume to continue it, or another --name")

    # the detector is frozen: no parameter trains, BatchNorm and the RPN stay in eval mode
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    train_json = load_dataset(cfg.data.train_json)
    dataset = DetectionDataset(
        train_json, cfg.data.train_images, label_map=label_map, with_masks=False, source=cfg.data.train_json
    )
    counts = class_instance_counts(train_json, label_map)
    torch.manual_seed(c.seed)
    head = build_calibrated_head(c.head, model.roi_heads, layers=c.layers, seed=c.seed).to(device)
    params = list(head.trainable_parameters()) if c.head != "ncm" else []
    optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay) if params else None
    loss_fn = build_classification_loss(c.loss, counts).to(device)
    decay_steps = [int(round(f * c.steps)) for f in c.decay]

    if c.sampler == "bilevel":
        bilevel = BiLevelSampler(train_json, classes_per_batch=c.classes_per_batch, seed=c.seed)

        def draws_of(step: int) -> list[tuple[int, int | None]]:
            return [(i, cat) for i, cat in bilevel.batch(step)]
    else:
        base = (
            RepeatFactorSampler(repeat_factors(train_json), seed=c.seed)
            if c.sampler == "repeat_factor"
            else TrainingSampler(len(dataset), seed=c.seed)
        )
        stream = BatchStream(base, c.classes_per_batch)

        def draws_of(step: int) -> list[tuple[int, int | None]]:
            return [(i, None) for i in stream.global_batch(step)]

    start = 0
    if resume and (out / CHECKPOINT).exists():
        ckpt = load_checkpoint(out / CHECKPOINT)
        head.load_state_dict(ckpt["head"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        _truncate(out / LOG, start)
    out.mkdir(parents=True, exist_ok=True)

    # every draw is a pure function of (seed, step): the whole schedule is known, and the cache plans by it
    draws_all = [draws_of(s) for s in range(c.steps)]
    flips_of = [
        list(np.random.default_rng([c.seed, s, 3]).random(len(d)) < c.flip_prob) for s, d in enumerate(draws_all)
    ]
    schedule = [list(zip((d[0] for d in draws), flips)) for draws, flips in zip(draws_all, flips_of)]
    frozen = FrozenDetector(model, dataset, c.cache_mb, device, schedule=schedule, miss_batch=c.miss_batch)
    meta = {
        "kind": c.head,
        "layers": c.layers,
        "steps": c.steps,
        "name": name,
        "calibration": vars(c).copy(),
        "num_classes": label_map.num_classes,
    }
    bar = tqdm(total=c.steps, initial=start, desc=f"calibrate {name}", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    head.train()
    for step in range(start, c.steps):
        lr = c.lr * 0.1 ** sum(step >= s for s in decay_steps)
        draws, flips = draws_all[step], flips_of[step]
        seeds = [image_seed(c.seed, step, p) for p in range(len(draws))]
        batch = calibration_batch(
            frozen,
            draws,
            flips,
            seeds,
            label_map,
            image_seed(c.seed, step, 10**6),
            step=step,
            box_feats=c.head == "ncm",
        )
        record: dict[str, Any] = {"step": step + 1, "lr": lr, "fg": 0, "bg": 0}
        if batch is not None:
            pooled, box_feats, labels = batch
            record.update(fg=int((labels > 0).sum()), bg=int((labels == 0).sum()))
        if batch is None:
            pass
        elif c.head == "ncm":
            head.ncm_accumulate(box_feats, labels)
        else:
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = loss_fn(head(pooled), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record["loss"] = float(loss.detach())
        done = step + 1
        bar.update(1)
        if done % c.log_period == 0 or done == c.steps:
            record.update(
                cache_hits=frozen.hits,
                cache_misses=frozen.misses,
                sec_per_step=(time.perf_counter() - t0) / (done - start),
            )
            with open(out / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
        if snapshot_every and done % snapshot_every == 0 and c.head != "ncm":
            save_head(head, out / "snapshots" / f"head_{done:06d}.pth", {**meta, "step": done})
        if done % c.checkpoint_period == 0 and done != c.steps:
            save_checkpoint(
                out / CHECKPOINT,
                {"head": head.state_dict(), "step": done, "optimizer": optimizer.state_dict() if optimizer else None},
            )
    bar.close()
    if c.head == "ncm":
        head.ncm_finalize()
    elapsed = time.perf_counter() - t0
    save_head(head, out / HEAD, {**meta, "step": c.steps})
    write_json(
        out / "summary.json",
        {**meta, "seconds": elapsed, "cache_hits": frozen.hits, "cache_misses": frozen.misses},
        indent=1,
    )
    return out / HEAD


def _truncate(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))
