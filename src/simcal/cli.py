"""The ``simcal`` command: one table of subcommands (name, arguments, handler); parsing only.

Each handler calls the Python API (:mod:`simcal.api`) or a library function. ``train``,
``calibrate`` and ``predict`` take ``section.key=value`` overrides after their options; their
flags that set a config value (``calibrate --steps``, ``predict --T``) are aliases of an
override. Bad input ends with one line ``simcal: error: FILE: FIELD: message`` and exit code 2,
never a traceback. Building the parser imports only the standard library and
:mod:`simcal.choices`, so ``simcal --version`` and ``--help`` are instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simcal import __version__, choices
from simcal.errors import (
    DEBUG_ENV,
    InputError,
    SimcalError,
    Terminated,
    debug_requested,
    describe_os_error,
    handle_signals,
    loader_worker_died,
    peer_rank_lost,
    restore_signals,
    signal_received,
    stopped_line,
    worker_stopped_by,
)


# --------------------------------------------------------------------------- argument types
def _int_at_least(minimum: int, maximum: int = choices.MAX_COUNT) -> Callable[[str], int]:
    """An integer in ``[minimum, maximum]``: every count has a bound that memory and the machine's
    integer types can hold (``maximum``; seeds below 2^32, as numpy's generators need)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        if v > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum} (what memory holds), got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)
_seed = _int_at_least(0, choices.MAX_SEED)
_image_count = _int_at_least(1, choices.MAX_IMAGES)
_steps = _int_at_least(1, choices.MAX_STEPS)


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _probability(text: str) -> float:
    v = _number(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _open_unit(text: str) -> float:
    """A number strictly between 0 and 1 (a confidence level)."""
    v = _number(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


def _numbers(text: str) -> tuple[float, ...]:
    """A comma-separated list of non-negative numbers (``10,100,1000``)."""
    try:
        values = tuple(_number(t) for t in text.split(",") if t.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    """A comma-separated option's names (``orig,cal, dual`` -> ``["orig", "cal", "dual"]``)."""
    return [n.strip() for n in text.split(",") if n.strip()]


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Option:
    """One argument: argparse's flags and keyword arguments; ``alias``: the config key it sets."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    alias: str | None = None


#: why every ``--run`` has a ``--run-dir`` spelling
RUN_DIR_NOTE = "(--run-dir: the same, for torchrun, whose own parser takes --run for its --run-path)"


def opt(*flags: str, alias: str | None = None, **kwargs: Any) -> Option:
    return Option(flags, kwargs, alias)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, arguments and handler.

    ``overrides``: help for trailing ``section.key=value`` arguments (``None``: not accepted).
    """

    name: str
    help: str
    handler: Callable[[argparse.Namespace], int]
    options: tuple[Option, ...] = ()
    overrides: str | None = None


def _alias_overrides(command: Command, args: argparse.Namespace) -> list[str]:
    """The aliased flags that were given, as overrides, then the trailing ``section.key=value`` ones."""
    out = []
    for o in command.options:
        if o.alias is None:
            continue
        value = getattr(args, o.kwargs.get("dest") or o.flags[0].lstrip("-").replace("-", "_"))
        if value is not None:
            out.append(f"{o.alias}={json.dumps(value)}")
    return out + list(getattr(args, "overrides", []) or [])


NO_PROGRESS = opt("--no-progress", action="store_true", help="no progress bar")
#: every command that reads a run: ``--run`` (``--run-dir`` under torchrun, see :data:`RUN_DIR_NOTE`)
RUN_OPTION = opt("--run", "--run-dir", required=True, type=Path, help=f"run directory {RUN_DIR_NOTE}")


# --------------------------------------------------------------------------- handlers
def cmd_synth(args: argparse.Namespace) -> int:
    from simcal.data.synthetic import generate_synthetic

    held = [name for name in ("train.json", "val.json") if (Path(args.out) / name).exists()]
    if held:  # its images and annotations would be replaced in place, under any run trained on them
        raise InputError(args.out, held[0], "already holds a dataset: choose another --out (or remove it first)")
    try:
        summary = generate_synthetic(
            args.out,
            classes=args.classes,
            train_images=args.train_images,
            val_images=args.val_images,
            size=args.size,
            seed=args.seed,
            mask_format=args.mask_format,
            like=args.like,
            val_floor=args.val_floor,
            image_format=args.image_format,
        )
    except ValueError as e:
        raise InputError("simcal synth", "arguments", str(e)) from None
    print(json.dumps(summary, indent=2))
    return 0


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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from simcal import api
    from simcal.evaluation.result import write_per_class_csv
    from simcal.io import refuse_overwriting_inputs, write_json

    refuse_overwriting_inputs(
        {"--out": args.out, "--per-class": args.per_class},
        {"--gt": args.gt, "--results": args.results, "--train": args.train},
    )

    from simcal.evaluation.result import SettingError

    try:
        result = api.evaluate(
            args.gt,
            args.results,
            iou=args.iou,
            train=args.train,
            bins=args.bins,
            protocol=args.protocol,
            dets_per_class=args.dets_per_class,
            dilation=args.dilation,
        )
    except SettingError as e:  # the evaluator names its parameter; the command line, the flag
        raise InputError("--" + e.setting.replace("_", "-"), e.setting, e.message) from None
    print(result.table())
    if args.out:
        write_json(args.out, result.to_json(), indent=1)
        print(f"metrics written to {args.out}")
    if args.per_class:
        write_per_class_csv(result, args.per_class)
        print(f"per-class AP written to {args.per_class}")
    return 0


def cmd_coco_lt(args: argparse.Namespace) -> int:
    from simcal.data.annotations import load_dataset
    from simcal.data.coco_lt import build_coco_lt
    from simcal.io import refuse_overwriting_inputs, write_json

    refuse_overwriting_inputs({"--out": args.out}, {"--coco": args.coco})
    coco = load_dataset(args.coco)
    out = build_coco_lt(coco, seed=args.seed, source=str(args.coco))
    write_json(args.out, out)
    print(
        f"COCO-LT: {len(out['images'])} images, {len(out['annotations'])} instances "
        f"(from {len(coco['images'])} images, {len(coco['annotations'])} instances) -> {args.out}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from simcal import api

    final = api.train(
        args.config, args.out, overrides=args.overrides, resume=args.resume, progress=not args.no_progress
    )
    _on_rank0(f"final weights: {final}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from simcal import api

    checkpoint, *overrides = args.checkpoint  # CHECKPOINT [section.key=value ...], options anywhere
    api.import_detector(
        args.framework, checkpoint, args.out, framework_config=args.framework_config, overrides=overrides
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from simcal import api

    head = api.calibrate(
        args.run,
        overrides=_alias_overrides(COMMANDS_BY_NAME["calibrate"], args),
        name=args.name,
        resume=args.resume,
        snapshot_every=args.snapshot_every,
        progress=not args.no_progress,
    )
    _on_rank0(f"calibrated head: {head}")
    return 0


def _on_rank0(line: str) -> None:
    """Print ``line`` once: from rank 0 under torchrun (every process reaches the end)."""
    from simcal.engine import distributed as dist_utils

    if dist_utils.is_main():
        print(line)


def cmd_predict(args: argparse.Namespace) -> int:
    from simcal import api

    api.predict(
        args.run,
        heads=_names(args.head),
        overrides=_alias_overrides(COMMANDS_BY_NAME["predict"], args),
        calibration=args.calibration,
        split=args.split,
        gt=args.gt,
        images=args.images,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        max_images=args.max_images,
        topk_per_class=args.topk_per_class,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        allow_category_subset=args.allow_category_subset,
    )
    return 0


def _print_rows(rows: dict[str, dict[str, float | None]]) -> None:
    keys = list(next(iter(rows.values())))
    print(f"{'':>12} " + " ".join(f"{k:>6}" for k in keys))
    for name, r in rows.items():
        print(f"{name:>12} " + " ".join(f"{'-':>6}" if r[k] is None else f"{r[k]:6.1f}" for k in keys))


#: analyses whose detector pass torchrun shards over processes (the others run on rank 0 alone)
SHARDED_ANALYSES = ("recall", "oracle", "sweep-T", "dynamics")


def cmd_analyze(args: argparse.Namespace) -> int:
    from simcal.engine import analyze as an
    from simcal.engine import distributed as dist_utils
    from simcal.evaluation.analysis import CONFUSION_LABELS, CONFUSION_VARIANTS
    from simcal.run import Run

    rank, world, _ = dist_utils.init_distributed()
    if world > 1 and rank != 0 and args.tool not in SHARDED_ANALYSES:
        return 0  # under torchrun the tools without a detector pass run on rank 0 alone
    common = dict(split=args.split, max_images=args.max_images, progress=not args.no_progress and rank == 0)
    if args.tool == "recall":
        out = an.analyze_recall(args.run, **common)
        if out:  # {}: not rank 0 under torchrun
            print(f"proposal AR@100 {100 * out['AR@100']:.1f}  AR@1000 {100 * out['AR@1000']:.1f}")
    elif args.tool == "oracle":
        out = an.analyze_oracle(args.run, iou=args.iou, **common)
        if out:  # {}: not rank 0 under torchrun (its share predicted; rank 0 reports)
            _print_rows(out["heads"])
    elif args.tool == "sweep-T":
        out = an.analyze_sweep_T(
            args.run, Ts=args.T or an.DEFAULT_TS, iou=args.iou, calibration=args.calibration, **common
        )
        if out:
            _print_rows({f"T={r['T']:g}": {k: v for k, v in r.items() if k != "T"} for r in out["sweep"]})
    elif args.tool == "dynamics":
        out = an.analyze_dynamics(args.run, calibration=args.calibration, iou=args.iou, **common)
        if out:
            _print_rows({f"cal @{r['step']}": r["cal"] for r in out["steps"]})
    elif args.tool == "errors":
        from simcal.evaluation.diagnostics import ERROR_TYPES

        heads = _names(args.heads) if args.heads else None
        out = an.analyze_errors(args.run, split=args.split, gt_json=args.gt, heads=heads, iou=args.iou)
        print(f"AP50 points each error type costs (TIDE, {args.iou}, IoU 0.5), and score calibration:")
        _print_rows(
            {
                head: {
                    **{k: 100 * r["tide"]["delta_ap"][k] for k in ERROR_TYPES},
                    "ECE": 100 * r["calibration"]["ece"],
                }
                for head, r in out["heads"].items()
            }
        )
    else:
        heads = _names(args.heads) if args.heads else None
        out = an.analyze_confusion(args.run, split=args.split, gt_json=args.gt, heads=heads, iou=args.iou)
        print("rows: AP as is, without the detections on rare/common objects, without any on other-class objects")
        if "not_comparable" in out:
            print(f"warning: not comparable: {out['not_comparable']}")
        for head, r in out["heads"].items():
            n = r["dets_on_other_objects"]
            print(
                f"{head} ({r['num_images']} images): detections (score >= {out['score']:g}) on other-class objects, "
                "class -> object group:"
            )
            print("   " + "  ".join(f"{a}->{b} {n[a][b]}" for a in "rcf" for b in "rcf"))
            _print_rows(dict(zip(CONFUSION_LABELS, (r[k] for k in CONFUSION_VARIANTS))))
    if not out:
        return 0
    if "num_images" in out:
        print(f"on {out['num_images']} images of {args.split}")
    print(f"written to {Run(args.run).analysis_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from simcal.engine.analyze import compare_heads
    from simcal.evaluation.diagnostics import comparison_rows
    from simcal.run import Run

    heads = _names(args.heads)
    if len(heads) != 2:
        raise InputError("--heads", "heads", f"expected two heads A,B (B - A is reported), got {args.heads!r}")
    out = compare_heads(
        args.run,
        (heads[0], heads[1]),
        split=args.split,
        gt_json=args.gt,
        iou=args.iou,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        confidence=args.confidence,
    )
    print(
        f"{heads[1]} - {heads[0]}, {args.iou} AP in %, {out['num_images']} images of {args.split}, "
        f"{100 * out['confidence']:g}% bootstrap intervals over images ({out['n_bootstrap']} samples, "
        f"seed {args.seed}):"
    )
    print(f"{'':>6} {heads[0]:>8} {heads[1]:>8} {'delta':>7} {'interval':>16} {'P(>0)':>6}")
    for key, a, b, delta, interval, prob in comparison_rows(out):
        print(f"{key:>6} {a:>8} {b:>8} {delta:>7} {interval:>16} {prob:>6}")
    print(f"written to {Run(args.run).analysis('compare').json}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from simcal.report.html import build_report

    page = build_report(args.run, split=args.split, out=args.out, gallery_images=args.gallery, score_thresh=args.score)
    print(f"report: {page}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from simcal.demo import run_demo

    run_demo(
        Path(args.out),
        budget=args.budget,
        seed=args.seed,
        seeds=args.seeds,
        compare=args.compare,
        progress=not args.no_progress,
        roi_heads=args.roi_heads,
    )
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "synth",
        "generate the synthetic long-tail dataset (images + LVIS json)",
        cmd_synth,
        (
            opt("--out", required=True, type=Path, help="output directory"),
            opt(
                "--classes",
                type=_int_at_least(1, choices.MAX_CLASSES),
                default=choices.SYNTH_CLASSES,
                help="classes (default %(default)s)",
            ),
            opt("--train-images", type=_image_count, default=choices.SYNTH_TRAIN_IMAGES, help="default %(default)s"),
            opt("--val-images", type=_image_count, default=choices.SYNTH_VAL_IMAGES, help="default %(default)s"),
            opt(
                "--size",
                type=_int_at_least(1, choices.MAX_IMAGE_SIDE),
                default=choices.SYNTH_SIZE,
                help="image side in px (default %(default)s)",
            ),
            opt("--seed", type=_seed, default=0),
            opt("--mask-format", choices=choices.MASK_FORMATS, default="polygon"),
            opt("--image-format", choices=choices.IMAGE_FORMATS, default="png", help="jpg: quality 90 (default png)"),
            opt(
                "--like",
                choices=choices.SYNTH_LIKE,
                help="lvis_v1: LVIS v1's 1,203 classes and their training counts, scaled to --train-images",
            ),
            opt(
                "--val-floor",
                type=_int_at_least(1, 10_000),
                default=20,
                help="least instances per class in val (default 20)",
            ),
        ),
    ),
    Command(
        "stats",
        "per-class image/instance counts, r/c/f groups and instance bins",
        cmd_stats,
        (
            opt("annotations", type=Path, help="COCO or LVIS json (a training split)"),
            opt("--json", action="store_true", help="print json instead of a table"),
            opt("--bins", default="lvis", help="lvis, coco-lt or inner edges E1,E2,E3 (default %(default)s)"),
        ),
    ),
    Command(
        "evaluate",
        "LVIS/COCO AP, APr/APc/APf and instance-bin AP of a results json",
        cmd_evaluate,
        (
            opt("--gt", required=True, type=Path, help="ground truth json (LVIS or COCO)"),
            opt("--results", required=True, type=Path, help="results json: a list of detections"),
            opt(
                "--iou",
                choices=choices.EVAL_IOU_TYPES,
                default="segm",
                help="boundary: boundary IoU of the masks (LVIS 2021 challenge), default %(default)s",
            ),
            opt(
                "--dilation",
                type=_open_unit,
                default=choices.BOUNDARY_DILATION,
                help="--iou boundary: band width as a fraction of the image diagonal (default %(default)s)",
            ),
            opt("--train", type=Path, help="training json for the counts (default: the gt categories' fields)"),
            opt(
                "--bins",
                default="auto",
                help="auto (the bins the training json declares in info.bins, as `synth --like` sets do, "
                "else lvis), lvis, coco-lt or inner edges E1,E2,E3 (default %(default)s)",
            ),
            opt("--out", type=Path, help="write metrics json here"),
            opt("--per-class", type=Path, help="write per-class AP csv here"),
            opt(
                "--protocol",
                choices=choices.PROTOCOLS,
                default="lvis",
                help="lvis: 300 dets/image; fixed: AP-fixed (no per-image cap, --dets-per-class per class "
                "over the dataset); pool: AP-pool (AP-fixed's detections, each group's classes pooled)",
            ),
            opt(
                "--dets-per-class",
                type=_positive_int,
                default=choices.FIXED_DETS_PER_CLASS,
                help="fixed / pool: detections kept per class over the dataset (default %(default)s)",
            ),
        ),
    ),
    Command(
        "coco-lt",
        "build the COCO-LT training json from COCO train2017",
        cmd_coco_lt,
        (
            opt("--coco", required=True, type=Path, help="instances_train2017.json"),
            opt("--out", required=True, type=Path, help="output json"),
            opt("--seed", type=_seed, default=0),
        ),
    ),
    Command(
        "train",
        "train a Mask R-CNN (torchrun-aware) into a run directory",
        cmd_train,
        (
            opt("--config", type=Path, help="YAML preset (configs/*.yaml)"),
            opt("--out", required=True, type=Path, help="run directory"),
            opt("--resume", action="store_true", help="continue the run in --out from its last checkpoint"),
            NO_PROGRESS,
        ),
        overrides="section.key=value, e.g. train.loss=focal train.sampler=repeat_factor",
    ),
    Command(
        "import",
        "a detector trained in detectron2, mmdetection or the SimCal release as a simcal run computing what its "
        "framework computes: calibrate it, predict, ...",
        cmd_import,
        (
            opt(
                "--from",
                dest="framework",
                required=True,
                choices=choices.IMPORT_FRAMEWORKS,
                help="the framework that trained it",
            ),
            opt(
                "checkpoint",
                nargs="+",
                metavar="CHECKPOINT [section.key=value ...]",
                help="its weights (a model zoo file, a run's checkpoint), then overrides for what the "
                "checkpoint cannot say; the class order needs data.train_json (calibration needs it too), e.g. "
                "data.train_json=lvis_v0.5_train.json data.train_images=coco/train2017 data.val_json=... "
                "data.val_images=...",
            ),
            opt("--out", required=True, type=Path, help="the run directory to write (new or empty)"),
            opt(
                "--framework-config",
                type=Path,
                help="the model's config file in its framework (detectron2 YAML, _BASE_ followed; mmdetection Python "
                "config, read without running it); default: the checkpoint's own (mmdetection) or the model zoo's "
                "settings, printed",
            ),
        ),
    ),
    Command(
        "calibrate",
        "SimCal: bi-level calibration of the classification head on the frozen detector "
        "(under torchrun each step's slots are shared by the processes)",
        cmd_calibrate,
        (
            RUN_OPTION,
            opt("--head", choices=choices.CALIBRATED_HEADS, alias="calibration.head", help="default 3fc_ft"),
            opt(
                "--layers", choices=choices.LAYERS, alias="calibration.layers", help="layers that train (default all3)"
            ),
            opt("--steps", type=_steps, alias="calibration.steps", help="default: the run's (paper: 12000)"),
            opt(
                "--classes-per-batch",
                type=_int_at_least(1, 4096),
                alias="calibration.classes_per_batch",
                help="default 16",
            ),
            opt("--loss", choices=choices.LOSSES, alias="calibration.loss", help="default ce"),
            opt("--sampler", choices=choices.CALIBRATION_SAMPLERS, alias="calibration.sampler", help="default bilevel"),
            opt(
                "--stages",
                choices=choices.CALIBRATION_STAGES,
                alias="calibration.stages",
                help="a cascade's stages to calibrate (default all)",
            ),
            opt("--lr", type=_number, alias="calibration.lr", help="default 0.01"),
            opt("--momentum", type=_number, alias="calibration.momentum", help="default 0.9 (released code: 0)"),
            opt("--weight-decay", type=_number, alias="calibration.weight_decay", help="default 0.0001"),
            opt("--seed", type=_seed, alias="calibration.seed"),
            opt("--name", help="output name under RUN/calibration (default from the settings)"),
            opt(
                "--snapshot-every",
                type=_int_at_least(0, choices.MAX_STEPS),
                default=0,
                help="also save the head every K steps",
            ),
            opt("--resume", action="store_true", help="continue an interrupted calibration"),
            NO_PROGRESS,
        ),
        overrides="calibration.key=value, e.g. calibration.loss_kwargs={gamma: 2} calibration.decay=[0.5,0.9]",
    ),
    Command(
        "predict",
        "run a trained detector on a split: LVIS results json + metrics, several heads in one pass",
        cmd_predict,
        (
            RUN_OPTION,
            opt("--split", default="val", help="val or train (from the run's config), or a name for --gt"),
            opt("--head", default="orig", help=f"{' | '.join(choices.SCORERS)}; comma-separate several"),
            opt("--combine", choices=choices.COMBINERS, alias="inference.combine", help="dual-head combiner (sel)"),
            opt("--T", type=_number, alias="inference.T", help="sel threshold on training instances (default 300)"),
            opt("--param", type=_number, alias="inference.param", help="gamma of norcal, tau of logit-adj (1)"),
            opt("--calibration", help="calibrated head name under RUN/calibration (default: 3fc_ft)"),
            opt("--gt", help="annotations json instead of the config's split"),
            opt("--images", help="image folder for --gt"),
            opt("--checkpoint", help="weights file (default: RUN/model_final.pth)"),
            opt("--batch-size", type=_int_at_least(1, choices.MAX_BATCH), default=8),
            opt("--max-images", type=_positive_int, default=None, help="only the first N images"),
            opt(
                "--topk-per-class",
                type=_positive_int,
                default=None,
                metavar="K",
                help="AP-fixed's inference: no per-image cap, the K best detections of each class over the "
                f"split (K={choices.FIXED_DETS_PER_CLASS} for LVIS), to predictions/<split>-topk<K>, "
                "evaluated as AP-fixed and AP-pool (default off)",
            ),
            opt("--no-eval", action="store_true", help="write results only"),
            opt(
                "--allow-category-subset",
                action="store_true",
                help="--gt whose categories differ from the run's: evaluate the ones both have (refused otherwise)",
            ),
            NO_PROGRESS,
        ),
        overrides="inference.key=value or model test settings, e.g. model.detections_per_img=300",
    ),
    Command(
        "analyze",
        "analysis tools: proposal recall, props-gt oracle, T sweep, dynamics, confusion sources",
        cmd_analyze,
        (
            opt("tool", choices=choices.ANALYSES),
            RUN_OPTION,
            opt("--split", default="val"),
            opt("--max-images", type=_positive_int, default=None),
            opt("--iou", choices=choices.IOU_TYPES, default="bbox"),
            opt("--T", type=_numbers, help="sweep-T values, comma-separated (default 10,20,50,100,200,300,500,1000)"),
            opt("--calibration", help="calibrated head name (default 3fc_ft)"),
            opt("--gt", help="confusion: annotations of --split when it is not the config's val / train"),
            opt("--heads", help="confusion, errors: predictions/<split>/<head> to read, comma-separated (default all)"),
            NO_PROGRESS,
        ),
    ),
    Command(
        "compare",
        "two heads' AP, APr/c/f and AP1..AP4 deltas with bootstrap confidence intervals over images",
        cmd_compare,
        (
            RUN_OPTION,
            opt("--heads", default="orig,dual", help="A,B: B - A is reported (default %(default)s)"),
            opt("--split", default="val", help="the predictions/<split> to read (default %(default)s)"),
            opt("--gt", help="annotations of --split when it is not the config's val / train"),
            opt("--iou", choices=choices.IOU_TYPES, default="bbox"),
            opt(
                "--bootstrap",
                type=_int_at_least(1, 100_000),
                default=1000,
                help="bootstrap samples (default %(default)s)",
            ),
            opt("--confidence", type=_open_unit, default=0.95, help="interval level (default %(default)s)"),
            opt("--seed", type=_seed, default=0),
        ),
    ),
    Command(
        "report",
        "one self-contained HTML page (and PNGs) about a run: tables, plots, detection gallery",
        cmd_report,
        (
            RUN_OPTION,
            opt("--split", default="val", help="the predictions/<split> to report (default %(default)s)"),
            opt("--out", type=Path, default=None, help="folder for index.html and PNGs (default RUN/report)"),
            opt(
                "--gallery", type=_int_at_least(0, 1000), default=8, help="images in the gallery (default %(default)s)"
            ),
            opt(
                "--score",
                type=_probability,
                default=None,
                help="gallery: show detections scoring at least this (default: each head's top N, N = objects)",
            ),
        ),
    ),
    Command(
        "demo",
        "the main job end to end on the synthetic data, ending in a table and a report",
        cmd_demo,
        (
            opt("--out", default="runs/demo", help="working directory (default %(default)s)"),
            opt(
                "--budget",
                choices=choices.DEMO_BUDGETS,
                default="full",
                help="quick: a ~3 min smoke run; leaderboard: short trainings for --compare",
            ),
            opt(
                "--seeds", type=_int_at_least(1, 1000), default=1, help="training seeds; >1 adds median and mean +- std"
            ),
            opt(
                "--compare",
                action="store_true",
                help="the leaderboard: Table 4's decoupled baselines, Seesaw / EQLv2 / federated / BAGS end to end and "
                "decoupled, NorCal, logit adjustment, SimCal (--seeds 3 --budget leaderboard: ~75 min on 2 cores)",
            ),
            opt(
                "--roi-heads",
                choices=choices.ROI_HEADS,
                default="standard",
                help="cascade: Cascade Mask R-CNN, htc: Hybrid Task Cascade; all stages calibrated (default: standard)",
            ),
            NO_PROGRESS,
            opt("--seed", type=_seed, default=0, help="seed of the data and of the first training run"),
        ),
    ),
)
COMMANDS_BY_NAME = {c.name: c for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simcal",
        description="Long-tail instance segmentation: Mask R-CNN, SimCal calibration, LVIS evaluation.",
    )
    p.add_argument("--version", action="version", version=f"simcal {__version__}")
    p.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback behind a one-line error (or set {DEBUG_ENV}=1)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        s = sub.add_parser(command.name, help=command.help, description=command.help)
        for o in command.options:
            s.add_argument(*o.flags, **o.kwargs)
        if command.overrides is not None:
            s.add_argument("overrides", nargs="*", help=command.overrides)
        s.set_defaults(func=command.handler)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every error users cause ends here as one line (:mod:`simcal.errors`).

    Exit codes: 0 done, 2 one-line error, 130 SIGINT, 143 SIGTERM. ``--debug`` (or
    ``SIMCAL_DEBUG=1``) re-raises the one-line errors with their traceback.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `simcal import CHECKPOINT --out RUN section.key=value`: positionals after options (argparse
        # stops at the first option); any other leftover is argparse's own error
        if args.command == "import" and not any(e.startswith("-") for e in extra):
            args.checkpoint += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or debug_requested()
    previous = handle_signals() if threading.current_thread() is threading.main_thread() else None
    try:
        code = int(args.func(args) or 0)
        stopped_by = signal_received()
        if stopped_by is not None:  # its exception landed where Python drops exceptions: stop now
            raise Terminated() if stopped_by == "SIGTERM" else KeyboardInterrupt()
        return code
    except SimcalError as e:
        if debug:
            raise
        return _fail(str(e))
    except BrokenPipeError:  # the output went to a pipe that closed (| head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if debug:
            raise
        return _fail(f"{describe_os_error(e)} (--debug shows where)")
    except RuntimeError as e:
        signal_name = worker_stopped_by(e) or signal_received()
        if signal_name is not None and not debug:  # the group's signal reached a loader worker first
            print(stopped_line(signal_name), file=sys.stderr)
            return 143 if signal_name == "SIGTERM" else 130
        from simcal.engine.distributed import lost_ranks

        message = peer_rank_lost(e, lost_ranks) or loader_worker_died(e)
        if message is None or debug:
            raise
        return _fail(message)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(stopped_line("SIGTERM" if terminated else "SIGINT"), file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            restore_signals(previous)


def _fail(message: str) -> int:
    print(f"simcal: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
