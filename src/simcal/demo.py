"""``simcal demo``: the paper's Table 3 in miniature, end to end on the embedded synthetic data.

synth -> train (configs/synthetic_cpu.yaml) -> calibrate (SimCal) -> predict with the original,
calibrated and dual heads in one pass -> evaluate -> a table shaped like the paper's Table 3
(AP1..AP4, APr/APc/APf, AP; box and mask). Every stage is skipped when its output exists and
resumes when it was interrupted, so running the demo again continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from simcal.config import load_config
from simcal.data.stats import BIN_PRESETS, category_stats
from simcal.engine.checkpoint import FINAL, LAST
from simcal.errors import InputError
from simcal.io import read_json, write_json

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "synthetic_cpu.yaml"

#: Data, training and calibration sizes per budget. ``full`` is the synthetic_cpu preset itself.
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {
        "synth": dict(classes=24, train_images=300, val_images=150, size=96),
        "overrides": [
            "model.min_size=96",
            "model.max_size=96",
            "train.max_iter=60",
            "train.steps=[45, 55]",
            "train.warmup_iters=10",
            "train.checkpoint_period=20",
            "calibration.steps=40",
            "calibration.checkpoint_period=20",
        ],
    },
    "full": {"synth": {}, "overrides": []},
}
HEADS = ("orig", "cal", "dual")
TABLE_KEYS = ("AP1", "AP2", "AP3", "AP4", "APr", "APc", "APf", "AP")


def _fmt(v: float | None) -> str:
    return f"{'-':>5}" if v is None else f"{100 * v:5.1f}"


def results_table(metrics: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """Markdown table: one row per (head, box/mask), Table 3's columns, values in percent."""
    names = {"orig": "original", "cal": "calibrated only", "dual": "dual head (SimCal)"}
    lines = ["| head | AP on | " + " | ".join(TABLE_KEYS) + " |", "|---|---|" + "---:|" * len(TABLE_KEYS)]
    for iou, label in (("bbox", "box"), ("segm", "mask")):
        for head in HEADS:
            m = metrics[head][iou]
            lines.append(f"| {names[head]} | {label} | " + " | ".join(_fmt(m[k]) for k in TABLE_KEYS) + " |")
    return "\n".join(lines)


def run_demo(out: Path, *, budget: str = "full", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo in ``out``; print and return the table's metrics."""
    from simcal.data.synthetic import generate_synthetic
    from simcal.engine.calibrate import HEAD, calibrate, calibration_dir
    from simcal.engine.predict import predict
    from simcal.engine.train import train

    if not PRESET.is_file():
        raise InputError(PRESET, "(file)", "the demo runs from a simcal checkout (configs/synthetic_cpu.yaml)")
    spec = BUDGETS[budget]
    data, run = out / "data", out / "run"
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    params = {**spec["synth"], "seed": seed}
    if (
        (data / "val.json").exists()
        and (data / "demo_synth.json").exists()
        and read_json(data / "demo_synth.json") == params
    ):
        print(f"[1/4] synthetic data: {data} (exists)")
    else:
        print(f"[1/4] simcal synth -> {data}")
        generate_synthetic(data, progress=progress, **params)
        write_json(data / "demo_synth.json", params)
    train_json = read_json(data / "train.json")
    stats = category_stats(train_json, BIN_PRESETS["lvis"])
    groups = {g: sum(s.frequency == g for s in stats) for g in "rcf"}
    counts = sorted(s.instance_count for s in stats)
    print(
        f"      {len(stats)} classes (rare {groups['r']}, common {groups['c']}, frequent {groups['f']}), "
        f"{counts[0]}..{counts[-1]} training instances per class, {len(train_json['images'])} training images"
    )
    times["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    overrides = [
        f"data.train_json={data / 'train.json'}",
        f"data.train_images={data / 'images'}",
        f"data.val_json={data / 'val.json'}",
        f"data.val_images={data / 'images'}",
        f"train.seed={seed}",
        f"calibration.seed={seed}",
        *spec["overrides"],
    ]
    if (run / FINAL).exists():
        print(f"[2/4] train: {run / FINAL} (exists)")
    else:
        resume = (run / LAST).exists()
        print(f"[2/4] simcal train -> {run}{' (resuming)' if resume else ''}")
        train(None if resume else load_config(PRESET, overrides), run, resume=resume, progress=progress)
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    head = calibration_dir(run, "3fc_ft") / HEAD
    if head.exists():
        print(f"[3/4] calibrate: {head} (exists)")
    else:
        resuming = (calibration_dir(run, "3fc_ft") / "checkpoint.pth").exists()
        print(f"[3/4] simcal calibrate (bi-level sampling, frozen detector){' (resuming)' if resuming else ''}")
        calibrate(run, resume=resuming, progress=progress)
    times["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[4/4] simcal predict --head orig,cal,dual (one pass) + evaluate")
    predict(run, heads=list(HEADS), progress=progress)
    times["predict"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    metrics = {
        h: {iou: read_json(run / "predictions" / "val" / h / f"metrics_{iou}.json") for iou in ("bbox", "segm")}
        for h in HEADS
    }
    table = results_table(metrics)
    summary = {
        "budget": budget,
        "seed": seed,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "metrics": {h: {iou: {k: metrics[h][iou][k] for k in TABLE_KEYS} for iou in m} for h, m in metrics.items()},
    }
    write_json(out / "demo_results.json", summary, indent=1)
    (out / "demo_results.md").write_text(table + "\n")
    print()
    print(
        f"simcal demo ({budget}), val split of the synthetic set, bins on training instances "
        "[0,10) [10,100) [100,1000) [1000,inf):"
    )
    print(table)
    print(
        f"\nwall time {times['total'] / 60:.1f} min "
        f"(train {times['train'] / 60:.1f}, calibrate {times['calibrate'] / 60:.1f}, "
        f"predict+evaluate {times['predict'] / 60:.1f}); files in {out}"
    )
    return json.loads(json.dumps(summary))
