"""One GPU run at LVIS v1 scale, prepared to fit a 10-minute slot: synth, train, calibrate, predict.

The LVIS v1 preset (``configs/lvis_v1_r50_fpn.yaml``: Mask R-CNN R50-FPN, short edge 800 / long
edge <= 1333, bf16 autocast on CUDA) trains from scratch (no pretrained weights on a machine
without internet) on a ``simcal synth --like lvis_v1`` set of JPEGs (1,203 classes, LVIS's
per-class counts scaled), for a few hundred iterations on one GPU; then SimCal calibrates for a
few hundred steps and ``predict`` runs orig / cal / dual on a few hundred val images. Everything
runs in this one process, so the peak GPU memory of each stage is read from torch
(``max_memory_allocated``, reset between stages). Prints a table and writes ``gpu_run.json``:
seconds per training iteration, training images per second, seconds per calibration step,
predict images per second, peak GPU memory per stage, and the calibration / training time ratio
at the paper's proportions (12,000 calibration steps against 12 epochs of LVIS v1 train, 100,170
images at 16 per iteration: 75,128 iterations; the measured time per iteration is scaled to 16
images when ``--batch`` is not 16).

The synthetic images are square (``--size``, default 800): the model's inputs are then 800 x 800,
not 800 x 1333 (LVIS's landscape images give about 1.6x the pixels).

    python benchmarks/gpu_run.py --out /tmp/gpu                       # the GPU run (defaults)
    python benchmarks/gpu_run.py --out /tmp/g --size 128 --train-images 210 --iters 2 --batch 2 \\
        --cal-steps 2 --predict-images 4 --workers 0                   # a dry run on the CPU

Nothing in the test suite depends on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
LVIS_V1_TRAIN_IMAGES = 100_170
PAPER_EPOCHS, PAPER_BATCH, PAPER_CAL_STEPS = 12, 16, 12_000


def peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-images", type=int, default=1200)
    ap.add_argument("--val-images", type=int, default=201, help="at least 201: one instance of each class")
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cal-steps", type=int, default=300)
    ap.add_argument("--predict-images", type=int, default=200)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()

    from simcal import api
    from simcal.data.synthetic import generate_synthetic

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "args": vars(args)}
    report["args"]["out"] = str(out)

    t0 = time.perf_counter()
    data = out / "data"
    generate_synthetic(
        data,
        like="lvis_v1",
        train_images=args.train_images,
        val_images=args.val_images,
        size=args.size,
        image_format="jpg",
        val_floor=1,
        progress=False,
    )
    report["synth_s"] = time.perf_counter() - t0

    cfg = {
        "_base_": str(REPO / "configs" / "lvis_v1_r50_fpn.yaml"),
        "data": {
            "train_json": str(data / "train.json"),
            "train_images": str(data / "images"),
            "val_json": str(data / "val.json"),
            "val_images": str(data / "images"),
            "num_workers": args.workers,
        },
        "model": {"weights_backbone": None},
        "train": {
            "batch_size": args.batch,
            "max_iter": args.iters,
            "steps": [],
            "warmup_iters": min(100, max(1, args.iters // 3)),
            "checkpoint_period": 10**9,
            "log_period": max(1, min(20, args.iters // 5)),
        },
        "calibration": {"steps": args.cal_steps, "checkpoint_period": 10**9, "log_period": max(1, args.cal_steps // 5)},
    }
    (out / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    run = out / "run"

    reset_peak()
    t0 = time.perf_counter()
    api.train(out / "gpu.yaml", run, progress=False)
    report["train_s"] = time.perf_counter() - t0
    report["train_peak_mib"] = peak_mib()
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    steady = [r["sec_per_iter"] for r in log[1:]] or [r["sec_per_iter"] for r in log]  # the first has start-up
    report["sec_per_iter"] = statistics.median(steady)
    report["train_images_per_s"] = args.batch / report["sec_per_iter"]

    reset_peak()
    t0 = time.perf_counter()
    api.calibrate(run, progress=False)
    report["calibrate_s"] = time.perf_counter() - t0
    report["calibrate_peak_mib"] = peak_mib()
    summary = json.loads((run / "calibration" / "3fc_ft" / "summary.json").read_text())
    report["sec_per_cal_step"] = summary["seconds"] / args.cal_steps
    report["cal_cache"] = {"hits": summary["cache_hits"], "misses": summary["cache_misses"]}

    reset_peak()
    t0 = time.perf_counter()
    metrics = api.predict(run, heads=("orig", "cal", "dual"), max_images=args.predict_images, progress=False)
    report["predict_s"] = time.perf_counter() - t0
    report["predict_peak_mib"] = peak_mib()
    n = len(json.loads((data / "val.json").read_text())["images"])
    report["predict_images"] = min(n, args.predict_images)
    report["predict_images_per_s"] = report["predict_images"] / report["predict_s"]  # evaluation included
    report["box_AP"] = {head: m["bbox"].metrics["AP"] for head, m in metrics.items()}

    train_iters = PAPER_EPOCHS * LVIS_V1_TRAIN_IMAGES / PAPER_BATCH
    per_paper_iter = report["sec_per_iter"] * PAPER_BATCH / args.batch
    report["calibration_over_training_at_paper_proportions"] = (PAPER_CAL_STEPS * report["sec_per_cal_step"]) / (
        train_iters * per_paper_iter
    )
    (out / "gpu_run.json").write_text(json.dumps(report, indent=1))
    for key, value in report.items():
        print(f"{key:>48}: {value:.4g}" if isinstance(value, float) else f"{key:>48}: {value}")


if __name__ == "__main__":
    main()
