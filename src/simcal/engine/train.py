"""``simcal train``: one iteration-based training loop, resumable exactly, torchrun/DDP aware.

Determinism and exact resume: the data order is a pure function of (seed, iteration) (see
:class:`simcal.data.samplers.BatchStream`), flips are drawn from (seed, iteration), and a
checkpoint holds the model, the optimiser, the iteration and every RNG state. Resuming from a
checkpoint therefore reproduces the uninterrupted run's weights on the CPU.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from simcal import seeds as streams
from simcal.config import Config, classifier_of, prior_prob_of, save_config
from simcal.data.annotations import load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap, data_loader
from simcal.data.samplers import BatchStream, RepeatFactorSampler, TrainingSampler, repeat_factors
from simcal.data.stats import TrainingStats
from simcal.engine import distributed as dist_utils
from simcal.engine.runtime import seed_everything, setup_torch
from simcal.errors import InputError, TrainingError
from simcal.io import append_line, rewrite_lines, save_checkpoint, writes_run
from simcal.modeling.detector import build_detector, load_detector_weights, train_scales
from simcal.modeling.losses import build_classification_loss
from simcal.modeling.predictors import classifier_state
from simcal.modeling.sampling import sampling_seeds
from simcal.run import Run


def schedule(cfg: Config, images_per_epoch: float) -> tuple[int, list[int]]:
    """``(max_iter, lr decay iterations)``: ``train.steps`` are iterations when ``max_iter`` is
    set, else epochs (the paper: 12 epochs, decays at 8 and 11)."""
    t = cfg.train
    if t.max_iter is not None:
        return t.max_iter, [int(s) for s in t.steps]
    iters_per_epoch = images_per_epoch / t.batch_size
    return max(1, math.ceil(t.epochs * iters_per_epoch)), [int(round(s * iters_per_epoch)) for s in t.steps]


def learning_rate(cfg: Config, iteration: int, steps: list[int]) -> float:
    """Linear warm-up from ``warmup_factor``, then x``gamma`` at each step; scaled with the batch."""
    t = cfg.train
    lr = t.base_lr * t.batch_size / t.reference_batch_size
    if iteration < t.warmup_iters:
        alpha = iteration / t.warmup_iters
        lr *= t.warmup_factor * (1 - alpha) + alpha
    return lr * t.gamma ** sum(iteration >= s for s in steps)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Batches:
    """The batch sampler a DataLoader reads: this rank's ``(index, flip)`` list per iteration."""

    def __init__(self, stream: BatchStream, start: int, stop: int, rank: int, world: int, seed: int, flip_prob: float):
        self.stream, self.start, self.stop = stream, start, stop
        self.rank, self.world, self.seed, self.flip_prob = rank, world, seed, flip_prob

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for it in range(self.start, self.stop):
            batch = self.stream.global_batch(it)
            flips = streams.flips(self.seed, it, streams.TRAIN_FLIP, len(batch), self.flip_prob)
            pairs = [(int(i), f) for i, f in zip(batch, flips)]
            yield pairs[self.rank :: self.world]


