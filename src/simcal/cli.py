"""The ``simcal`` command: argument parsing only; each subcommand calls one library function.

Bad input ends with one line ``simcal: error: FILE: FIELD: message`` and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from simcal import __version__
from simcal.errors import InputError, SimcalError


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


# --------------------------------------------------------------------------- synth
def cmd_synth(args: argparse.Namespace) -> int:
    from simcal.data.synthetic import generate_synthetic

    try:
        summary = generate_synthetic(
            args.out,
            classes=args.classes,
            train_images=args.train_images,
            val_images=args.val_images,
            size=args.size,
            seed=args.seed,
            mask_format=args.mask_format,
        )
    except ValueError as e:
        raise InputError("simcal synth", "arguments", str(e)) from None
    print(json.dumps(summary, indent=2))
    return 0


# --------------------------------------------------------------------------- stats
def cmd_stats(args: argparse.Namespace) -> int:
    from simcal.data.annotations import load_dataset
    from simcal.data.stats import bin_labels, category_stats, parse_bins

    edges = parse_bins(args.bins)
    stats = category_stats(load_dataset(args.annotations), edges)
    labels = bin_labels(edges)
    if args.json:
        print(
            json.dumps({"bins": labels, "bin_edges": list(edges), "categories": [s.as_dict() for s in stats]}, indent=1)
        )
        return 0
    print(f"{'id':>6} {'name':<28} {'images':>8} {'instances':>10} freq  bin")
    for s in stats:
        print(f"{s.id:>6} {s.name[:28]:<28} {s.image_count:>8} {s.instance_count:>10}    {s.frequency}  {s.bin + 1}")
    print()
    groups = {g: sum(s.frequency == g for s in stats) for g in "rcf"}
    print(f"{len(stats)} categories: rare {groups['r']}, common {groups['c']}, frequent {groups['f']}")
    for i, lab in enumerate(labels):
        members = [s for s in stats if s.bin == i]
        print(
            f"bin {i + 1} {lab:<14} {len(members):>5} categories, {sum(s.instance_count for s in members):>9} instances"
        )
    return 0


# --------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from simcal.data.annotations import load_dataset, load_results
    from simcal.data.stats import parse_bins
    from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats, write_per_class_csv
    from simcal.io import write_json

    edges = parse_bins(args.bins)
    gt = load_dataset(args.gt)
    train = load_dataset(args.train) if args.train else None
    stats = resolve_category_stats(gt, str(args.gt), train, str(args.train), edges)
    results = load_results(args.results, gt, args.iou)
    result = evaluate(gt, results, args.iou, stats, edges, chunk_categories=args.chunk_categories)
    print(result.table())
    if args.out:
        write_json(args.out, result.to_json(), indent=1)
        print(f"metrics written to {args.out}")
    if args.per_class:
        write_per_class_csv(result, args.per_class)
        print(f"per-class AP written to {args.per_class}")
    return 0


# --------------------------------------------------------------------------- coco-lt
def cmd_coco_lt(args: argparse.Namespace) -> int:
    from simcal.data.annotations import load_dataset
    from simcal.data.coco_lt import build_coco_lt
    from simcal.io import write_json

    coco = load_dataset(args.coco)
    out = build_coco_lt(coco, seed=args.seed, source=str(args.coco))
    write_json(args.out, out)
    print(
        f"COCO-LT: {len(out['images'])} images, {len(out['annotations'])} instances "
        f"(from {len(coco['images'])} images, {len(coco['annotations'])} instances) -> {args.out}"
    )
    return 0


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from simcal.config import load_config
    from simcal.engine.train import train

    if args.resume and args.config is None:
        cfg = None
        if args.overrides:
            raise InputError("simcal train", "overrides", "a resumed run keeps its own config.yaml")
    else:
        if args.config is None:
            raise InputError("simcal train", "--config", "required for a new run")
        cfg = load_config(args.config, args.overrides)
    final = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"final weights: {final}")
    return 0


# --------------------------------------------------------------------------- calibrate
def cmd_calibrate(args: argparse.Namespace) -> int:
    from simcal.engine.calibrate import calibrate

    overrides = {
        "head": args.head,
        "layers": args.layers,
        "steps": args.steps,
        "classes_per_batch": args.classes_per_batch,
        "loss": args.loss,
        "sampler": args.sampler,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }
    head = calibrate(
        args.run,
        overrides,
        name=args.name,
        resume=args.resume,
        snapshot_every=args.snapshot_every,
        progress=not args.no_progress,
    )
    print(f"calibrated head: {head}")
    return 0


# --------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    from simcal.engine.predict import predict

    predict(
        args.run,
        heads=_names(args.head),
        combine_name=args.combine,
        T=args.T,
        param=args.param,
        calibration=args.calibration,
        split=args.split,
        gt_json=args.gt,
        images=args.images,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        max_images=args.max_images,
        progress=not args.no_progress,
        evaluate_results=not args.no_eval,
    )
    return 0


# --------------------------------------------------------------------------- analyze
def cmd_analyze(args: argparse.Namespace) -> int:
    from simcal.engine import analyze as an

    common = dict(split=args.split, max_images=args.max_images, progress=not args.no_progress)
    if args.tool == "recall":
        out = an.analyze_recall(args.run, **common)
        print(f"proposal AR@100 {100 * out['AR@100']:.1f}  AR@1000 {100 * out['AR@1000']:.1f}")
    elif args.tool == "oracle":
        out = an.analyze_oracle(args.run, iou=args.iou, **common)
        _print_rows(out["heads"])
    elif args.tool == "sweep-T":
        Ts = tuple(float(t) for t in args.T.split(",")) if args.T else an.DEFAULT_TS
        out = an.analyze_sweep_T(args.run, Ts=Ts, iou=args.iou, calibration=args.calibration, **common)
        _print_rows({f"T={r['T']:g}": {k: v for k, v in r.items() if k != "T"} for r in out["sweep"]})
    elif args.tool == "dynamics":
        out = an.analyze_dynamics(args.run, calibration=args.calibration or "3fc_ft", iou=args.iou, **common)
        _print_rows({f"cal @{r['step']}": r["cal"] for r in out["steps"]})
    else:
        heads = _names(args.heads) if args.heads else None
        out = an.analyze_confusion(args.run, split=args.split, gt_json=args.gt, heads=heads, iou=args.iou)
        print("rows: AP as is, without the detections on rare/common objects, without any on other-class objects")
        for head, r in out["heads"].items():
            n = r["dets_on_other_objects"]
            print(f"{head}: detections (score >= {out['score']:g}) on other-class objects, class -> object group:")
            print("   " + "  ".join(f"{a}->{b} {n[a][b]}" for a in "rcf" for b in "rcf"))
            _print_rows(dict(zip(an.CONFUSION_LABELS, (r[k] for k in an.CONFUSION_VARIANTS))))
    print(f"written to {args.run / 'analysis'}")
    return 0


def _names(text: str) -> list[str]:
    """A comma-separated option's names (``orig,cal, dual`` -> ``["orig", "cal", "dual"]``)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _print_rows(rows: dict[str, dict[str, float | None]]) -> None:
    keys = list(next(iter(rows.values())))
    print(f"{'':>12} " + " ".join(f"{k:>6}" for k in keys))
    for name, r in rows.items():
        print(f"{name:>12} " + " ".join(f"{'-':>6}" if r[k] is None else f"{r[k]:6.1f}" for k in keys))


