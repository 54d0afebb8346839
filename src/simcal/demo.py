"""``simcal demo``: the paper's Table 3 in miniature, end to end on the embedded synthetic data.

synth -> train (configs/synthetic_cpu.yaml) -> calibrate (SimCal) -> predict with the original,
calibrated and dual heads in one pass -> evaluate -> T sweep and calibration dynamics -> a table
shaped like the paper's Table 3 (AP1..AP4, APr/APc/APf, AP; box and mask) and an HTML report.

``seeds=N`` trains N detectors (training seeds ``seed .. seed+N-1`` on the same data) and reports
the median and mean +- std of every cell (Table 11). ``compare`` also calibrates the decoupled
baselines of Table 4 on each frozen detector (LR, FL, CM with image-centric sampling; IS with
repeat-factor sampling) and evaluates each with the dual head.

Every stage is skipped when its output exists and resumes when it was interrupted, so running the
demo again continues where it stopped.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from simcal import choices
from simcal.config import load_config
from simcal.data.stats import BIN_PRESETS, category_stats
from simcal.errors import InputError
from simcal.io import atomic_open, read_json, write_json
from simcal.report import leaderboard as lb
from simcal.report.html import HEAD_NAMES, build_report
from simcal.report.tables import (
    HEADER,
    IOUS,
    TABLE_KEYS,
    aggregate,
    html_table,
    markdown_table,
    mean_std_rows,
    results_rows,
)
from simcal.run import HeadTag, Run, calibration_name

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "synthetic_cpu.yaml"

#: Data, training and calibration sizes per budget. ``full`` is the synthetic_cpu preset with 450
#: training iterations and a 300-image val split, sized to stay under 15 minutes on a 2-core CPU.
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
        "analysis_images": 48,
    },
    "full": {
        "synth": dict(val_images=300),
        "overrides": ["train.max_iter=450", "train.steps=[340, 415]"],
        "analysis_images": None,  # all of val
    },
    # `simcal demo --compare --seeds 3 --budget leaderboard`: 5 detectors per seed (the plain one and
    # four trained end to end), 9 calibrations on each plain one; three seeds took 53 minutes on a 2-core
    # AMD EPYC (about 75 on a machine 1.4x slower, docs/leaderboard.md). 40 classes at 96 px learn the
    # head classes in 200 iterations (box APf 21.5 %, APr 0.7 %, median of 3 seeds: the long-tail
    # failure the methods address), which 80 classes at 128 px need 450 for.
    "leaderboard": {
        "synth": dict(classes=40, train_images=1500, val_images=200, size=96),
        "overrides": [
            "model.min_size=96",
            "model.max_size=96",
            "train.max_iter=200",
            "train.steps=[150, 185]",
            "train.warmup_iters=20",
            "train.checkpoint_period=50",
            "calibration.steps=150",
            "calibration.checkpoint_period=50",
        ],
        "analysis_images": 100,
    },
}
#: Table 4: (row name, calibration overrides); each calibrated head is used as a dual head.
BASELINES = (
    ("LR (re-weighting)", ["calibration.loss=lr", "calibration.sampler=random"]),
    ("FL (focal loss)", ["calibration.loss=focal", "calibration.sampler=random"]),
    ("CM (class-aware margin)", ["calibration.loss=cm", "calibration.sampler=random"]),
    ("IS (repeat-factor sampling)", ["calibration.sampler=repeat_factor"]),
)
SNAPSHOTS = 4  # calibration snapshots for the dynamics plot
#: AP-fixed's budget: LVIS v1 keeps 10,000 detections per class over its 19,809 val images; the demo
#: keeps the same number per val image (``topk_per_class``)
LVIS_V1_VAL_IMAGES = 19809


def topk_per_class(val_images: int) -> int:
    """AP-fixed's per-class budget scaled from LVIS v1 val to ``val_images`` images (at least 1)."""
    from simcal.choices import FIXED_DETS_PER_CLASS

    return max(1, -(-FIXED_DETS_PER_CLASS * val_images // LVIS_V1_VAL_IMAGES))


def _run_dir(out: Path, k: int, seed: int) -> Path:
    return out / "run" if k == 0 else out / f"run_seed{seed}"


def _prepare_data(data: Path, params: dict[str, Any], progress: bool) -> None:
    from simcal.data.synthetic import generate_synthetic

    marker = data / "demo_synth.json"
    if (data / "val.json").exists() and marker.exists() and read_json(marker) == params:
        print(f"[data] synthetic data: {data} (exists)")
    else:
        print(f"[data] simcal synth -> {data}")
        generate_synthetic(data, progress=progress, **params)
        write_json(marker, params)
    train_json = read_json(data / "train.json")
    stats = category_stats(train_json, BIN_PRESETS["lvis"])
    groups = {g: sum(s.frequency == g for s in stats) for g in "rcf"}
    counts = sorted(s.instance_count for s in stats)
    print(
        f"       {len(stats)} classes (rare {groups['r']}, common {groups['c']}, frequent {groups['f']}), "
        f"{counts[0]}..{counts[-1]} training instances per class, {len(train_json['images'])} training images"
    )


def _train(run: Path, overrides: list[str], tag: str, progress: bool) -> None:
    from simcal.engine.train import train

    r = Run(run)
    if r.model_final.exists():
        print(f"[{tag} train] {r.model_final} (exists)")
        return
    resume = r.checkpoint_last.exists()
    print(f"[{tag} train] simcal train -> {run}{' (resuming)' if resume else ''}")
    train(None if resume else load_config(PRESET, overrides), run, resume=resume, progress=progress)


def _calibrate(run: Path, overrides: list[str], label: str, tag: str, progress: bool, snapshots: bool) -> str:
    """Calibrate (or resume, or find done) one head; returns its name under RUN/calibration."""
    from simcal.engine.calibrate import calibrate, calibration_config

    r = Run(run)
    cfg = calibration_config(r.load_config(), overrides, str(r.config))
    name = calibration_name(cfg.calibration)
    files = r.calibration(name)
    if files.head.exists():
        print(f"[{tag} calibrate] {label}: {files.head} (exists)")
        return name
    resume = files.checkpoint.exists()
    print(f"[{tag} calibrate] {label}{' (resuming)' if resume else ''}")
    every = max(1, cfg.calibration.steps // SNAPSHOTS) if snapshots else 0
    calibrate(run, overrides, resume=resume, snapshot_every=every, progress=progress)
    return name


def _predict(
    run: Path,
    baselines: dict[str, str],
    tag: str,
    progress: bool,
    decoupled: tuple[str, ...] = (),
    posthoc: bool = False,
    simcal: bool = True,
) -> dict[str, dict[str, dict]]:
    """orig / cal / dual (+ the baselines' dual heads; the ``decoupled`` calibrations' cal and dual
    heads; the post-hoc heads) in one pass; metrics per head tag. ``simcal=False``: orig alone (an
    end-to-end run of the leaderboard)."""
    from simcal.engine.checkpoint import load_calibrated_head, load_model
    from simcal.engine.predict import PredictOptions, predict_split
    from simcal.modeling.scoring import HeadSpec
    from simcal.run import DEFAULT_CALIBRATION

    r = Run(run)
    pred = r.predictions("val")
    cfg = r.load_config()
    inference = cfg.inference
    specs = [HeadSpec("orig")]
    if simcal:
        specs += [HeadSpec("cal"), HeadSpec("dual", inference.combine, inference.T)]
    specs += [HeadSpec("dual", inference.combine, inference.T, cal=n) for n in baselines.values()]
    for n in decoupled:
        specs += [HeadSpec("cal", cal=n), HeadSpec("dual", inference.combine, inference.T, cal=n)]
    if posthoc:
        specs += [HeadSpec(kind, param=inference.param) for kind in choices.POSTHOC]
    tags = [s.tag for s in specs]
    if all(pred.head(t).metrics(iou).exists() for t in tags for iou in ("bbox", "segm")):
        print(f"[{tag} predict] {pred.root} (exists)")
    else:
        print(f"[{tag} predict] simcal predict --head {','.join(tags)} (one pass)")
        model, label_map, cfg = load_model(run)  # only when there is something to predict
        cal_heads = {"": load_calibrated_head(run, DEFAULT_CALIBRATION, model)} if simcal else {}
        cal_heads.update({n: load_calibrated_head(run, n, model) for n in (*baselines.values(), *decoupled)})
        options = PredictOptions(progress=progress, verbose=False)
        predict_split(model, label_map, cfg, specs, cal_heads, "val", pred, options)
    return {t: {iou: read_json(pred.head(t).metrics(iou)) for iou in ("bbox", "segm")} for t in tags}


def _predict_topk(run: Path, tag: str, progress: bool) -> list[list[str]]:
    """orig / cal / dual with AP-fixed's inference (per-class top-k over val); the rows of the
    AP / AP-fixed / AP-pool table."""
    from simcal.data.annotations import load_dataset
    from simcal.engine.checkpoint import load_calibrated_head, load_model
    from simcal.engine.predict import PredictOptions, predict_split
    from simcal.modeling.scoring import HeadSpec
    from simcal.report.html import protocol_rows
    from simcal.run import DEFAULT_CALIBRATION

    r = Run(run)
    cfg = r.load_config()
    k = topk_per_class(len(load_dataset(cfg.data.val_json)["images"]))
    pred = r.predictions("val")
    inference = cfg.inference
    specs = [HeadSpec("orig"), HeadSpec("cal"), HeadSpec("dual", inference.combine, inference.T)]
    tags = [s.tag for s in specs]
    topk = pred.topk(k)
    if all(topk.head(t).metrics(iou, "pool").exists() for t in tags for iou in ("bbox", "segm")):
        print(f"[{tag} predict] {topk.root} (exists)")
    else:
        print(f"[{tag} predict] simcal predict --head orig,cal,dual --topk-per-class {k} (AP-fixed, AP-pool)")
        model, label_map, cfg = load_model(run)
        cal_heads = {"": load_calibrated_head(run, DEFAULT_CALIBRATION, model)}
        options = PredictOptions(topk_per_class=k, progress=progress, verbose=False)
        predict_split(model, label_map, cfg, specs, cal_heads, "val", pred, options)
    return protocol_rows(pred, topk, tags, HEAD_NAMES)


def _analyses(run: Path, tag: str, max_images: int | None, progress: bool) -> None:
    from simcal.engine.analyze import analyze_dynamics, analyze_sweep_T

    sweep, dynamics = Run(run).analysis("sweep-T").json, Run(run).analysis("dynamics").json
    if sweep.exists():
        print(f"[{tag} analyze] T sweep: {sweep} (exists)")
    else:
        print(f"[{tag} analyze] T sweep (box AP, one pass)")
        analyze_sweep_T(run, max_images=max_images, progress=progress)
    if dynamics.exists():
        print(f"[{tag} analyze] dynamics: {dynamics} (exists)")
    else:
        print(f"[{tag} analyze] calibration dynamics (box AP at {SNAPSHOTS} snapshots, one pass)")
        analyze_dynamics(run, max_images=max_images, progress=progress)


def _confusion(run: Path, tag: str) -> dict[str, dict[str, dict[str, float | None]]]:
    """Box AP of orig / cal / dual without their detections on rare and common objects (fractions).

    The demo's val holds about as many objects of every class, so a head class's false positives
    are mostly tail objects the head misreads; LVIS's long-tailed val holds few. Leaving those
    detections out shows the head classes as LVIS would (``simcal analyze confusion``).
    """
    from simcal.engine.analyze import analyze_confusion

    print(f"[{tag} analyze] where the classification errors land (box AP, from the predictions)")
    out = analyze_confusion(run, heads=["orig", "cal", "dual"])
    without = {h: v["without dets on tail objects"] for h, v in out["heads"].items()}
    return {h: {"bbox": {k: None if r[k] is None else r[k] / 100 for k in TABLE_KEYS}} for h, r in without.items()}


def _diagnostics(run: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The error breakdown of orig / cal / dual and the dual-minus-orig intervals (box AP)."""
    from simcal.engine.analyze import analyze_errors, compare_heads

    print(f"[{tag} analyze] TIDE errors and score calibration; dual - orig with bootstrap intervals")
    errors = analyze_errors(run, heads=["orig", "cal", "dual"])
    compared = compare_heads(run, ("orig", "dual"))
    return errors, compared


def run_demo(
    out: Path,
    *,
    budget: str = "full",
    seed: int = 0,
    seeds: int = 1,
    compare: bool = False,
    progress: bool = True,
    roi_heads: str = "standard",
) -> dict[str, Any]:
    """Run (or resume) the demo in ``out``; print and return the tables' metrics (fractions).
    ``roi_heads``: ``cascade`` runs it on Cascade Mask R-CNN (SimCal calibrating every stage)."""
    if not PRESET.is_file():
        raise InputError(PRESET, "(file)", "the demo runs from a simcal checkout (configs/synthetic_cpu.yaml)")
    spec = BUDGETS[budget]
    data = out / "data"
    t0 = time.perf_counter()
    _prepare_data(data, {**spec["synth"], "seed": seed}, progress)
    times: dict[str, float] = {"data": time.perf_counter() - t0}

    per_seed: list[dict[str, dict[str, dict[str, float | None]]]] = []
    per_seed_confusion: list[dict[str, dict[str, dict[str, float | None]]]] = []
    per_seed_board: list[dict[str, dict[str, dict[str, float | None]]]] = []
    compare_names: dict[str, str] = {}
    board_rows: dict[str, str] = {}
    for k in range(seeds):
        s = seed + k
        run = _run_dir(out, k, s)
        tag = f"seed {s}"
        overrides = [
            f"data.train_json={data / 'train.json'}",
            f"data.train_images={data / 'images'}",
            f"data.val_json={data / 'val.json'}",
            f"data.val_images={data / 'images'}",
            f"train.seed={s}",
            f"calibration.seed={s}",
            *spec["overrides"],
            *([f"model.roi_heads={roi_heads}"] if roi_heads != "standard" else []),
        ]
        t = time.perf_counter()
        _train(run, overrides, tag, progress)
        times[f"train seed {s}"] = time.perf_counter() - t
        t = time.perf_counter()
        _calibrate(run, [], "SimCal (bi-level sampling, frozen detector)", tag, progress, snapshots=True)
        baselines, decoupled = {}, {}
        if compare:
            for label, calibration in BASELINES:
                baselines[label] = _calibrate(run, calibration, label, tag, progress, False)
            for method, (label, calibration) in lb.DECOUPLED.items():
                decoupled[method] = _calibrate(run, calibration, label, tag, progress, False)
        times[f"calibrate seed {s}"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics = _predict(run, baselines, tag, progress, tuple(decoupled.values()), posthoc=compare)
        per_seed_confusion.append(_confusion(run, tag))
        times[f"predict seed {s}"] = time.perf_counter() - t
        compare_names = {str(HeadTag("dual", n)): f"{label} + dual" for label, n in baselines.items()}
        table = {h: {iou: {key: m[iou][key] for key in TABLE_KEYS} for iou in m} for h, m in metrics.items()}
        per_seed.append(table)
        if compare:  # the leaderboard: the newer methods also trained end to end, on the same data
            t = time.perf_counter()
            board = dict(table)
            for method, (_, train_over) in lb.E2E.items():
                e2e = lb.e2e_run_dir(out, method, s)
                _train(e2e, [*overrides, *train_over], f"{tag} {method}", progress)
                m = _predict(e2e, {}, f"{tag} {method}", progress, simcal=False)["orig"]
                board[f"e2e:{method}"] = {iou: {key: m[iou][key] for key in TABLE_KEYS} for iou in m}
            param = Run(run).load_config().inference.param
            board_rows = lb.row_names(baselines, decoupled, param)
            per_seed_board.append({key: board[key] for key in board_rows})
            times[f"leaderboard seed {s}"] = time.perf_counter() - t
        if k == 0:
            t = time.perf_counter()
            protocols = _predict_topk(run, tag, progress)
            times["predict top-k"] = time.perf_counter() - t
            t = time.perf_counter()
            _analyses(run, tag, spec.get("analysis_images"), progress)
            errors, compared = _diagnostics(run, tag)
            times["analyze"] = time.perf_counter() - t

    agg = aggregate(per_seed) if seeds > 1 else None
    main_metrics = agg["median"] if agg else per_seed[0]
    texts = [("Table 3" + (f", median of {seeds} seeds" if agg else ""), results_rows(main_metrics, HEAD_NAMES))]
    if agg:
        texts.append((f"Table 3, mean ± std over {seeds} seeds", mean_std_rows(agg, HEAD_NAMES)))
    confusion = aggregate(per_seed_confusion)["median"] if agg else per_seed_confusion[0]
    texts.append(
        (
            "Table 3, box, without the detections on rare and common objects (a long-tailed val like LVIS's has few)"
            + (f", median of {seeds} seeds" if agg else ""),
            results_rows(confusion, HEAD_NAMES, IOUS[:1]),
        )
    )
    if compare:
        rows = {"orig": "original (no calibration)", **compare_names, "dual": "SimCal (bi-level) + dual"}
        texts.append(
            (
                "Table 4: decoupled baselines, each calibrated head used as a dual head"
                + (f" (median of {seeds} seeds)" if agg else ""),
                results_rows(main_metrics, rows),
            )
        )
    # the report's own table is this run's (seed ``seed``); add the aggregates and the baselines
    extra = "".join(f"<h2>{html.escape(title)}</h2>{html_table(HEADER, r)}" for title, r in texts[(0 if agg else 1) :])
    board_md = ""
    if compare:
        paper = {baselines[label]: over for label, over in BASELINES}  # the names are the same every seed
        meta = {
            "budget": budget,
            "seeds": [seed + k for k in range(seeds)],
            "commands": lb.commands(board_rows, paper, decoupled),
            "seconds": {k: round(v, 1) for k, v in times.items() if k.startswith(("train", "leaderboard"))},
        }
        board_md, board_html = lb.write_leaderboard(out, per_seed_board, board_rows, meta)
        extra += board_html
    from simcal.evaluation.diagnostics import ERROR_TYPES, comparison_rows
    from simcal.report.html import protocol_header

    val_images = len(json.loads((data / "val.json").read_text())["images"])
    diag = [
        (
            f"AP, AP-fixed and AP-pool ({topk_per_class(val_images)} detections per class over "
            f"{val_images} val images: LVIS v1's 10,000 over 19,809 scaled), seed {seed}",
            protocol_header(),
            protocols,
        ),
        (
            f"dual - orig, box AP, seed {seed}: {100 * compared['confidence']:g}% bootstrap intervals over "
            f"{compared['num_images']} val images",
            ["metric", "orig", "dual", "delta", "interval", "P(delta > 0)"],
            comparison_rows(compared),
        ),
        (
            f"AP50 points each error type costs (TIDE, box) and ECE (%), seed {seed}",
            ["head", *ERROR_TYPES, "ECE"],
            [
                [HEAD_NAMES.get(h, h)]
                + [f"{100 * e['tide']['delta_ap'][k]:.1f}" for k in ERROR_TYPES]
                + [f"{100 * e['calibration']['ece']:.1f}"]
                for h, e in errors["heads"].items()
            ],
        ),
    ]
    t = time.perf_counter()
    report = build_report(out / "run", extra_html=extra)
    times["report"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    summary = {
        "budget": budget,
        "seeds": [seed + k for k in range(seeds)],
        "compare": compare,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "metrics": main_metrics,
        "per_seed": per_seed,
        "without_dets_on_tail_objects": confusion,
        "dual_minus_orig": compared["metrics"],
        "protocols": {"header": protocol_header(), "rows": protocols},
        "errors": {h: {"tide": e["tide"], "ece": e["calibration"]["ece"]} for h, e in errors["heads"].items()},
        **({"mean": agg["mean"], "std": agg["std"]} if agg else {}),
        "report": str(report),
    }
    write_json(out / "demo_results.json", summary, indent=1)
    md = "\n\n".join(
        [f"### {title}\n\n{markdown_table(r)}" for title, r in texts]
        + [f"### {title}\n\n{markdown_table(r, header)}" for title, header, r in diag]
        + ([board_md] if board_md else [])
    )
    with atomic_open(out / "demo_results.md", "w") as f:
        f.write(md + "\n")
    print()
    print(
        f"simcal demo ({budget}), val split of the synthetic set, AP in %, bins on training instances "
        "[0,10) [10,100) [100,1000) [1000,inf):"
    )
    for title, r in texts:
        print(f"\n{title}\n{markdown_table(r)}")
    for title, header, r in diag:
        print(f"\n{title}\n{markdown_table(r, header)}")
    if board_md:
        print("\n" + board_md.replace("### ", ""))
    stage = ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items() if k != "total")
    print(f"\nwall time {times['total'] / 60:.1f} min ({stage}); report: {report}")
    return json.loads(json.dumps(summary))
