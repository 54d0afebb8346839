"""Evaluation speed and memory: simcal (faster-coco-eval + LVIS guards) vs the official LVIS API.

Both engines evaluate the same generated long-tailed LVIS-format data (default 2,000 images,
1,000 categories, up to 300 detections per image), bbox and segm, each in its own process so
peak memory is measured separately. Prints a table: both times, the ratio, each one's peak RSS,
and the largest metric difference over AP AP50 AP75 APs APm APl APr APc APf.

    python benchmarks/eval_speed.py [--images 2000 --categories 1000 --fp-per-image 290]

The official API (lvis 0.5.3) needs numpy < 2; it is patched (np.float = float) in its worker
process only. Goal (issue 2): >= 5x faster with identical numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def worker(engine: str, gt_path: str, res_path: str, iou: str) -> None:
    """Evaluate in this process; print one json line with seconds, peak RSS (MiB) and metrics."""
    with open(gt_path) as f:
        gt = json.load(f)
    with open(res_path) as f:
        results = json.load(f)
    drop = "bbox" if iou == "segm" else "segmentation"
    for d in results:  # both engines get the results in their correct form for this iou type
        d.pop(drop, None)
    t0 = time.perf_counter()
    if engine == "ours":
        from simcal.data.annotations import validate_dataset, validate_results
        from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats

        gt = validate_dataset(gt, gt_path)
        validate_results(results, gt, iou, res_path)
        r = evaluate(gt, results, iou, resolve_category_stats(gt, gt_path))
        metrics = {k: (-1.0 if r.metrics[k] is None else r.metrics[k]) for k in KEYS}
    else:
        import logging

        import numpy as np

        np.float = float  # lvis 0.5.3 on numpy 2
        from lvis import LVIS, LVISEval, LVISResults

        logging.disable(logging.WARNING)
        lvis_gt = LVIS.__new__(LVIS)
        lvis_gt.logger = logging.getLogger("lvis")
        lvis_gt.dataset = gt
        lvis_gt._create_index()
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=300), iou)
        ev.run()
        metrics = {k: float(ev.results[k]) for k in KEYS}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "metrics": metrics}))


def run_worker(engine: str, gt: Path, res: Path, iou: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, str(gt), str(res), iou]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} {iou} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--categories", type=int, default=1000)
    ap.add_argument("--fp-per-image", type=int, default=290, help="false positives added per image")
    ap.add_argument("--iou", nargs="+", default=["bbox", "segm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the table as json here")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    from simcal.evaluation.perturb import perturb_ground_truth, random_lvis_gt

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt = random_lvis_gt(args.images, args.categories, seed=args.seed)
        results = perturb_ground_truth(gt, seed=args.seed + 1, false_positives=args.fp_per_image)
        per_img: dict[int, int] = {}
        for d in results:
            per_img[d["image_id"]] = per_img.get(d["image_id"], 0) + 1
        gt_path, res_path = Path(tmp, "gt.json"), Path(tmp, "res.json")
        gt_path.write_text(json.dumps(gt))
        res_path.write_text(json.dumps(results))
        print(
            f"data: {args.images} images, {args.categories} categories, {len(gt['annotations'])} objects, "
            f"{len(results)} detections ({min(per_img.values())}-{max(per_img.values())} per image), "
            f"made in {time.perf_counter() - t0:.0f} s"
        )
        rows = []
        for iou in args.iou:
            ours = run_worker("ours", gt_path, res_path, iou)
            ref = run_worker("official", gt_path, res_path, iou)
            diff = max(abs(ours["metrics"][k] - ref["metrics"][k]) for k in KEYS)
            rows.append(
                {
                    "iou": iou,
                    "ours_s": ours["seconds"],
                    "official_s": ref["seconds"],
                    "speedup": ref["seconds"] / ours["seconds"],
                    "ours_peak_mib": ours["peak_mib"],
                    "official_peak_mib": ref["peak_mib"],
                    "max_metric_diff": diff,
                    "AP": ours["metrics"]["AP"],
                }
            )
            print(f"  {iou}: ours {ours['seconds']:.1f} s, official {ref['seconds']:.1f} s", flush=True)
    print()
    print("| iou  | simcal s | official s | speed-up | simcal peak MiB | official peak MiB | max |diff| | AP |")
    print("|------|---------:|-----------:|---------:|----------------:|------------------:|-----------:|---:|")
    for r in rows:
        print(
            f"| {r['iou']:<4} | {r['ours_s']:8.1f} | {r['official_s']:10.1f} | {r['speedup']:7.1f}x | "
            f"{r['ours_peak_mib']:15.0f} | {r['official_peak_mib']:17.0f} | "
            f"{r['max_metric_diff']:10.1e} | {100 * r['AP']:.1f} |"
        )
    if args.out:
        from simcal.io import write_json

        write_json(args.out, rows, indent=1)


if __name__ == "__main__":
    main()