# --------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from simcal.report.html import build_report

    page = build_report(args.run, split=args.split, out=args.out, gallery_images=args.gallery, score_thresh=args.score)
    print(f"report: {page}")
    return 0


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from simcal.demo import run_demo

    run_demo(
        Path(args.out),
        budget=args.budget,
        seed=args.seed,
        seeds=args.seeds,
        compare=args.compare,
        progress=not args.no_progress,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simcal",
        description="Long-tail instance segmentation: Mask R-CNN, SimCal calibration, LVIS evaluation.",
    )
    p.add_argument("--version", action="version", version=f"simcal {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="generate the synthetic long-tail dataset (images + LVIS json)")
    from simcal.data import synthetic as _syn

    s.add_argument("--out", required=True, type=Path, help="output directory")
    s.add_argument(
        "--classes", type=_positive_int, default=_syn.DEFAULT_CLASSES, help="number of classes (default %(default)s)"
    )
    s.add_argument("--train-images", type=_positive_int, default=_syn.DEFAULT_TRAIN_IMAGES, help="default %(default)s")
    s.add_argument("--val-images", type=_positive_int, default=_syn.DEFAULT_VAL_IMAGES, help="default %(default)s")
    s.add_argument("--size", type=_positive_int, default=128, help="image side in pixels (default %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mask-format", choices=["polygon", "rle"], default="polygon")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("stats", help="per-class image/instance counts, r/c/f groups and instance bins")
    s.add_argument("annotations", type=Path, help="COCO or LVIS json (a training split)")
    s.add_argument("--json", action="store_true", help="print json instead of a table")
    s.add_argument("--bins", default="lvis", help="lvis, coco-lt or inner edges E1,E2,E3 (default %(default)s)")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("evaluate", help="LVIS/COCO AP, APr/APc/APf and instance-bin AP of a results json")
    s.add_argument("--gt", required=True, type=Path, help="ground truth json (LVIS or COCO)")
    s.add_argument("--results", required=True, type=Path, help="results json: a list of detections")
    s.add_argument("--iou", choices=["bbox", "segm"], default="segm", help="default %(default)s")
    s.add_argument("--train", type=Path, help="training json for the counts (default: the gt categories' fields)")
    s.add_argument("--bins", default="lvis", help="lvis, coco-lt or inner edges E1,E2,E3 (default %(default)s)")
    s.add_argument("--out", type=Path, help="write metrics json here")
    s.add_argument("--per-class", type=Path, help="write per-class AP csv here")
    s.add_argument(
        "--chunk-categories",
        type=_positive_int,
        default=None,
        help="categories per evaluation pass (default: automatic, by size)",
    )
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("coco-lt", help="build the COCO-LT training json from COCO train2017")
    s.add_argument("--coco", required=True, type=Path, help="instances_train2017.json")
    s.add_argument("--out", required=True, type=Path, help="output json")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_coco_lt)

    s = sub.add_parser("train", help="train a Mask R-CNN (torchrun-aware) into a run directory")
    s.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml)")
    s.add_argument("--out", required=True, type=Path, help="run directory")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.loss=focal train.sampler=repeat_factor")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "calibrate", help="SimCal: bi-level calibration of the classification head on the frozen detector"
    )
    s.add_argument("--run", required=True, type=Path, help="trained run directory")
    s.add_argument("--head", choices=["3fc_ft", "2fc_rand", "3fc_rand", "ncm"], help="default 3fc_ft")
    s.add_argument("--layers", choices=["all3", "last2", "last1"], help="which head layers train (default all3)")
    s.add_argument("--steps", type=_positive_int, help="default: the run config's (paper: 12000)")
    s.add_argument("--classes-per-batch", type=_positive_int, help="default 16")
    s.add_argument("--loss", choices=["ce", "lr", "focal", "cm"], help="default ce")
    s.add_argument("--sampler", choices=["bilevel", "random", "repeat_factor"], help="default bilevel")
    s.add_argument("--lr", type=float, help="default 0.01")
    s.add_argument("--momentum", type=float, help="default 0.9 (the released code used 0)")
    s.add_argument("--weight-decay", type=float, help="default 0.0001 (the released code used 0)")
    s.add_argument("--seed", type=int)
    s.add_argument("--name", help="output name under RUN/calibration (default from the settings)")
    s.add_argument("--snapshot-every", type=int, default=0, help="also save the head every K steps (dynamics)")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("predict", help="run a trained detector on a split: LVIS results json + metrics")
    s.add_argument("--run", required=True, type=Path, help="run directory")
    s.add_argument("--split", default="val", help="val or train (from the run's config), or a name for --gt")
    s.add_argument(
        "--head",
        default="orig",
        help="orig | cal | dual | norcal | logit-adj; comma-separate several to share one pass",
    )
    s.add_argument(
        "--combine",
        default=None,
        help="dual-head combiner: sel (default), avg, cal-only, orig, sel-thr, sel-scale, sel-norm, det",
    )
    s.add_argument("--T", type=float, default=None, help="sel threshold on training instances (default 300)")
    s.add_argument("--param", type=float, default=1.0, help="gamma for norcal, tau for logit-adj (default 1)")
    s.add_argument("--calibration", help="calibrated head name under RUN/calibration (default: 3fc_ft)")
    s.add_argument("--gt", help="annotations json instead of the config's split")
    s.add_argument("--images", help="image folder for --gt")
    s.add_argument("--checkpoint", help="weights file (default: RUN/model_final.pth)")
    s.add_argument("--batch-size", type=_positive_int, default=8)
    s.add_argument("--max-images", type=_positive_int, default=None, help="only the first N images")
    s.add_argument("--no-eval", action="store_true", help="write results only")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        "analyze", help="analysis tools: proposal recall, props-gt oracle, T sweep, dynamics, confusion sources"
    )
    s.add_argument("tool", choices=["recall", "oracle", "sweep-T", "dynamics", "confusion"])
    s.add_argument("--run", required=True, type=Path)
    s.add_argument("--split", default="val")
    s.add_argument("--max-images", type=_positive_int, default=None)
    s.add_argument("--iou", choices=["bbox", "segm"], default="bbox")
    s.add_argument("--T", help="sweep-T values, comma-separated (default 10,20,50,100,200,300,500,1000)")
    s.add_argument("--calibration", help="calibrated head name (default 3fc_ft)")
    s.add_argument("--gt", help="confusion: annotations of --split when it is not the config's val / train")
    s.add_argument("--heads", help="confusion: predictions/<split>/<head> to read, comma-separated (default all)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser(
        "report", help="one self-contained HTML page (and PNGs) about a run: tables, plots, detection gallery"
    )
    s.add_argument("--run", required=True, type=Path)
    s.add_argument("--split", default="val", help="the predictions/<split> to report (default %(default)s)")
    s.add_argument("--out", type=Path, default=None, help="folder for index.html and PNGs (default RUN/report)")
    s.add_argument("--gallery", type=int, default=8, help="images in the low-shot gallery (default %(default)s)")
    s.add_argument(
        "--score",
        type=float,
        default=None,
        help="gallery: show detections scoring at least this (default: each head's top N, N = objects in the image)",
    )
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("demo", help="the main job end to end on the synthetic data, ending in a table and a report")
    s.add_argument("--out", default="runs/demo", help="working directory (default %(default)s)")
    s.add_argument("--budget", choices=["quick", "full"], default="full", help="quick: a ~3 min smoke run")
    s.add_argument("--seeds", type=_positive_int, default=1, help="training seeds; >1 adds median and mean +- std")
    s.add_argument(
        "--compare", action="store_true", help="also calibrate the decoupled baselines LR / FL / CM / IS (Table 4)"
    )
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--seed", type=int, default=0, help="seed of the data and of the first training run")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SimcalError as e:
        print(f"simcal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simcal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
