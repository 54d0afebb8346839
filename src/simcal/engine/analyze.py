"""``simcal analyze``: the paper's analysis tools on a trained (and calibrated) run.

- ``recall``: class-agnostic proposal AR@100 / AR@1000 of the RPN (Fig. 1b);
- ``oracle``: "props-gt", every RoI that matches a ground truth (IoU >= 0.5) takes its class,
  boxes and masks unchanged: what better classification alone could give (Fig. 1c);
- ``sweep-T``: AP per bin of the dual head against the threshold T (Fig. 4c);
- ``dynamics``: AP per bin of the calibrated and dual heads every K calibration steps, from the
  snapshots ``simcal calibrate --snapshot-every K`` saved (Fig. 4a);
- ``confusion``: from saved predictions, how many of each head's detections sit on objects of
  another class, by frequency group, and AP without them (is a head-class gain a tail fix?);
- ``errors``: from saved predictions, each head's TIDE error breakdown and score calibration (ECE);
- :func:`compare_heads` (``simcal compare``): two heads' AP deltas with bootstrap intervals.

Each writes ``RUN/analysis/<tool>.json``, numbers only: ``simcal report`` draws their figures
(:mod:`simcal.report.figures`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from simcal.data.annotations import check_categories, first_images, load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap, data_loader
from simcal.data.results import load_results
from simcal.data.stats import declared_bins
from simcal.engine import distributed as dist_utils
from simcal.engine.checkpoint import load_calibrated_head, load_model
from simcal.engine.predict import PredictOptions, predict_split
from simcal.engine.runtime import setup_torch
from simcal.errors import InputError
from simcal.evaluation import diagnostics
from simcal.evaluation.analysis import CONFUSION_VARIANTS, other_object_groups, proposal_recall, proposal_rows
from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats
from simcal.evaluation.result import EvalResult
from simcal.io import atomic_open, read_json, write_json, writes_run
from simcal.modeling.calibration import load_head
from simcal.modeling.detector import eval_proposal_counts, proposal_counts
from simcal.modeling.scoring import HeadSpec
from simcal.run import DEFAULT_CALIBRATION, Run, parse_split, resolve_split, split_annotations

DEFAULT_TS = (10, 20, 50, 100, 200, 300, 500, 1000)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v  # unrounded: a table rounding it again would differ by 0.1


def _summary(r: EvalResult) -> dict[str, float | None]:
    keys = ["AP", "APr", "APc", "APf", *[k for k in r.metrics if k.startswith("AP") and k[2:].isdigit()]]
    return {k: _pct(r.metrics[k]) for k in keys}


def _analysis(run: Path, tool: str):
    """The files of ``tool`` in ``run`` (the analysis folder created)."""
    files = Run(run).analysis(tool)
    files.root.mkdir(parents=True, exist_ok=True)
    return files


@torch.no_grad()
@writes_run
def analyze_recall(
    run: Path, *, split: str = "val", max_images: int | None = None, batch_size: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Proposal AR@100 / AR@1000 (the RPN set to at least 1000 test proposals, LVIS's setting).

    Under torchrun each process runs the RPN on a contiguous share of the images and saves its
    proposals (``(P, 6)`` rows per image, :func:`~simcal.evaluation.analysis.proposal_rows`) to
    its part file; rank 0 joins the parts and evaluates. The other processes return ``{}``.
    """
    rank, world, device = dist_utils.init_distributed()
    model, label_map, cfg = load_model(run)
    setup_torch(cfg.train.threads)
    model.to(device)
    gt_json, images = resolve_split(cfg, split, None, None)
    gt = load_dataset(gt_json)
    ds = DetectionDataset(gt, images, label_map=label_map, with_masks=False, source=gt_json)
    indices = list(range(len(ds)))[: max_images or None]
    mine = [int(i) for i in np.array_split(np.asarray(indices, dtype=np.int64), world)[rank]]
    loader = data_loader(torch.utils.data.Subset(ds, mine), batch_size=batch_size)
    rows: list[np.ndarray] = []
    pre, post = eval_proposal_counts(model)
    with proposal_counts(model, max(1000, pre), max(1000, post)):
        for imgs, targets in tqdm(loader, desc="proposals", disable=not progress, dynamic_ncols=True):
            for boxes, t in zip(model.proposals([im.to(device) for im in imgs]), targets):
                rows.append(proposal_rows(int(t["image_id"]), boxes.cpu().numpy()))  # RPN order: best first
    files = Run(run).analysis("recall")
    proposals = np.concatenate(rows) if rows else np.zeros((0, 6))
    if world > 1:
        files.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(files.part(rank), "wb") as f:
            np.save(f, proposals)
        dist_utils.barrier()
        if rank != 0:
            return {}
        proposals = np.concatenate([np.load(files.part(r)) for r in range(world)])
        for r in range(world):
            files.part(r).unlink()
    image_ids = [int(ds.image_info(i)["id"]) for i in indices]
    out = proposal_recall(gt, proposals, (100, 1000), image_ids=image_ids)
    out["num_images"] = len(indices)
    out["split"] = split
    files = _analysis(run, "recall")
    write_json(files.json, out, indent=1)
    return out