def _tensorboard(path: Path) -> Any:
    """A TensorBoard writer when the ``tensorboard`` package is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.train.base_lr * cfg.train.batch_size / cfg.train.reference_batch_size
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)


@writes_run
def train(cfg: Config | None, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the detector a config describes into run directory ``out``; returns the final weights.

    With ``resume``, the run's own ``config.yaml`` is used and training continues from
    ``checkpoint_last.pth`` (from the start when the run stopped before its first checkpoint); a
    ``cfg`` given with ``resume`` is the run's config with the changes a resume may make
    (:func:`simcal.config.resume_conflicts`, checked by the caller): it is written into the run only
    once the checkpoint has been read, so a damaged checkpoint leaves the run as it was.
    """
    out = Path(out)
    run = Run(out)
    rank, world, device = dist_utils.init_distributed()
    changed: Config | None = None
    if resume:
        stored = run.load_config()
        changed = cfg if cfg is not None and cfg != stored else None
        cfg = cfg or stored
    elif cfg is None:
        raise InputError("simcal train", "--config", "a config is needed for a new run")
    elif run.has_training():
        raise InputError(out, "(run directory)", "already holds a run: pass --resume to continue it, or another --out")
    setup_torch(cfg.train.threads)
    t = cfg.train
    if t.batch_size % world:
        raise InputError("train.batch_size", "batch_size", f"{t.batch_size} is not divisible by {world} processes")

    train_json = load_dataset(cfg.data.train_json) if cfg.data.train_json else None
    if train_json is None:
        raise InputError("data.train_json", "train_json", "no training annotations given")
    if not train_json["images"]:
        raise InputError(cfg.data.train_json, "images", "no images: nothing to train on")
    if not any(not a.get("iscrowd", 0) and min(a["bbox"][2:]) >= 1 for a in train_json["annotations"]):
        # the dataset drops crowd regions and boxes under 1 px: the detector would see background only
        why = "no annotation outside crowd regions with a box of at least 1x1 px"
        raise InputError(cfg.data.train_json, "annotations", f"{why}: nothing to train on")
    label_map = LabelMap.from_dataset(train_json)
    dataset = DetectionDataset(train_json, cfg.data.train_images, label_map=label_map, source=cfg.data.train_json)
    if t.sampler == "repeat_factor":
        factors = repeat_factors(train_json, t.repeat_threshold)
        sampler: TrainingSampler | RepeatFactorSampler = RepeatFactorSampler(
            factors, seed=t.seed, rounding=t.repeat_rounding
        )
        per_epoch = float(np.ceil(factors).sum() if t.repeat_rounding == "ceil" else factors.sum())
    else:
        sampler = TrainingSampler(len(dataset), seed=t.seed)
        per_epoch = float(len(dataset))
    stream = BatchStream(sampler, t.batch_size)
    max_iter, steps = schedule(cfg, per_epoch)

    seed_everything(t.seed)
    stats = TrainingStats.from_dataset(train_json, label_map.category_ids)
    counts = stats.instance_counts
    model = build_detector(
        cfg.model,
        label_map.num_classes,
        classifier=classifier_of(cfg),
        instance_counts=counts,
        prior_prob=prior_prob_of(cfg),
    )
    train_scales(model, cfg.data.train_scales, cfg.data.train_max_size)  # multi-scale training, when asked
    predictor = model.roi_heads.box_predictor
    classifier = classifier_state(predictor.activation)
    try:
        loss = build_classification_loss(t.loss, stats, activation=predictor.activation, **t.loss_kwargs)
        model.roi_heads.set_loss(loss)  # every stage's classifier on a cascade
    except ValueError as e:
        raise InputError("train.loss", "loss", str(e)) from None
    if world > 1 and device.type == "cuda" and cfg.model.norm == "bn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # per-process BN statistics otherwise
    model = model.to(device)
    optimizer = build_optimizer(cfg, model)

    start = 0
    if resume and run.checkpoint_last.exists():  # without one (stopped before the first), start over
        ckpt = load_detector_weights(model, run.checkpoint_last, run.label_map)
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["iteration"])
        _set_rng_state(ckpt["rng"])
        if dist_utils.is_main():
            if changed is not None:  # the checkpoint is sound: the resumed settings join the run
                save_config(changed, run.config)
            rewrite_lines(run.train_log, lambda line: json.loads(line)["iteration"] <= start)
    elif dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        label_map.save(run.label_map)
        rewrite_lines(run.train_log, lambda line: False)  # a log of a run stopped before its first checkpoint
    dist_utils.barrier()

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = data_loader(
        dataset,
        batch_sampler=_Batches(stream, start, max_iter, rank, world, t.seed, t.flip_prob),
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
        persistent_workers=False,
    )
    use_amp = t.amp and device.type == "cuda"
    log_path = run.train_log
    tb = _tensorboard(run.tensorboard) if dist_utils.is_main() else None
    bar = tqdm(
        total=max_iter, initial=start, desc="train", disable=not (progress and dist_utils.is_main()), dynamic_ncols=True
    )
    net.train()
    t_last = time.perf_counter()
    for it, (images, targets) in enumerate(loader, start=start):
        lr = learning_rate(cfg, it, steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in tg.items()} for tg in targets]
        image_seeds = [streams.slot_seed(t.seed, it, p) for p in range(rank, t.batch_size, world)]
        with sampling_seeds(model, image_seeds), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            losses = net(images, targets)
        loss = sum(losses.values())
        values = dist_utils.all_reduce_mean({k: float(v.detach()) for k, v in losses.items()})
        if not all(math.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
            kept = (
                f"last good checkpoint {run.checkpoint_last}"
                if run.checkpoint_last.exists()
                else "no checkpoint was written yet"
            )
            bar.close()
            raise TrainingError(f"non-finite loss at iteration {it} ({bad}); stopped, {kept}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = it + 1
        bar.update(1)
        if dist_utils.is_main() and (done % t.log_period == 0 or done == max_iter):
            now = time.perf_counter()
            record = {
                "iteration": done,
                "lr": lr,
                "loss": sum(values.values()),
                **values,
                "sec_per_iter": (now - t_last)
                / (t.log_period if done % t.log_period == 0 else max(1, done % t.log_period)),
            }
            t_last = now
            append_line(log_path, json.dumps(record))
            if tb is not None:
                for key, value in record.items():
                    if key != "iteration":
                        tb.add_scalar(f"train/{key}", value, done)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
        if dist_utils.is_main() and (done % t.checkpoint_period == 0 or done == max_iter):
            save_checkpoint(
                run.checkpoint_last,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "iteration": done,
                    "rng": _rng_state(),
                    "max_iter": max_iter,
                    "classifier": classifier,
                },
            )
        dist_utils.barrier()
    bar.close()
    if dist_utils.is_main():
        save_checkpoint(
            run.model_final,
            {
                "model": model.state_dict(),
                "iteration": max_iter,
                "num_classes": label_map.num_classes,
                "classifier": classifier,  # predict rebuilds it without the training annotations
                "config": cfg.to_dict(),
            },
        )
    dist_utils.barrier()
    return run.model_final
