"""``simcal demo``: the main job end to end on the embedded synthetic data.

Until the detector and SimCal land, the demo runs synth -> stats -> evaluate on a PERTURBED COPY
OF THE GROUND TRUTH (jittered boxes, missed objects, confused classes, false positives). It
exercises the data layer and the LVIS evaluator on real files; its AP says nothing about a model.
"""

from __future__ import annotations

import time
from pathlib import Path

from simcal.data.annotations import load_dataset, validate_results
from simcal.data.stats import BIN_PRESETS, category_stats
from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats
from simcal.evaluation.perturb import perturb_ground_truth
from simcal.io import write_json

BUDGETS = {
    "quick": dict(classes=32, train_images=300, val_images=200, size=96),
    "full": {},  # the synthetic defaults
}


def run_demo(out: Path, *, budget: str = "full", seed: int = 0) -> dict[str, dict]:
    """Run the demo into ``out`` and print the result tables; returns metrics per iou type."""
    from simcal.data.synthetic import generate_synthetic

    t0 = time.time()
    data_dir = out / "data"
    print(f"[1/3] simcal synth -> {data_dir} (budget {budget})")
    generate_synthetic(data_dir, seed=seed, **BUDGETS[budget])
    train = load_dataset(data_dir / "train.json")
    val = load_dataset(data_dir / "val.json")

    stats = category_stats(train, BIN_PRESETS["lvis"])
    groups = {g: sum(s.frequency == g for s in stats) for g in "rcf"}
    counts = sorted(s.instance_count for s in stats)
    print(
        f"[2/3] simcal stats: {len(stats)} classes (r {groups['r']}, c {groups['c']}, f {groups['f']}), "
        f"train instances per class {counts[0]}..{counts[-1]}"
    )

    print("[3/3] simcal evaluate: a perturbed copy of the val ground truth (no model is trained yet)")
    results = validate_results(perturb_ground_truth(val, seed=seed), val, "segm")
    write_json(out / "results_perturbed_gt.json", results)
    eval_stats = resolve_category_stats(val, str(data_dir / "val.json"), train)
    metrics = {}
    for iou in ("bbox", "segm"):
        r = evaluate(val, results, iou, eval_stats)
        write_json(out / f"metrics_{iou}.json", r.to_json(), indent=1)
        metrics[iou] = r.metrics
        print()
        print(r.table())
    print(f"\ndemo finished in {time.time() - t0:.0f} s; files in {out}")
    return metrics