def _evaluate_heads(
    run: Path,
    model: Any,
    label_map: Any,
    cfg: Any,
    specs: list[HeadSpec],
    cal_heads: dict[str, Any],
    tool: str,
    split: str,
    max_images: int | None,
    iou: str,
    progress: bool,
) -> dict[str, dict[str, EvalResult]] | None:
    """One inference pass for every head spec, evaluated with one iou type (no masks for bbox);
    the predictions go to ``analysis/<tool>/<head>/``. Under torchrun every process predicts its
    share of the images and rank 0 evaluates; the other processes get ``None``."""
    out = _analysis(run, tool).predictions
    _, _, device = dist_utils.init_distributed()  # torchrun: the images sharded, rank 0 evaluates
    options = PredictOptions(max_images=max_images, progress=progress, ious=(iou,), verbose=False)
    metrics = predict_split(model, label_map, cfg, specs, cal_heads, split, out, options, device=device)
    return metrics if dist_utils.rank() == 0 else None


def _coverage(split: str, metrics: dict[str, dict[str, EvalResult]], iou: str) -> dict[str, Any]:
    """What an analysis' numbers cover: its split and the number of images (one pass: all heads alike)."""
    return {"split": split, "num_images": next(iter(metrics.values()))[iou].num_images}


@writes_run
def analyze_oracle(
    run: Path, *, split: str = "val", max_images: int | None = None, iou: str = "bbox", progress: bool = True
) -> dict[str, Any]:
    """Original head vs props-gt oracle (and the dual head when a calibrated head exists)."""
    model, label_map, cfg = load_model(run)
    specs = [HeadSpec("orig"), HeadSpec("oracle")]
    cal_heads = {}
    if Run(run).calibrations():
        cal_heads[""] = load_calibrated_head(run, None, model)
        specs.append(HeadSpec("dual", cfg.inference.combine, cfg.inference.T))
    metrics = _evaluate_heads(run, model, label_map, cfg, specs, cal_heads, "oracle", split, max_images, iou, progress)
    if metrics is None:  # not rank 0 under torchrun: its share is predicted, rank 0 reports
        return {}
    out = {"iou": iou, **_coverage(split, metrics, iou), "heads": {tag: _summary(m[iou]) for tag, m in metrics.items()}}
    files = _analysis(run, "oracle")
    write_json(files.json, out, indent=1)
    return out


