"""Evaluation speed and memory: ``simcal evaluate``, hotcoco alone and the official APIs, side by side.

Every engine evaluates the same files, end to end: each runs in its own process, timed from
after its imports to its metrics, reading the ground truth and results files included (the
official APIs' ``json.load`` too), so speed and peak memory are measured alike.

The 2k-image fixture (default): generated long-tailed LVIS-format data (2,000 images, 1,000
categories, 290-302 detections per image: about a third of the images past the 300 cap,
negatives and not-exhaustive classes), written as ``simcal predict`` writes results (one
detection per line); bbox is evaluated on the file with boxes and masks, segm on the same
detections with masks only (with a box in the file, lvis-api and pycocotools would take a mask's
size from its box; simcal takes it from the mask). Then the same data as a plain COCO json (COCO
rules, pycocotools as the official reference), and simcal's AP-fixed and AP-pool (no official
API computes them; compared with hotcoco alone under LVIS's protocol). Prints seconds, the
ratio to hotcoco alone and the speed-up over the official API, peak RSS, and the largest metric
difference from the official API over AP AP50 AP75 APs APm APl (APr APc APf under LVIS rules).
simcal and hotcoco alone run ``--repeat`` times (3), in turn, and their median run is shown (a
single run of either varies by about 5% on a shared machine); the official APIs run once.

    python benchmarks/eval_speed.py [--images 2000 --categories 1000 --fp-per-image 290 --repeat 3]

The official LVIS API (lvis 0.5.3) needs numpy < 2; it is patched (np.float = float) in its
worker process only. Goals (issue 27): simcal within 1.5x of hotcoco alone, at least 20x the
official API, the same numbers.

``--scale lvis_v1``: LVIS v1 val's size (19,809 images, 1,203 categories, about 300 detections
per image with masks: 5.9 M, written one per line with box and mask): ``simcal evaluate`` bbox
and segm under LVIS's protocol, AP-fixed and AP-pool, and hotcoco alone, with each process's
peak memory (simcal's: the process and its largest forked helper: the reader of the file's
second share, or the counter of the masks' areas).
The official API is left out at this size (its dicts of 5.9 M masks do not fit). Goal: segm
in 8 GB including reading.
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
    keep = ("id", "name", "instance_count", "image_count")  # the counts: simcal's bins, read by no engine
    cats = [{k: c[k] for k in keep if k in c} for c in gt["categories"]]
    return {"images": images, "annotations": gt["annotations"], "categories": cats}


def _peaks() -> tuple[float, float]:
    """Peak RSS (MiB) of this process since it started (``VmHWM``: not the parent's pages that a
    fork's ``ru_maxrss`` keeps across exec) and of its largest child (simcal's forked helpers: the
    reader of the file's second share, the counter of the masks' areas; a child counts the pages
    it shares with this process at the fork too)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
    except OSError:
        pass
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, child


def worker(engine: str, rules: str, gt_path: str, res_path: str, iou: str, protocol: str) -> None:
    """Evaluate in this process; print one json line with seconds, peak RSS (MiB) and metrics.

    ``simcal``: ``simcal evaluate``'s code path (``api.evaluate`` on the two files; a plain COCO
    json's categories carry the training counts for its bins); ``hotcoco``: hotcoco's own readers
    and evaluator; ``official``: lvis 0.5.3, or pycocotools under COCO rules, on ``json.load``.
    """
    keys = KEYS if rules == "lvis" else KEYS[:6]
    if engine == "simcal":
        import hotcoco  # noqa: F401 - imports are left out of every engine's time
        import msgspec  # noqa: F401

        import simcal.data.results  # noqa: F401
        import simcal.evaluation.lvis_eval  # noqa: F401
        from simcal import api

        t0 = time.perf_counter()
        r = api.evaluate(gt_path, res_path, iou=iou, protocol=protocol)
        seconds = time.perf_counter() - t0
        metrics = {k: (-1.0 if r.metrics[k] is None else r.metrics[k]) for k in keys}
    elif engine == "hotcoco":
        import contextlib
        import io

        import hotcoco

        t0 = time.perf_counter()
        coco_gt = hotcoco.COCO(gt_path)
        if rules == "coco":
            ev = hotcoco.COCOeval(coco_gt, coco_gt.load_res(res_path), iou)
        else:
            ev = hotcoco.LVISeval(coco_gt, hotcoco.LVISResults(coco_gt, res_path, max_dets=300), iou)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.run()
        seconds = time.perf_counter() - t0
        out = ev.get_results()
        metrics = {k: float(out[k]) for k in keys} if rules == "lvis" else dict(zip(keys, map(float, ev.stats[:6])))
    elif rules == "coco":
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(gt_path)
            with open(res_path) as f:
                results = json.load(f)
            ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        seconds = time.perf_counter() - t0
        metrics = dict(zip(keys, map(float, ev.stats[:6])))
    else:
        import logging

        import numpy as np

        np.float = float  # lvis 0.5.3 on numpy 2
        from lvis import LVIS, LVISEval, LVISResults

        logging.disable(logging.WARNING)
        t0 = time.perf_counter()
        lvis_gt = LVIS(gt_path)
        with open(res_path) as f:
            results = json.load(f)
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=300), iou)
        ev.run()
        seconds = time.perf_counter() - t0
        metrics = {k: float(ev.results[k]) for k in keys}
    own, child = _peaks()
    print(json.dumps({"seconds": seconds, "peak_mib": own, "child_peak_mib": child, "metrics": metrics}))


