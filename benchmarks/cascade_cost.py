"""Cascade Mask R-CNN's and HTC's cost against Mask R-CNN's, side by side in one run: training and calibration.

Training: the synthetic_cpu preset's model built from the same seed with ``model.roi_heads``
standard, cascade (the same backbone, RPN and mask head; two more box stages) and htc (the cascade
with two more mask heads, interleaved, with the mask flow), trained on the same batch, steps
rotating between them so that load on the machine hits all alike.
Calibration: SimCal (the run's calibration settings, ``--cal-steps`` steps, in memory) on trained
runs on the same data (e.g. the demo's and ``simcal demo --roi-heads cascade``'s), rotating
``--rounds`` times. Prints medians and the ratios to standard.

    python benchmarks/cascade_cost.py [--steps 10 --batch 8 --size 128]
        [--standard-run runs/demo/run --cascade-run runs/demo_cascade/run --htc-run R --cal-steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import make_batch, step  # noqa: E402

from simcal.config import load_config  # noqa: E402
from simcal.modeling.detector import build_detector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


KINDS = ("standard", "cascade", "htc")


def _rotation(i: int) -> list[str]:
    """Round ``i``'s order of the kinds (each kind first in turn)."""
    return [KINDS[(i + j) % len(KINDS)] for j in range(len(KINDS))]


def training(args: argparse.Namespace) -> dict[str, float]:
    models, opts = {}, {}
    for heads in KINDS:
        cfg = load_config(
            REPO / "configs" / "synthetic_cpu.yaml",
            [f"model.min_size={args.size}", f"model.max_size={args.size}", f"model.roi_heads={heads}"],
        )
        torch.manual_seed(0)
        models[heads] = build_detector(cfg.model, args.classes).train()
        opts[heads] = torch.optim.SGD(models[heads].parameters(), lr=1e-3, momentum=0.9)
    images, targets = make_batch(args.batch, args.size, args.classes)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(args.warmup + args.steps):
        for heads in _rotation(i):
            torch.manual_seed(i)
            dt = step(models[heads], opts[heads], images, targets)
            if i >= args.warmup:
                times[heads].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def calibration(args: argparse.Namespace) -> dict[str, float]:
    from simcal.config import apply_overrides
    from simcal.data.annotations import load_dataset
    from simcal.data.dataset import DetectionDataset
    from simcal.engine.calibrate import CalibrateOptions, calibrate_head
    from simcal.engine.checkpoint import load_model

    parts = {}
    runs = {"standard": args.standard_run, "cascade": args.cascade_run, "htc": args.htc_run}
    for heads, run in runs.items():
        if run is None:
            continue
        model, label_map, cfg = load_model(run)
        cfg = apply_overrides(cfg, [f"calibration.steps={args.cal_steps}"], "(benchmark)", ("calibration.",))
        train = load_dataset(cfg.data.train_json)
        ds = DetectionDataset(train, cfg.data.train_images, label_map=label_map, with_masks=False)
        parts[heads] = (model, ds, train, cfg.calibration)
    times: dict[str, list[float]] = {k: [] for k in parts}
    for r in range(args.rounds):
        for heads in (k for k in _rotation(r) if k in parts):
            model, ds, train, c = parts[heads]
            t0 = time.perf_counter()
            calibrate_head(model, ds, train, c, options=CalibrateOptions(progress=False), threads=args.threads)
            times[heads].append((time.perf_counter() - t0) / args.cal_steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--standard-run", type=Path)
    ap.add_argument("--cascade-run", type=Path)
    ap.add_argument("--htc-run", type=Path)
    ap.add_argument("--cal-steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; training: batch {args.batch} x {args.size}px, {args.steps} steps each")
    print("| stage | roi_heads | s/step | / standard |")
    print("|---|---|---:|---:|")
    rows = [("training step", training(args))]
    if args.standard_run:
        rows.append(("calibration step", calibration(args)))
    for what, t in rows:
        for heads, v in t.items():
            print(f"| {what} | {heads} | {v:.3f} | {v / t['standard']:.2f} |")


if __name__ == "__main__":
    main()