@writes_run
def analyze_sweep_T(
    run: Path,
    *,
    Ts: tuple[float, ...] = DEFAULT_TS,
    split: str = "val",
    max_images: int | None = None,
    iou: str = "bbox",
    calibration: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """AP per bin of the dual head (sel) for each T, all from one inference pass."""
    model, label_map, cfg = load_model(run)
    cal_heads = {"": load_calibrated_head(run, calibration, model)}
    specs = [HeadSpec("orig"), HeadSpec("cal")] + [HeadSpec("dual", "sel", float(t)) for t in Ts]
    metrics = _evaluate_heads(run, model, label_map, cfg, specs, cal_heads, "sweep-T", split, max_images, iou, progress)
    if metrics is None:  # not rank 0 under torchrun: its share is predicted, rank 0 reports
        return {}
    rows = [{"T": float(t), **_summary(metrics[s.tag][iou])} for t, s in zip(Ts, specs[2:])]
    out = {
        "iou": iou,
        **_coverage(split, metrics, iou),
        "orig": _summary(metrics["orig"][iou]),
        "cal": _summary(metrics["cal"][iou]),
        "sweep": rows,
        "run_T": cfg.inference.T,  # the run's own T, marked on the report's figure
    }
    files = _analysis(run, "sweep-T")
    write_json(files.json, out, indent=1)
    return out


@writes_run
def analyze_dynamics(
    run: Path,
    *,
    calibration: str | None = None,
    split: str = "val",
    max_images: int | None = None,
    iou: str = "bbox",
    progress: bool = True,
) -> dict[str, Any]:
    """AP per bin of the calibrated and dual heads at each saved calibration snapshot."""
    model, label_map, cfg = load_model(run)
    calibration = calibration or DEFAULT_CALIBRATION
    cal_files = Run(run).calibration(calibration, "--calibration")
    snaps = cal_files.snapshots()
    if not snaps:
        raise InputError(cal_files.snapshot_dir, "(snapshots)", "none: run simcal calibrate --snapshot-every K first")
    cal_heads = {}
    steps = []
    for p in snaps:
        head, meta = load_head(p, model.roi_heads)
        name = f"step{int(meta['step'])}"
        cal_heads[name] = head.eval()
        steps.append(int(meta["step"]))
    specs = [HeadSpec("orig")]
    for name in cal_heads:
        specs += [HeadSpec("cal", cal=name), HeadSpec("dual", cfg.inference.combine, cfg.inference.T, cal=name)]
    metrics = _evaluate_heads(
        run, model, label_map, cfg, specs, cal_heads, "dynamics", split, max_images, iou, progress
    )
    if metrics is None:  # not rank 0 under torchrun: its share is predicted, rank 0 reports
        return {}
    rows = []
    for step, name in zip(steps, cal_heads):
        cal = next(s for s in specs if s.kind == "cal" and s.cal == name)
        dual = next(s for s in specs if s.kind == "dual" and s.cal == name)
        rows.append({"step": step, "cal": _summary(metrics[cal.tag][iou]), "dual": _summary(metrics[dual.tag][iou])})
    out = {
        "iou": iou,
        **_coverage(split, metrics, iou),
        "calibration": calibration,
        "orig": _summary(metrics["orig"][iou]),
        "steps": rows,
    }
    files = _analysis(run, "dynamics")
    write_json(files.json, out, indent=1)
    return out


def _predicted(
    run: Path, split: str, gt_json: str | None, heads: list[str] | None, iou: str
) -> tuple[str, list[Any], int, dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]]:
    """``(gt_json, stats, number of instance bins, {head: (ground truth of its images, its
    results)})`` of the saved predictions ``RUN/predictions/<split>/<head>/`` (default: every
    head there); the bins are those the training set declares (:func:`declared_bins`)."""
    r = Run(run)
    cfg = r.load_config()
    gt_json = split_annotations(cfg, split, gt_json)
    gt = load_dataset(gt_json)
    train = load_dataset(cfg.data.train_json)
    edges = declared_bins(train)
    stats = resolve_category_stats(gt, gt_json, train, cfg.data.train_json, edges)
    label_map = LabelMap.load(r.label_map)
    pred = r.predictions(split)
    heads = heads or pred.heads()
    if not heads:
        raise InputError(pred.root, "(predictions)", "no results.json: run simcal predict first")
    out = {}
    for head in heads:
        path = pred.head(head).results
        if not path.is_file():
            raise InputError(path, "(file)", f"no predictions of head {head!r}: run simcal predict --head first")
        pred.head(head).check_made_by(run)
        made_by = read_json(pred.head(head).provenance) or {}
        check_categories(
            gt,
            gt_json,
            label_map.category_ids,
            "the detector",
            allow_subset=bool(made_by.get("category_subset")),
            remedy="predict with --allow-category-subset to ask for that",
        )
        seen = pred.head(head).metrics(iou)  # predict --max-images evaluated its first N images
        sub = first_images(gt, json.loads(seen.read_text()).get("num_images") if seen.is_file() else None)
        out[head] = (sub, load_results(path, sub, iou))
    return gt_json, stats, len(edges) + 1, out


def _protocol(split: str) -> dict[str, Any]:
    """How the predictions of ``split`` are evaluated: per-class top-k predictions
    (``val-topk10000``) as AP-fixed with their k, the others under LVIS's per-image cap."""
    topk = parse_split(split).topk
    return {"protocol": "fixed", "dets_per_class": topk} if topk else {"protocol": "lvis"}


