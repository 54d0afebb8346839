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

import copy
import json
import time
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
from simcal.data.stats import TrainingStats
from simcal.engine import distributed as dist_utils
from simcal.engine.calibration_batches import CalibrationSchedule, calibration_batches
from simcal.engine.checkpoint import load_model
from simcal.engine.feature_cache import FrozenDetector
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
from simcal.modeling.detector import LongTailMaskRCNN, eval_mode
from simcal.modeling.losses import build_classification_loss
from simcal.run import CalibrationFiles, Run, calibration_name

#: what ``simcal calibrate`` accepts as ``section.key=value`` overrides
OVERRIDABLE = ("calibration.",)


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
    options = CalibrateOptions(resume=resume, snapshot_every=snapshot_every, progress=progress)
    calibrate_head(
        model,
        dataset,
        train_json,
        cfg.calibration,
        files=files,
        options=options,
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


@dataclass(frozen=True)
class CalibrateOptions:
    """How a calibration runs (not what it trains: that is :class:`simcal.config.CalibrationConfig`),
    passed down whole (:func:`calibrate` -> :func:`calibrate_head` -> the loop).

    ``resume``: continue from the checkpoint of an interrupted calibration; ``snapshot_every`` K:
    also save the head every K steps (``analyze dynamics``); ``progress``: a tqdm bar.
    """

    resume: bool = False
    snapshot_every: int = 0
    progress: bool = True


def calibrate_head(
    model: LongTailMaskRCNN,
    dataset: DetectionDataset,
    train_json: dict[str, Any],
    c: CalibrationConfig,
    *,
    files: CalibrationFiles | None = None,
    options: CalibrateOptions = CalibrateOptions(),
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
        options: :class:`CalibrateOptions`. With ``options.resume`` the calibration continues from
            ``files.checkpoint`` when it exists. A finished head in ``files`` is returned as it is
            when its settings are ``c``, refused otherwise (and without ``resume``): a finished
            calibration is never trained over.
        device: where to run (default: CUDA when available, else the CPU); the model is moved there.

    Returns:
        The calibrated head, in eval mode.
    """
    setup_torch(threads)
    device = device or default_device()
    if _finished(files, c, options.resume):
        return load_head(files.head, model.roi_heads)[0].to(device).eval()
    label_map = dataset.label_map
    model.to(device)
    with eval_mode(model, frozen=True):  # every parameter frozen, BatchNorm and the RPN in eval mode
        head = _calibrate(model, dataset, train_json, label_map, c, device, files, options)
    return head.eval()


def _calibrate(
    model: LongTailMaskRCNN,
    dataset: DetectionDataset,
    train_json: dict[str, Any],
    label_map: LabelMap,
    c: CalibrationConfig,
    device: torch.device,
    files: CalibrationFiles | None,
    options: CalibrateOptions,
) -> CalibratedHead:
    resume, snapshot_every, progress = options.resume, options.snapshot_every, options.progress
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
