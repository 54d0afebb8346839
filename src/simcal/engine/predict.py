"""``simcal predict``: batched inference to an LVIS results json per head, then evaluation.

One pass per batch serves every head asked for (original, calibrated, dual, post-hoc, oracle):
:meth:`simcal.modeling.detector.LongTailMaskRCNN.detect` computes the backbone, RPN and RoI
features once and hands them to one scorer per head (:mod:`simcal.modeling.scoring`); masks are
computed once per distinct detection and pasted only for the final detections. Results stream
to a temporary file per head that is renamed when complete (:func:`simcal.io.atomic_open`).

``--topk-per-class K`` (AP-fixed's inference, Dave et al. 2021): no per-image cap; each head keeps
the K best detections of each class over the whole split (:class:`TopKResults`). A running
per-class threshold (the class's K-th best score so far) drops hopeless candidates before NMS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from simcal import choices
from simcal.config import Config, apply_overrides
from simcal.data.annotations import check_categories, first_images, load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap, data_loader
from simcal.data.results import DetectionsBuilder, read_results
from simcal.data.stats import class_instance_counts, declared_bins
from simcal.engine import distributed as dist_utils
from simcal.engine.checkpoint import load_calibrated_head, load_model
from simcal.engine.results import TopKResults, detections_to_results, merge_parts, results_file
from simcal.engine.runtime import default_device, setup_torch
from simcal.errors import InputError
from simcal.evaluation.lvis_eval import evaluate_protocols, resolve_category_stats
from simcal.evaluation.result import EvalResult
from simcal.io import write_json, writes_run
from simcal.modeling.detector import (
    LongTailMaskRCNN,
    eval_mode,
)
from simcal.modeling.scoring import HeadSpec, build_scorer, build_scorers, parse_heads
from simcal.run import DEFAULT_CALIBRATION, PredictionFiles, Run, parse_split, resolve_split

#: what ``simcal predict`` accepts as ``section.key=value`` overrides: the inference section and
#: the model's test-time settings
OVERRIDABLE = (
    "inference.",
    "model.score_thresh",
    "model.nms_thresh",
    "model.detections_per_img",
    "model.rpn_pre_nms_top_n_test",
    "model.rpn_post_nms_top_n_test",
    "model.min_size",
    "model.max_size",
    "model.channels_last",
)


@contextmanager
def no_per_image_cap(model: LongTailMaskRCNN) -> Iterator[None]:
    """Every detection that survives NMS, however many per image (``detections_per_img`` 0)."""
    old = model.roi_heads.detections_per_img
    model.roi_heads.detections_per_img = 0
    try:
        yield
    finally:
        model.roi_heads.detections_per_img = old


def only_categories(label_map: LabelMap, gt: dict[str, Any], verbose: bool = True) -> Tensor | None:
    """``(C + 1,)`` bool, True at the labels whose category the annotations ``gt`` have, when they
    lack some of the detector's (``predict --allow-category-subset``); ``None`` when they have all.
    Detections of the others are left out of the results (the evaluation engine could never match
    them, and the analyses read the results against the same annotations)."""
    have = {c["id"] for c in gt["categories"]}
    keep = torch.tensor([False] + [c in have for c in label_map.category_ids])
    if bool(keep[1:].all()):
        return None
    if verbose:
        print(
            f"--allow-category-subset: the {int(keep.sum())} of the detector's {label_map.num_classes} categories "
            "the annotations have are predicted and evaluated; detections of the others are left out"
        )
    return keep


def only_labels(det: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """One image's detections ``det`` (``labels`` ``(N,)``, every per-detection tensor ``(N, ...)``)
    without those whose label ``keep`` ``(C + 1,)`` marks False."""
    mask = keep.to(det["labels"].device)[det["labels"]]
    n = len(mask)
    return {k: v[mask] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v for k, v in det.items()}


def training_counts(
    train_json: str | None, label_map: LabelMap, device: torch.device
) -> tuple[dict[str, Any] | None, Tensor | None]:
    """The training annotations (when the file exists) and the instance count per label ``(C,)``."""
    if not train_json or not os.path.exists(train_json):
        return None, None
    train = load_dataset(train_json)
    counts = torch.tensor(
        class_instance_counts(train, label_map.category_ids, str(train_json)), dtype=torch.float32, device=device
    )
    return train, counts


@dataclass(frozen=True)
class PredictOptions:
    """How a prediction runs, passed down whole (:func:`predict` -> :func:`predict_split` ->
    :func:`run_heads`).

    ``batch_size`` images per forward pass, ``num_workers`` loader workers; ``max_images``: only
    the first N (their files under ``<split>-first<N>``); ``topk_per_class`` K: AP-fixed's
    inference (no per-image cap, the K best of each class over the split, under ``<split>-topk<K>``);
    ``evaluate_results``: write and return metrics; ``ious``: which to evaluate (without ``segm``
    no mask is computed); ``progress``: a tqdm bar; ``verbose``: print where the files went and
    the metrics; ``category_subset``: evaluate annotations whose categories differ from the
    detector's on those both have (refused otherwise).
    """

    batch_size: int = 8
    num_workers: int = 1
    max_images: int | None = None
    topk_per_class: int | None = None
    evaluate_results: bool = True
    ious: tuple[str, ...] = ("bbox", "segm")
    progress: bool = True
    verbose: bool = True
    category_subset: bool = False


@writes_run
def predict(
    run: str | os.PathLike[str],
    *,
    heads: list[str] | None = None,
    overrides: list[str] | None = None,
    calibration: str | None = None,
    split: str = "val",
    gt_json: str | None = None,
    images: str | None = None,
    checkpoint: str | None = None,
    options: PredictOptions = PredictOptions(),
) -> dict[str, dict[str, EvalResult]]:
    """Run a trained run's detector with each of ``heads`` (default: the original) on a split.

    ``heads`` are :data:`simcal.choices.SCORERS`; ``overrides`` (``section.key=value``, see
    :data:`OVERRIDABLE`) change the run config's ``inference`` section (``dual`` merges with
    ``inference.combine`` and ``inference.T``, the post-hoc methods take ``inference.param``) and
    the model's test-time settings for this prediction only.

    One pass per batch serves every head (``options``: :class:`PredictOptions`). Writes
    ``predictions/<split>/<head>/results.json`` and, with ``evaluate_results``,
    ``metrics_bbox.json`` / ``metrics_segm.json`` beside it; with ``max_images`` below the split's
    size, under ``predictions/<split>-first<N>/`` instead (never over the whole split's); with
    ``topk_per_class`` K (AP-fixed's inference: no per-image cap, the K best detections of each
    class over the split), under ``predictions/<split>-topk<K>/``, with
    ``metrics_<iou>_fixed.json`` and ``metrics_<iou>_pool.json``. Under torchrun the images are
    sharded over the processes and rank 0 merges and evaluates (see :func:`run_heads`).
    ``split``: the config's ``val`` / ``train``, or a name for ``gt_json`` (the config's names
    are refused for other annotations).
    ``calibration`` names the calibrated head (default: ``3fc_ft``, else the only one there is).
    ``category_subset``: annotations whose categories differ from the run's are evaluated on the
    categories both have (refused otherwise). Results of a head other than ``3fc_ft`` go to
    ``cal@<name>`` / ``dual@<name>``, so comparing calibrations never overwrites ``cal`` / ``dual``.

    Returns:
        ``{head tag: {"bbox": EvalResult, "segm": EvalResult}}`` (empty without evaluation).
    """
    r = Run(run)
    cfg = r.load_config()
    _check_split(cfg, split, gt_json)
    if overrides:
        cfg = apply_overrides(cfg, overrides, str(r.config), OVERRIDABLE, stored=True)
    model, label_map, cfg = load_model(run, checkpoint, cfg)
    inf = cfg.inference
    specs = parse_heads(heads or ["orig"], inf.combine, inf.T, inf.param)
    cal_heads = {}
    if any(h.needs_calibrated_head for h in specs):
        name = r.resolve_calibration(calibration)
        key = "" if name == DEFAULT_CALIBRATION else name
        cal_heads[key] = load_calibrated_head(run, name, model)
        specs = [replace(h, cal=key) if h.needs_calibrated_head else h for h in specs]
    _, _, device = dist_utils.init_distributed()  # torchrun: one process per device, images sharded
    return predict_split(
        model,
        label_map,
        cfg,
        specs,
        cal_heads,
        split,
        r.predictions(split),
        options,
        device=device,
        gt_json=gt_json,
        images=images,
    )


def _check_split(cfg: Config, split: str, gt_json: str | None) -> None:
    """Refuse a split name whose predictions would be mistaken for others': ``val-first50`` (the
    name :meth:`PredictionFiles.partial` gives) or the config's ``val`` / ``train`` for another --gt."""
    base, first, topk = parse_split(split)
    if first is not None or topk is not None:
        flags = "".join(f" {flag} {n}" for flag, n in (("--max-images", first), ("--topk-per-class", topk)) if n)
        names = " and ".join(
            what
            for what, n in ((f"the first {first} images", first), (f"the {topk} best detections per class", topk))
            if n
        )
        raise InputError("--split", "split", f"{split} names predictions on {names}: pass --split {base}{flags}")
    own = {"val": cfg.data.val_json, "train": cfg.data.train_json}.get(split)
    if gt_json is not None and own and Path(gt_json).resolve() != Path(own).resolve():
        raise InputError(
            "--split",
            "split",
            f"--gt {gt_json} is not the run's {split} annotations ({own}): name its predictions with --split NAME",
        )