@writes_run
def analyze_errors(
    run: Path, *, split: str = "val", gt_json: str | None = None, heads: list[str] | None = None, iou: str = "bbox"
) -> dict[str, Any]:
    """Per predicted head: the TIDE error breakdown (the AP each error type costs) and how well
    its scores are calibrated (ECE, reliability diagram), from ``RUN/predictions/<split>/``."""
    gt_json, stats, _, predicted = _predicted(run, split, gt_json, heads, iou)
    protocol = _protocol(split)
    out: dict[str, Any] = {"iou": iou, "split": split, "gt": str(gt_json), **protocol, "heads": {}}
    for head, (sub, results) in predicted.items():
        out["heads"][head] = {
            "num_images": len(sub["images"]),
            **diagnostics.errors(sub, results, iou, stats, **protocol),
        }
    files = _analysis(run, "errors")
    write_json(files.json, out, indent=1)
    return out


@writes_run
def compare_heads(
    run: Path,
    heads: tuple[str, str] = ("orig", "dual"),
    *,
    split: str = "val",
    gt_json: str | None = None,
    iou: str = "bbox",
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``heads[1]`` minus ``heads[0]`` on their saved predictions: AP, APr/c/f and AP1..AP4 deltas
    with bootstrap confidence intervals over images (the engine's bootstrap)."""
    gt_json, stats, num_bins, predicted = _predicted(run, split, gt_json, list(heads), iou)
    (sub_a, res_a), (sub_b, res_b) = predicted[heads[0]], predicted[heads[1]]
    if len(sub_a["images"]) != len(sub_b["images"]):
        raise InputError(
            Run(run).predictions(split).root,
            "(predictions)",
            f"{heads[0]} covers {len(sub_a['images'])} images, {heads[1]} {len(sub_b['images'])}: predict both "
            "on the same images",
        )
    protocol = _protocol(split)
    out = diagnostics.compare(
        sub_a,
        res_a,
        res_b,
        iou,
        stats,
        num_bins,
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
        **protocol,
    )
    out = {"heads": list(heads), "iou": iou, "split": split, "gt": str(gt_json), "seed": seed, **protocol, **out}
    files = _analysis(run, "compare")
    write_json(files.json, out, indent=1)
    return out


@writes_run
def analyze_confusion(
    run: Path,
    *,
    split: str = "val",
    gt_json: str | None = None,
    heads: list[str] | None = None,
    iou: str = "bbox",
    score: float = 0.05,
) -> dict[str, Any]:
    """Where each head's classification errors land, and the AP each head would have without them.

    Reads ``RUN/predictions/<split>/<head>/results.json`` (``simcal predict`` first; default: every
    head there). A detection of class c that sits on an object of another class d
    (:func:`other_object_groups`) is a false positive for c. This counts such detections scoring at
    least ``score`` by the frequency groups of c and d, and evaluates each head three times: as is,
    without the detections on rare and common objects, and without any on other-class objects.

    Why: a head-class AP gain of the calibrated head can come from the tail objects it no longer
    calls head classes. How much that weighs depends on the evaluation set: many tail objects (a
    class-balanced val) or exhaustive negatives make it large; LVIS's long-tailed val and sparse
    ``neg_category_ids`` make it small. The middle evaluation shows the head classes without it.
    """
    gt_json, stats, _, predicted = _predicted(run, split, gt_json, heads, iou)
    protocol = _protocol(split)
    group_of = {s.id: s.frequency for s in stats}
    out: dict[str, Any] = {"iou": iou, "split": split, "gt": str(gt_json), "score": score, **protocol, "heads": {}}
    for head, (sub, results) in predicted.items():
        on = other_object_groups(sub, results, group_of)
        counts = {g: {h: 0 for h in "rcf"} for g in "rcf"}
        for r, g in zip(results, on):
            if g is not None and r["score"] >= score:
                counts[group_of[r["category_id"]]][g] += 1
        out["heads"][head] = {
            "num_images": len(sub["images"]),
            "dets_on_other_objects": counts,  # [class group of the detection][group of the object]
            **{
                name: _summary(evaluate(sub, [r for r, g in zip(results, on) if g not in drop], iou, stats, **protocol))
                for name, drop in CONFUSION_VARIANTS.items()
            },
        }
    covered = {head: r["num_images"] for head, r in out["heads"].items()}
    if len(set(covered.values())) > 1:
        out["not_comparable"] = "the heads' predictions cover different images: " + ", ".join(
            f"{head} {n}" for head, n in covered.items()
        )
    files = _analysis(run, "confusion")
    write_json(files.json, out, indent=1)
    return out
