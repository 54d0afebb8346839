"""Dual-head inference cost: time of ``--head dual`` / ``--head orig`` on the same images.

Runs the same trained run and calibrated head over the same validation images, alternating
orig and dual passes (``--repeats`` times each) so machine load hits both alike, and prints the
median ratio (goal <= 1.03). Results are not written; only the inference is timed.

    python benchmarks/dual_head.py --run runs/demo/run [--images 64 --batch-size 8 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from simcal.data.annotations import load_dataset
from simcal.data.dataset import DetectionDataset
from simcal.data.stats import class_instance_counts
from simcal.engine.predict import build_scorers, load_calibrated_head, load_model, parse_heads
from simcal.engine.runtime import setup_torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model, label_map, cfg = load_model(args.run)
    setup_torch(cfg.train.threads)
    train = load_dataset(cfg.data.train_json)
    counts = torch.tensor(class_instance_counts(train, label_map.category_ids), dtype=torch.float32)
    cal = load_calibrated_head(args.run, None, model).eval()
    ds = DetectionDataset(load_dataset(cfg.data.val_json), cfg.data.val_images, label_map=label_map, with_masks=False)
    images = [ds[i][0] for i in range(min(args.images, len(ds)))]
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    scorers = {
        name: build_scorers(parse_heads([name], cfg.inference.combine, cfg.inference.T, 1.0), {"": cal}, counts)
        for name in ("orig", "dual")
    }
    for s in scorers.values():  # warm-up
        model.detect(batches[0], s)
    times: dict[str, list[float]] = {"orig": [], "dual": []}
    for r in range(args.repeats):
        for name in ("orig", "dual") if r % 2 == 0 else ("dual", "orig"):
            t0 = time.perf_counter()
            for b in batches:
                model.detect(b, scorers[name])
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(images)
    print(f"{n} images, batch {args.batch_size}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    print("| head | median s | s / image |")
    print("|---|---:|---:|")
    for k in ("orig", "dual"):
        print(f"| {k} | {med[k]:.2f} | {med[k] / n:.3f} |")
    print(f"ratio dual / orig: {med['dual'] / med['orig']:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
