"""Calibration cost: SimCal calibration time / base training time at the same scale.

On a trained run (default: the demo's ``synthetic_cpu`` run), measures side by side in one
process:
  - base training: seconds per iteration of the run's own config (``--train-iters`` iterations
    timed after a warm-up, from a fresh model), times the config's ``max_iter``;
  - calibration: the full default calibration (``calibration.steps``), with the frozen-part cache
    and without it;
and prints both ratios (paper: < 5 %; goal: <= 2 %). It also checks that the cache changes
nothing: both calibrated heads must be bit-identical, and so their AP (printed on ``--val-images``).

    python benchmarks/calibration_cost.py --run runs/demo/run [--train-iters 20 --val-images 100]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from simcal.config import Config
from simcal.engine.calibrate import calibrate
from simcal.engine.predict import load_model, predict
from simcal.engine.train import load_run_config, train
from simcal.modeling.calibration import load_head


def time_training(cfg: Config, iters: int, warmup: int = 3) -> float:
    """Seconds per training iteration of ``cfg`` (a fresh run, logged timings after warm-up)."""
    import json

    cfg.train.max_iter = warmup + iters
    cfg.train.log_period = 1
    cfg.train.checkpoint_period = 10**9
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", progress=False)
        rec = [json.loads(x) for x in (Path(tmp) / "run" / "train_log.jsonl").read_text().splitlines()]
    return sum(r["sec_per_iter"] for r in rec[warmup:]) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="calibration steps (default: the run's config)")
    ap.add_argument("--val-images", type=int, default=100)
    args = ap.parse_args()

    cfg = load_run_config(args.run)
    steps = args.steps or cfg.calibration.steps
    full_iters = cfg.train.max_iter
    sec_iter = time_training(load_run_config(args.run), args.train_iters)
    train_total = sec_iter * full_iters

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        shutil.copytree(args.run, work, ignore=shutil.ignore_patterns("calibration", "predictions"))
        times = {}
        for name, cache in (("cached", cfg.calibration.cache_mb), ("uncached", 0)):
            t0 = time.perf_counter()
            calibrate(work, {"steps": steps, "cache_mb": cache}, name=name, progress=False)
            times[name] = time.perf_counter() - t0
        model, _, _ = load_model(work)
        a = load_head(work / "calibration" / "cached" / "head.pth", model.roi_heads)[0].state_dict()
        b = load_head(work / "calibration" / "uncached" / "head.pth", model.roi_heads)[0].state_dict()
        identical = all(torch.equal(a[k], b[k]) for k in a)
        aps = {}
        for name in ("cached", "uncached"):
            m = predict(work, heads=["cal"], calibration=name, max_images=args.val_images, progress=False)
            shutil.move(str(work / "predictions"), str(work / f"predictions_{name}"))
            aps[name] = (m["cal"]["bbox"].metrics["AP"], m["cal"]["segm"].metrics["AP"])

    print(f"\nbase training: {sec_iter:.3f} s/iter x {full_iters} iterations = {train_total:.0f} s")
    print("| calibration | steps | seconds | / training | cal box AP | cal mask AP |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("cached", "uncached"):
        print(
            f"| {name} | {steps} | {times[name]:.1f} | {100 * times[name] / train_total:.2f} % | "
            f"{100 * aps[name][0]:.2f} | {100 * aps[name][1]:.2f} |"
        )
    print(f"heads bit-identical with and without the cache: {identical}")


if __name__ == "__main__":
    main()
