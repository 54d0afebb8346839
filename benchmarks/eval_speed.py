"""Evaluation speed and memory: ``simcal evaluate``, hotcoco alone and the official APIs, side by side.

Every engine evaluates the same generated long-tailed LVIS-format data (default 2,000 images,
1,000 categories, 290-302 detections per image: about a third of the images past the 300 cap,
negatives and not-exhaustive classes), bbox and segm, each in its own process so peak memory is
measured separately; then the same data as a plain COCO json (COCO rules, pycocotools as the
official reference). Prints a table: seconds, the speed-up over the official API, peak RSS, and
the largest metric difference from the official API over AP AP50 AP75 APs APm APl (APr APc APf
under LVIS rules). ``simcal`` is timed from the results file (reading and validating it
included); the other engines from the parsed json.

    python benchmarks/eval_speed.py [--images 2000 --categories 1000 --fp-per-image 290]

The official LVIS API (lvis 0.5.3) needs numpy < 2; it is patched (np.float = float) in its
worker process only. Goal: identical numbers, and the evaluation an order of magnitude faster.

``--scale lvis_v1``: memory at LVIS v1 val size (19,809 images, 1,203 categories, about 300 box
detections per image: 5.9 M), under LVIS's per-image cap and AP-fixed's 10,000 per class, for
``simcal evaluate --iou bbox`` (the results file streamed into columns) against the same
evaluation of the file read as Python dicts (``simcal-dicts``, what it did before). Goal: peak
under 4 GB including reading the file, and every metric identical between the two.
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


def _strip_lvis(gt: dict) -> dict:
    """The same data as a plain COCO json (no LVIS image or category fields): COCO rules apply."""
    images = [
        {k: v for k, v in im.items() if k not in ("neg_category_ids", "not_exhaustive_category_ids")}
        for im in gt["images"]
    ]
    cats = [{"id": c["id"], "name": c["name"]} for c in gt["categories"]]
    return {"images": images, "annotations": gt["annotations"], "categories": cats}


def worker(engine: str, gt_path: str, res_path: str, iou: str, protocol: str = "lvis") -> None:
    """Evaluate in this process; print one json line with seconds, peak RSS (MiB) and metrics.

    Engines: ``simcal`` (``simcal evaluate``'s code path, timed from the results file: read and
    validated, as columns for bbox), ``simcal-dicts`` (the same evaluation of the whole file read
    as dicts, reading included), ``hotcoco`` (hotcoco's LVISeval alone) and ``official`` (lvis
    0.5.3), timed from parsed dicts; with a ``-coco`` suffix the data is given as a plain COCO json
    and ``official-coco`` is pycocotools. ``protocol``: simcal's only.
    """
    coco_rules = engine.endswith("-coco")
    engine = engine.removesuffix("-coco")
    keys = KEYS if not coco_rules else KEYS[:6]
    if engine == "simcal":  # the command's path: the results file read and validated by simcal
        from simcal import api

        gt_for = _strip_lvis(json.loads(Path(gt_path).read_text())) if coco_rules else gt_path
        t0 = time.perf_counter()  # plain COCO: the bins' counts from the LVIS version of the file
        r = api.evaluate(gt_for, res_path, iou=iou, protocol=protocol, train=gt_path if coco_rules else None)
        seconds = time.perf_counter() - t0
        metrics = {k: (-1.0 if r.metrics[k] is None else r.metrics[k]) for k in keys}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "peak_mib": peak, "metrics": metrics}))
        return
    with open(gt_path) as f:
        gt = json.load(f)
    t0 = time.perf_counter()
    with open(res_path) as f:
        results = json.load(f)
    if coco_rules:
        gt = _strip_lvis(gt)
    drop = "segmentation" if iou == "bbox" else "bbox"
    for d in results:  # every engine gets the results in their correct form for this iou type
        d.pop(drop, None)
    if engine != "simcal-dicts":
        t0 = time.perf_counter()  # the other engines' times leave reading the file out, as before
    if engine == "simcal-dicts":
        from simcal.data.annotations import validate_dataset
        from simcal.data.results import validate_results
        from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats

        gt = validate_dataset(gt, gt_path)
        validate_results(results, gt, iou, res_path)
        # plain COCO: the counts (only the bins depend on them) from the LVIS version of the file
        train = validate_dataset(json.loads(Path(gt_path).read_text()), gt_path) if coco_rules else None
        r = evaluate(gt, results, iou, resolve_category_stats(gt, gt_path, train, gt_path), protocol=protocol)
        metrics = {k: (-1.0 if r.metrics[k] is None else r.metrics[k]) for k in keys}
    elif engine == "hotcoco":
        import contextlib
        import io

        import hotcoco

        coco_gt = hotcoco.COCO(gt)
        if coco_rules:
            ev = hotcoco.COCOeval(coco_gt, coco_gt.load_res(results), iou)
        else:
            ev = hotcoco.LVISeval(coco_gt, hotcoco.LVISResults(coco_gt, results, max_dets=300), iou)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.run()
        out = ev.get_results()
        metrics = {k: float(out[k]) for k in keys} if not coco_rules else dict(zip(keys, map(float, ev.stats[:6])))
    elif coco_rules:
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics = dict(zip(keys, map(float, ev.stats[:6])))
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
        metrics = {k: float(ev.results[k]) for k in keys}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "metrics": metrics}))


def run_worker(engine: str, gt: Path, res: Path, iou: str, protocol: str = "lvis") -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, str(gt), str(res), iou, protocol]
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
    ap.add_argument("--rules", nargs="+", default=["lvis", "coco"], help="lvis json, or the same as plain COCO json")
    ap.add_argument("--engines", nargs="+", default=["simcal", "hotcoco", "official"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the table as json here")
    ap.add_argument("--scale", choices=["small", "lvis_v1"], default="small", help="lvis_v1: the memory run")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.scale == "lvis_v1":
        lvis_v1_memory(args)
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
        for rules in args.rules:
            suffix = "" if rules == "lvis" else "-coco"
            for iou in args.iou:
                runs = {e: run_worker(e + suffix, gt_path, res_path, iou) for e in args.engines}
                ref = runs.get("official") or next(iter(runs.values()))
                for engine, r in runs.items():
                    diff = max(abs(r["metrics"][k] - ref["metrics"][k]) for k in r["metrics"])
                    rows.append(
                        {
                            "rules": rules,
                            "iou": iou,
                            "engine": engine,
                            "seconds": r["seconds"],
                            "speedup_vs_official": ref["seconds"] / r["seconds"],
                            "peak_mib": r["peak_mib"],
                            "max_metric_diff_vs_official": diff,
                            "AP": r["metrics"]["AP"],
                        }
                    )
                    print(f"  {rules} {iou} {engine}: {r['seconds']:.1f} s, {r['peak_mib']:.0f} MiB", flush=True)
    print()
    names = {"simcal": "`simcal evaluate`", "hotcoco": "hotcoco alone", "official": "official (lvis / pycocotools)"}
    print("| rules | iou | engine | s | speed-up vs official | peak MiB | max abs diff vs official | AP |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['rules']} | {r['iou']} | {names[r['engine']]} | {r['seconds']:.1f} | "
            f"{r['speedup_vs_official']:.1f}x | {r['peak_mib']:.0f} | {r['max_metric_diff_vs_official']:.1e} | "
            f"{100 * r['AP']:.1f} |"
        )
    if args.out:
        from simcal.io import write_json

        write_json(args.out, rows, indent=1)


def lvis_v1_memory(args: argparse.Namespace) -> None:
    """The ``--scale lvis_v1`` run: data of LVIS v1 val's size, box results written one detection
    per line (as ``simcal predict`` writes them), ``simcal`` against ``simcal-dicts``."""
    import numpy as np

    from simcal.evaluation.perturb import perturb_ground_truth, random_lvis_gt

    images, categories, per_image = 19809, 1203, 300
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt = random_lvis_gt(images, categories, seed=args.seed)
        gt_path, res_path = Path(tmp, "gt.json"), Path(tmp, "res.json")
        gt_path.write_text(json.dumps(gt))
        objects = np.bincount([a["image_id"] for a in gt["annotations"]], minlength=images + 1)
        total = 0
        with open(res_path, "w") as f:
            f.write("[")
            step = 1000
            for s in range(0, images, step):  # a slice of images at a time: the parent stays small
                part = gt["images"][s : s + step]
                ids = {im["id"] for im in part}
                sub = {**gt, "images": part, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
                fp = max(0, per_image - int(np.median(objects[list(ids)])))
                dets = perturb_ground_truth(sub, seed=args.seed + 1 + s, false_positives=fp, iou_type="bbox")
                f.write(("\n" if total == 0 else ",\n") + ",\n".join(json.dumps(d) for d in dets))
                total += len(dets)
            f.write("\n]\n")
        del gt
        size = res_path.stat().st_size / 2**20
        print(
            f"data: {images} images, {categories} categories, {total} box detections "
            f"({res_path.name} {size:.0f} MiB), made in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        rows = []
        for protocol in ("lvis", "fixed"):
            runs = {e: run_worker(e, gt_path, res_path, "bbox", protocol) for e in ("simcal", "simcal-dicts")}
            ref = runs["simcal-dicts"]
            for engine, r in runs.items():
                diff = max(abs(r["metrics"][k] - ref["metrics"][k]) for k in r["metrics"])
                rows.append({"protocol": protocol, "engine": engine, **r, "max_diff_vs_dicts": diff})
                print(f"  {protocol} {engine}: {r['seconds']:.1f} s, {r['peak_mib']:.0f} MiB", flush=True)
    print()
    print("| protocol | reads the results as | s (read + evaluate) | peak MiB | max abs metric diff | AP |")
    print("|---|---|---:|---:|---:|---:|")
    names = {"simcal": "columns, streamed (`simcal evaluate`)", "simcal-dicts": "Python dicts (json.load)"}
    for r in rows:
        print(
            f"| {r['protocol']} | {names[r['engine']]} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | "
            f"{r['max_diff_vs_dicts']:.1e} | {100 * r['metrics']['AP']:.1f} |"
        )
    if args.out:
        from simcal.io import write_json

        write_json(args.out, rows, indent=1)


if __name__ == "__main__":
    main()