def predict_split(
    model: LongTailMaskRCNN,
    label_map: LabelMap,
    cfg: Config,
    specs: list[HeadSpec],
    cal_heads: dict[str, nn.Module],
    split: str,
    out: PredictionFiles,
    options: PredictOptions = PredictOptions(),
    *,
    gt_json: str | None = None,
    images: str | None = None,
    device: torch.device | None = None,
) -> dict[str, dict[str, EvalResult]]:
    """:func:`run_heads` on a split of a run's config (or on ``gt_json`` / ``images``), with the
    run's training annotations and threads."""
    gt_json, image_dir = resolve_split(cfg, split, gt_json, images)
    return run_heads(
        model,
        label_map,
        specs,
        cal_heads,
        gt_json=gt_json,
        images=image_dir,
        train_json=cfg.data.train_json,
        out=out,
        options=options,
        threads=cfg.train.threads,
        desc=f"predict {split}",
        device=device,
    )


def run_heads(
    model: LongTailMaskRCNN,
    label_map: LabelMap,
    specs: list[HeadSpec],
    cal_heads: dict[str, nn.Module],
    *,
    gt_json: str,
    images: str,
    train_json: str | None,
    out: PredictionFiles,
    options: PredictOptions = PredictOptions(),
    threads: int = 0,
    counts: Tensor | None = None,
    desc: str = "predict",
    device: torch.device | None = None,
) -> dict[str, dict[str, EvalResult]]:
    """Predict with every head spec in one pass per batch; write results (and metrics) per head under ``out``.

    ``options``: :class:`PredictOptions`. The annotations' categories must be the detector's
    (``options.category_subset``: the ones both have are evaluated, asked for explicitly).

    ``counts`` ``(C,)``: the training instance counts (default: from ``train_json``). Without
    ``segm`` in ``ious`` no mask is computed. ``device``: where to run (default: CUDA when
    available, else the CPU); the model runs in eval mode and is given back in its own mode.
    With ``max_images`` below the number of images, the files go to ``out.partial(N)``.
    With ``topk_per_class`` K: no per-image cap, each head's K best detections per class over the
    images (:class:`TopKResults`), under ``out.topk(K)``, evaluated as AP-fixed and AP-pool with K
    per class (``metrics_<iou>_fixed.json``, ``metrics_<iou>_pool.json``; the returned dict holds
    the AP-fixed results).
    Under torchrun (an initialised process group) each process predicts a contiguous share of the
    images into its own part file, and rank 0 merges the parts in image order (:func:`merge_parts`)
    and evaluates; the other processes return ``{}``. No process holds all detections.
    """
    batch_size, num_workers, max_images = options.batch_size, options.num_workers, options.max_images
    topk_per_class, ious, verbose = options.topk_per_class, options.ious, options.verbose
    category_subset = options.category_subset
    setup_torch(threads)
    device = device or default_device()
    model.to(device)
    train, train_counts = training_counts(train_json, label_map, device)  # the run's own files first
    gt = load_dataset(gt_json)
    check_categories(gt, gt_json, label_map.category_ids, "the detector", allow_subset=category_subset)
    shared = only_categories(label_map, gt, verbose and dist_utils.rank() == 0)
    counts = train_counts if counts is None else counts.to(device)
    cal_heads = {k: v.to(device).eval() for k, v in cal_heads.items()}
    scorers = build_scorers(specs, cal_heads, counts)
    with_targets = any(h.kind == "oracle" for h in specs)

    dataset = DetectionDataset(gt, images, label_map=label_map, with_masks=False, source=gt_json)
    indices = list(range(len(dataset)))[: max_images or None]
    if len(indices) < len(dataset):  # never in place of the whole split's predictions
        out = out.partial(len(indices))
        if verbose and dist_utils.rank() == 0:
            print(f"the first {len(indices)} of {len(dataset)} images: predictions go to {out.root}")
    if topk_per_class:
        out = out.topk(topk_per_class)
    # under torchrun: each process takes a contiguous share of the images, in order, and writes its
    # own part of every head's results; rank 0 merges the parts in rank (= image) order
    world, rank = dist_utils.world_size(), dist_utils.rank()
    mine = [int(i) for i in np.array_split(np.asarray(indices, dtype=np.int64), world)[rank]]

    def target(tag: str) -> Path:
        return out.head(tag).part(rank) if world > 1 else out.head(tag).results

    loader = data_loader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size, num_workers=num_workers)
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        if topk_per_class:
            stack.enter_context(no_per_image_cap(model))
            tops = {tag: TopKResults(target(tag), label_map.num_classes, topk_per_class) for tag in scorers}
            for top in tops.values():
                stack.callback(top.close)
        else:
            writers = {tag: stack.enter_context(results_file(target(tag))) for tag in scorers}
        # the evaluation takes the detections from memory (the file is for the user); under
        # torchrun and for top-k it reads the merged / kept file
        columns = {}
        if options.evaluate_results and not topk_per_class and world == 1:
            columns = {tag: DetectionsBuilder(masks="segm" in ious) for tag in scorers}
        show = options.progress and rank == 0
        for imgs, targets in tqdm(loader, desc=desc, disable=not show, dynamic_ncols=True):
            per_head = model.detect(
                [im.to(device) for im in imgs],
                scorers,
                targets=targets if with_targets else None,
                with_masks="segm" in ious,
                min_scores={tag: top.floor for tag, top in tops.items()} if topk_per_class else None,
                per_class=topk_per_class or 0,
                paste=False,  # pasted and encoded a few at a time below
            )
            for tag, dets in per_head.items():
                for det, tgt, im in zip(dets, targets, imgs):
                    if shared is not None:
                        det = only_labels(det, shared)
                    size = tuple(im.shape[-2:])
                    records = list(detections_to_results(det, int(tgt["image_id"]), label_map, size))
                    if topk_per_class:
                        tops[tag].add(det["labels"], records)
                        continue
                    for rec in records:
                        writers[tag].write(rec)
                    if tag in columns:
                        for rec in records:
                            columns[tag].add(rec)
        if topk_per_class:
            for top in tops.values():
                top.finish()
            writers = tops  # type: ignore[assignment]
    counts = {tag: w.count for tag, w in writers.items()}
    # which detector and calibrated head made each head's results: beside its results file, in its metrics
    made_by = {}
    for spec in specs:
        head = cal_heads.get(spec.cal) if spec.needs_calibrated_head else None
        record = getattr(head, "provenance", None)
        heads = {record["name"]: record} if record else None
        made_by[spec.tag] = {
            "model": getattr(model, "provenance", None),
            "calibrated_heads": heads,
            "category_subset": category_subset,
        }
    if world > 1:
        dist_utils.barrier()  # every part is written
        if rank != 0:
            return {}
        for tag in scorers:
            parts = [out.head(tag).part(r) for r in range(world)]
            counts[tag] = merge_parts(parts, out.head(tag).results, label_map, topk_per_class)
    for tag in scorers:
        write_json(out.head(tag).provenance, made_by[tag], indent=1)
    if verbose:
        for tag, n in counts.items():
            print(f"{tag}: {n} detections on {len(indices)} images -> {out.head(tag).results}")
    if not options.evaluate_results:
        return {}
    if max_images:
        gt = first_images(gt, len(indices))
    edges = declared_bins(train)  # a `synth --like` set's scaled bins, else LVIS's
    stats = resolve_category_stats(gt, gt_json, train, str(train_json), edges)
    protocols = ("fixed", "pool") if topk_per_class else ("lvis",)
    per_class = topk_per_class or choices.FIXED_DETS_PER_CLASS
    metrics: dict[str, dict[str, EvalResult]] = {}
    for tag in scorers:
        files = out.head(tag)
        results = columns[tag].build() if tag in columns else read_results(files.results, gt, ious)
        metrics[tag] = {}
        for iou in ious:
            by_protocol = evaluate_protocols(
                gt, results, iou, stats, edges, protocols=protocols, dets_per_class=per_class
            )
            for protocol, result in by_protocol.items():
                record = {**result.to_json(), "gt": str(gt_json), **made_by[tag]}
                write_json(files.metrics(iou, protocol), record, indent=1)
                if verbose:
                    print(f"[{tag}] {result.table()}")
            metrics[tag][iou] = by_protocol[protocols[0]]
    return metrics


def infer_batch(model: LongTailMaskRCNN, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """The original head's detections per image, in original image coordinates, masks pasted."""
    return model.detect(images, {"orig": build_scorer("orig")})["orig"]