#: the table's order of engines under one protocol
_RANK = {"simcal": 0, "hotcoco": 1, "official": 2}


def _median_run(runs: list[dict]) -> dict:
    """The run of median seconds (the lower middle of an even number), its peaks the largest of
    all runs', and every run's seconds (``all_seconds``)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["peak_mib"] = max(r["peak_mib"] for r in runs)
    out["child_peak_mib"] = max(r["child_peak_mib"] for r in runs)
    out["all_seconds"] = [r["seconds"] for r in runs]
    return out


def run_worker(engine: str, rules: str, gt: Path, res: Path, iou: str, protocol: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, rules, str(gt), str(res), iou, protocol]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} {rules} {iou} {protocol} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_lines(path: Path, dets: list[dict]) -> None:
    """A results file as ``simcal predict`` writes it: one detection per line."""
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(d) for d in dets) + "\n]\n")


def _peak(r: dict) -> str:
    child = r.get("child_peak_mib", 0)
    return f"{r['peak_mib']:.0f}" + (f" (+{child:.0f})" if child > 50 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--categories", type=int, default=1000)
    ap.add_argument("--fp-per-image", type=int, default=290, help="false positives added per image")
    ap.add_argument("--iou", nargs="+", default=["bbox", "segm"])
    ap.add_argument("--rules", nargs="+", default=["lvis", "coco"], help="lvis json, or the same as plain COCO json")
    ap.add_argument("--engines", nargs="+", default=["simcal", "hotcoco", "official"])
    ap.add_argument("--protocols", nargs="*", default=["fixed", "pool"], help="simcal's other protocols (LVIS json)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of simcal and hotcoco alone, in turn; the median is shown"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the table as json here")
    ap.add_argument("--scale", choices=["small", "lvis_v1"], default="small", help="lvis_v1: LVIS v1 val's size")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.scale == "lvis_v1":
        lvis_v1(args)
        return

    from simcal.evaluation.perturb import perturb_ground_truth, random_lvis_gt

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt = random_lvis_gt(args.images, args.categories, seed=args.seed)
        results = perturb_ground_truth(gt, seed=args.seed + 1, false_positives=args.fp_per_image)
        per_img: dict[int, int] = {}
        for d in results:
            per_img[d["image_id"]] = per_img.get(d["image_id"], 0) + 1
        gts = {"lvis": Path(tmp, "gt.json"), "coco": Path(tmp, "gt_coco.json")}
        gts["lvis"].write_text(json.dumps(gt))
        gts["coco"].write_text(json.dumps(_strip_lvis(gt)))
        files = {"bbox": Path(tmp, "res.json"), "segm": Path(tmp, "res_segm.json")}
        write_lines(files["bbox"], results)
        write_lines(files["segm"], [{k: v for k, v in d.items() if k != "bbox"} for d in results])
        print(
            f"data: {args.images} images, {args.categories} categories, {len(gt['annotations'])} objects, "
            f"{len(results)} detections ({min(per_img.values())}-{max(per_img.values())} per image; "
            f"{files['bbox'].stat().st_size / 2**20:.0f} MiB with masks), made in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        rows = []
        for rules in args.rules:
            for iou in args.iou:
                res = files.get(iou, files["segm"])  # boundary IoU: the masks
                fast = [(e, "lvis") for e in args.engines if e != "official" and (iou != "boundary" or e == "simcal")]
                if rules == "lvis" and "simcal" in args.engines:
                    fast += [("simcal", protocol) for protocol in args.protocols]
                repeats: dict[tuple[str, str], list[dict]] = {}
                for _ in range(args.repeat):  # in turn, so a drift of the machine's speed reaches each alike
                    for engine, protocol in fast:
                        r = run_worker(engine, rules, gts[rules], res, iou, protocol)
                        repeats.setdefault((engine, protocol), []).append(r)
                runs = {key: _median_run(rs) for key, rs in repeats.items()}
                if "official" in args.engines and iou != "boundary":  # no official boundary IoU: simcal's alone
                    official = run_worker("official", rules, gts[rules], res, iou, "lvis")
                    runs["official", "lvis"] = _median_run([official])
                runs = dict(sorted(runs.items(), key=lambda kv: (kv[0][1] != "lvis", _RANK[kv[0][0]])))
                ref, hot = runs.get(("official", "lvis")), runs.get(("hotcoco", "lvis"))
                for (engine, protocol), r in runs.items():
                    same = ref is not None and protocol == "lvis"
                    rows.append(
                        {
                            "rules": rules,
                            "iou": iou,
                            "engine": engine,
                            "protocol": protocol,
                            "seconds": r["seconds"],
                            "vs_hotcoco": r["seconds"] / hot["seconds"] if hot else None,
                            "speedup_vs_official": ref["seconds"] / r["seconds"] if ref else None,
                            "peak_mib": r["peak_mib"],
                            "child_peak_mib": r["child_peak_mib"],
                            "max_metric_diff_vs_official": (
                                max(abs(r["metrics"][k] - ref["metrics"][k]) for k in r["metrics"]) if same else None
                            ),
                            "AP": r["metrics"]["AP"],
                            "all_seconds": r["all_seconds"],
                        }
                    )
                    each = ", ".join(f"{x:.2f}" for x in rows[-1]["all_seconds"])
                    line = f"  {rules} {iou} {engine} {protocol}: {r['seconds']:.2f} s ({each}), {_peak(r)} MiB"
                    print(line, flush=True)
    print()
    names = {"simcal": "`simcal evaluate`", "hotcoco": "hotcoco alone", "official": "official (lvis / pycocotools)"}
    head = "| rules | iou | engine | protocol | s | / hotcoco | speed-up vs official | peak MiB"
    print(head + " | max abs diff vs official | AP |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['vs_hotcoco']:.2f}" if r["vs_hotcoco"] is not None else "-"
        speed = f"{r['speedup_vs_official']:.1f}x" if r["speedup_vs_official"] is not None else "-"
        diff = f"{r['max_metric_diff_vs_official']:.1e}" if r["max_metric_diff_vs_official"] is not None else "-"
        print(
            f"| {r['rules']} | {r['iou']} | {names[r['engine']]} | {r['protocol']} | {r['seconds']:.2f} | {ratio} | "
            f"{speed} | {_peak(r)} | {diff} | {100 * r['AP']:.1f} |"
        )
    if args.out:
        from simcal.io import write_json

        write_json(args.out, rows, indent=1)


def lvis_v1(args: argparse.Namespace) -> None:
    """The ``--scale lvis_v1`` run: data of LVIS v1 val's size, detections with boxes and masks
    written one per line (as ``simcal predict`` writes them), simcal and hotcoco alone."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from simcal.evaluation.perturb import perturb_ground_truth, random_lvis_gt

    images, categories, per_image = 19809, 1203, 300
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt = random_lvis_gt(images, categories, seed=args.seed)
        gt_path, res_path = Path(tmp, "gt.json"), Path(tmp, "res.json")
        gt_path.write_text(json.dumps(gt))
        objects = np.bincount([a["image_id"] for a in gt["annotations"]], minlength=images + 1)
        sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
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
                by_image: dict[int, list[dict]] = {}
                for d in dets:
                    by_image.setdefault(d["image_id"], []).append(d)
                for image_id, group in by_image.items():  # each box's mask: the box, as perturb makes it
                    h, w = sizes[image_id]
                    rles = mask_utils.frPyObjects(np.array([d["bbox"] for d in group], dtype=np.float64), h, w)
                    for d, rle in zip(group, rles):
                        d["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                f.write(("\n" if total == 0 else ",\n") + ",\n".join(json.dumps(d) for d in dets))
                total += len(dets)
            f.write("\n]\n")
        del gt
        size = res_path.stat().st_size / 2**20
        print(
            f"data: {images} images, {categories} categories, {total} detections with masks "
            f"({res_path.name} {size:.0f} MiB), made in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        rows = []
        for iou in ("bbox", "segm"):
            for engine, protocol in (("simcal", "lvis"), ("simcal", "fixed"), ("simcal", "pool"), ("hotcoco", "lvis")):
                r = run_worker(engine, "lvis", gt_path, res_path, iou, protocol)
                rows.append({"iou": iou, "engine": engine, "protocol": protocol, **r})
                print(f"  {iou} {engine} {protocol}: {r['seconds']:.1f} s, {_peak(r)} MiB", flush=True)
    print()
    print("| iou | engine | protocol | s (read + evaluate) | peak MiB (+ largest forked helper) | AP |")
    print("|---|---|---|---:|---:|---:|")
    names = {"simcal": "`simcal evaluate`", "hotcoco": "hotcoco alone"}
    for r in rows:
        print(
            f"| {r['iou']} | {names[r['engine']]} | {r['protocol']} | {r['seconds']:.1f} | {_peak(r)} | "
            f"{100 * r['metrics']['AP']:.1f} |"
        )
    if args.out:
        from simcal.io import write_json

        write_json(args.out, rows, indent=1)


if __name__ == "__main__":
    main()
