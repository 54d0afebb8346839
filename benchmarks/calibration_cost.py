"""Calibration cost: SimCal calibration time / base training time at the same scale.

On a trained run (default: the demo's ``synthetic_cpu`` run), measures side by side in one
process the seconds per training iteration of the run's own config (``--train-iters`` iterations
timed after a warm-up, from a fresh model) and complete calibrations, with the frozen-part cache
and without it, for two schedules:

  - ``run``: the run's own schedules: training ``train.max_iter`` iterations, calibration
    ``calibration.steps`` steps. The CPU presets train a fraction of an epoch-based schedule to
    fit a CPU budget while calibrating for 300 steps, so this ratio is far from the paper's.
  - ``paper``: the paper's proportions on the run's data and model: training ``train.epochs``
    epochs of its training images (12, the 1x schedule), and a calibration drawing as many images
    per training image as the paper's did (12k steps x 16 classes over 12 epochs of the 57,263
    LVIS v0.5 training images: 0.28), i.e. ``0.28 x epochs x images / classes_per_batch`` steps.

It prints calibration time / training time for each (paper: < 5 %; goal: <= 2 %), and checks that
the cache changes nothing: the heads with and without it must be bit-identical, and so their AP
(printed on ``--val-images``).

    python benchmarks/calibration_cost.py --run runs/demo/run [--train-iters 20 --val-images 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from simcal.config import Config
from simcal.data.annotations import load_dataset
from simcal.engine.calibrate import calibrate
from simcal.engine.checkpoint import load_model
from simcal.engine.predict import PredictOptions, predict
from simcal.engine.train import schedule, train
from simcal.modeling.calibration import load_head
from simcal.run import Run

#: Calibration images drawn per training image in the paper: 12,000 steps x 16 classes (one image
#: each) after 12 epochs of LVIS v0.5 train (57,263 images).
PAPER_DRAWS_PER_TRAINING_IMAGE = 12_000 * 16 / (12 * 57_263)


def epoch_schedule(cfg: Config, images: int) -> int:
    """Training iterations of ``cfg``'s epoch-based schedule (``train.epochs``, ignoring ``max_iter``)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.max_iter = None
    return schedule(cfg, images)[0]


def time_training(cfg: Config, iters: int, warmup: int = 3) -> float:
    """Seconds per training iteration of ``cfg`` (a fresh run, logged timings after warm-up)."""
    cfg.train.max_iter = warmup + iters
    cfg.train.log_period = 1
    cfg.train.checkpoint_period = 10**9
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", progress=False)
        rec = [json.loads(x) for x in Run(Path(tmp) / "run").train_log.read_text().splitlines()]
    return sum(r["sec_per_iter"] for r in rec[warmup:]) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--schedules", nargs="+", choices=("run", "paper"), default=["run", "paper"])
    ap.add_argument("--val-images", type=int, default=100)
    args = ap.parse_args()

    cfg = Run(args.run).load_config()
    images = len(load_dataset(cfg.data.train_json)["images"])
    sec_iter = time_training(Run(args.run).load_config(), args.train_iters)
    schedules = {
        "run": (schedule(cfg, images)[0], cfg.calibration.steps),
        "paper": (
            epoch_schedule(cfg, images),
            round(PAPER_DRAWS_PER_TRAINING_IMAGE * cfg.train.epochs * images / cfg.calibration.classes_per_batch),
        ),
    }

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        shutil.copytree(args.run, work, ignore=shutil.ignore_patterns("calibration", "predictions"))
        model, _, _ = load_model(work)
        for sched in args.schedules:
            iters, steps = schedules[sched]
            times, aps, heads, counts = {}, {}, {}, {}
            for cache in ("cached", "uncached"):
                name = f"{sched}_{cache}"
                t0 = time.perf_counter()
                cache_mb = cfg.calibration.cache_mb if cache == "cached" else 0
                calibrate(
                    work,
                    [f"calibration.steps={steps}", f"calibration.cache_mb={cache_mb}"],
                    name=name,
                    progress=False,
                )
                times[cache] = time.perf_counter() - t0
                files = Run(work).calibration(name)
                summary = json.loads(files.summary.read_text())
                counts[cache] = (summary["cache_misses"], summary["cache_hits"])
                heads[cache] = load_head(files.head, model.roi_heads)[0].state_dict()
                m = predict(
                    work,
                    heads=["cal"],
                    calibration=name,
                    options=PredictOptions(max_images=args.val_images, progress=False),
                )
                shutil.rmtree(Run(work).predictions("val").root)
                aps[cache] = (m["cal"]["bbox"].metrics["AP"], m["cal"]["segm"].metrics["AP"])
            identical = all(torch.equal(heads["cached"][k], heads["uncached"][k]) for k in heads["cached"])
            rows.append((sched, iters, steps, times, aps, counts, identical))

    print(f"\nbase training: {sec_iter:.3f} s/iter ({images} training images, batch {cfg.train.batch_size})")
    logged = [json.loads(x) for x in Run(args.run).train_log.read_text().splitlines() if x.strip()]
    if logged:  # for comparison: the run's own training (a fresh model's first iterations are cheaper)
        print(f"(the run's own training logged {sum(r['sec_per_iter'] for r in logged) / len(logged):.3f} s/iter)")
    print(
        "| schedule | training iters | training s | calibration | steps | frozen-part misses / hits | seconds "
        "| / training | cal box AP | cal mask AP |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for sched, iters, steps, times, aps, counts, _ in rows:
        for cache in ("cached", "uncached"):
            total = sec_iter * iters
            print(
                f"| {sched} | {iters} | {total:.0f} | {cache} | {steps} | {counts[cache][0]} / {counts[cache][1]} "
                f"| {times[cache]:.1f} | {100 * times[cache] / total:.2f} % "
                f"| {100 * aps[cache][0]:.2f} | {100 * aps[cache][1]:.2f} |"
            )
    for sched, *_, identical in rows:
        print(f"{sched}: heads bit-identical with and without the cache: {identical}")


if __name__ == "__main__":
    main()
