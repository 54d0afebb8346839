"""``simcal predict``: batched inference to an LVIS results json per head, then evaluation.

One pass per batch serves every head asked for (original, calibrated, dual, post-hoc, oracle):
:meth:`simcal.modeling.detector.LongTailMaskRCNN.detect` computes the backbone, RPN and RoI
features once and hands them to one scorer per head (:mod:`simcal.modeling.scoring`); masks are
computed once per distinct detection and pasted only for the final detections. Results stream
to a temporary file per head that is renamed when complete (:func:`simcal.io.atomic_open`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from tqdm import tqdm

from simcal import choices
from simcal.config import Config, InferenceConfig, apply_overrides
from simcal.data.annotations import first_images, load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap, data_loader
from simcal.data.stats import class_instance_counts
from simcal.engine.runtime import default_device, setup_torch
from simcal.errors import InputError
from simcal.evaluation.lvis_eval import EvalResult, evaluate, resolve_category_stats
from simcal.io import atomic_open, write_json
from simcal.modeling.calibration import load_head
from simcal.modeling.detector import LongTailMaskRCNN, build_detector, eval_mode, load_detector_weights
from simcal.modeling.roi_heads import Scorer
from simcal.modeling.scoring import build_scorer
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


def encode_rle(masks: Tensor) -> list[dict[str, Any]]:
    """``(N, H, W)`` bool -> compressed RLE dicts with ``counts`` as str (json-ready)."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(arr)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


class ResultsWriter:
    """Write a JSON list one detection per line; the file appears only when complete."""

    def __init__(self, f: TextIO) -> None:
        self._f = f
        self._first = True
        self.count = 0

    def write(self, det: dict[str, Any]) -> None:
        self._f.write(("[\n" if self._first else ",\n") + json.dumps(det))
        self._first = False
        self.count += 1

    def close(self) -> None:
        self._f.write("[]\n" if self._first else "\n]\n")


@contextmanager
def results_file(path: str | os.PathLike[str]) -> Iterator[ResultsWriter]:
    """A :class:`ResultsWriter` on ``path``, written atomically (nothing appears if the block fails)."""
    with atomic_open(path, "w") as f:
        w = ResultsWriter(f)
        yield w
        w.close()


def detections_to_results(det: dict[str, Tensor], image_id: int, label_map: LabelMap) -> Iterator[dict[str, Any]]:
    """One image's detections (boxes xyxy in original pixels, masks bool ``(N, H, W)``) as LVIS results."""
    boxes = det["boxes"].cpu()
    scores = det["scores"].cpu().tolist()
    labels = det["labels"].cpu().tolist()
    rles = encode_rle(det["masks"]) if "masks" in det else [None] * len(scores)
    for box, score, label, rle in zip(boxes.tolist(), scores, labels, rles):
        x0, y0, x1, y1 = box
        out = {
            "image_id": image_id,
            "category_id": label_map.to_category(label),
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": round(score, 5),
        }
        if rle is not None:
            out["segmentation"] = rle
        yield out


@dataclass(frozen=True)
class HeadSpec:
    """One head of ``simcal predict --head``: a scorer kind and its settings, and the folder it writes.

    ``kind``: one of :data:`simcal.choices.SCORERS`; ``combine`` / ``T``: the dual head's combiner
    and threshold; ``param``: gamma of ``norcal``, tau of ``logit-adj``; ``cal``: which calibrated
    head (``""``: the default one) for ``cal`` / ``dual``.
    """

    kind: str
    combine: str = "sel"
    T: float = 300.0
    param: float = 1.0
    cal: str = ""

    @property
    def tag(self) -> str:
        """The folder name under ``predictions/<split>/``: ``orig``, ``dual``, ``dual_avg_T100``, ``cal@NAME``..."""
        suffix = f"@{self.cal}" if self.cal else ""
        if self.kind == "dual":
            paper = InferenceConfig()  # the paper's dual head (sel, T = 300) is just "dual"
            base = "dual" if (self.combine, self.T) == (paper.combine, paper.T) else f"dual_{self.combine}_T{self.T:g}"
            return base + suffix
        if self.kind in choices.POSTHOC:
            return f"{self.kind}_{self.param:g}"
        return self.kind + (suffix if self.kind == "cal" else "")

    @property
    def needs_calibrated_head(self) -> bool:
        return self.kind in ("cal", "dual")


def parse_heads(kinds: list[str], combine_name: str, T: float, param: float) -> list[HeadSpec]:
    """Head specs from kind names, with clear errors for unknown kinds or combiners."""
    specs = []
    for kind in kinds:
        if kind not in choices.SCORERS:
            raise InputError("--head", "head", f"unknown head {kind!r}: expected one of {', '.join(choices.SCORERS)}")
        if kind == "dual" and combine_name not in choices.COMBINERS:
            raise InputError("--combine", "combine", f"unknown {combine_name!r}: one of {', '.join(choices.COMBINERS)}")
        specs.append(HeadSpec(kind, combine_name, float(T), float(param)))
    if len({s.tag for s in specs}) != len(specs):
        raise InputError("--head", "head", "a head is listed twice")
    return specs


def build_scorers(specs: list[HeadSpec], cal_heads: dict[str, nn.Module], counts: Tensor | None) -> dict[str, Scorer]:
    """Tag -> scorer for each spec (``cal_heads``: name -> calibrated head, ``""`` the default)."""
    out = {}
    for spec in specs:
        try:
            out[spec.tag] = build_scorer(
                spec.kind, head=cal_heads.get(spec.cal), counts=counts, combine=spec.combine, T=spec.T, param=spec.param
            )
        except ValueError as e:
            raise InputError("--head", spec.kind, str(e)) from None
    return out


def load_model(run: str | os.PathLike[str], checkpoint: str | None = None, cfg: Config | None = None):
    """``(model, label_map, cfg)``: a run's trained detector in eval mode (final weights unless
    ``checkpoint``), built from ``cfg`` (default: the run's config)."""
    r = Run(run)
    cfg = cfg or r.load_config()
    label_map = LabelMap.load(r.label_map)
    model = build_detector(cfg.model, label_map.num_classes)
    load_detector_weights(model, Path(checkpoint) if checkpoint else r.model_final, r.label_map)
    return model.eval(), label_map, cfg


def load_calibrated_head(run: str | os.PathLike[str], name: str | None, model: LongTailMaskRCNN) -> nn.Module:
    """The calibrated head ``name`` of a run (default: :meth:`simcal.run.Run.resolve_calibration`)."""
    r = Run(run)
    head, _ = load_head(r.calibration(r.resolve_calibration(name)).head, model.roi_heads)
    return head.eval()


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
    batch_size: int = 8,
    num_workers: int = 1,
    max_images: int | None = None,
    progress: bool = True,
    evaluate_results: bool = True,
) -> dict[str, dict[str, EvalResult]]:
    """Run a trained run's detector with each of ``heads`` (default: the original) on a split.

    ``heads`` are :data:`simcal.choices.SCORERS`; ``overrides`` (``section.key=value``, see
    :data:`OVERRIDABLE`) change the run config's ``inference`` section (``dual`` merges with
    ``inference.combine`` and ``inference.T``, the post-hoc methods take ``inference.param``) and
    the model's test-time settings for this prediction only.

    One pass per batch serves every head. Writes ``predictions/<split>/<head>/results.json`` and,
    with ``evaluate_results``, ``metrics_bbox.json`` / ``metrics_segm.json`` beside it; with
    ``max_images`` below the split's size, under ``predictions/<split>-first<N>/`` instead (never
    over the whole split's). ``split``: the config's ``val`` / ``train``, or a name for ``gt_json``
    (the config's names are refused for other annotations).
    ``calibration`` names the calibrated head (default: ``3fc_ft``, else the only one there is).
    Results of a head other than ``3fc_ft`` go to ``cal@<name>`` / ``dual@<name>``, so comparing
    calibrations never overwrites ``cal`` / ``dual``.

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
    return predict_split(
        model,
        label_map,
        cfg,
        specs,
        cal_heads,
        split,
        r.predictions(split),
        gt_json=gt_json,
        images=images,
        batch_size=batch_size,
        num_workers=num_workers,
        max_images=max_images,
        progress=progress,
        evaluate_results=evaluate_results,
    )


def _check_split(cfg: Config, split: str, gt_json: str | None) -> None:
    """Refuse a split name whose predictions would be mistaken for others': ``val-first50`` (the
    name :meth:`PredictionFiles.partial` gives) or the config's ``val`` / ``train`` for another --gt."""
    base, first = parse_split(split)
    if first is not None:
        raise InputError(
            "--split",
            "split",
            f"{split} names predictions on the first {first} images: pass --split {base} --max-images {first}",
        )
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
    *,
    gt_json: str | None = None,
    images: str | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, EvalResult]]:
    """:func:`run_heads` on a split of a run's config (or on ``gt_json`` / ``images``), with the
    run's training annotations and threads. ``kwargs`` go to :func:`run_heads`."""
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
        threads=cfg.train.threads,
        desc=f"predict {split}",
        **kwargs,
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
    threads: int = 0,
    counts: Tensor | None = None,
    batch_size: int = 8,
    num_workers: int = 1,
    max_images: int | None = None,
    progress: bool = True,
    evaluate_results: bool = True,
    ious: tuple[str, ...] = ("bbox", "segm"),
    verbose: bool = True,
    desc: str = "predict",
    device: torch.device | None = None,
) -> dict[str, dict[str, EvalResult]]:
    """Predict with every head spec in one pass per batch; write results (and metrics) per head under ``out``.

    ``counts`` ``(C,)``: the training instance counts (default: from ``train_json``). Without
    ``segm`` in ``ious`` no mask is computed. ``device``: where to run (default: CUDA when
    available, else the CPU); the model runs in eval mode and is given back in its own mode.
    With ``max_images`` below the number of images, the files go to ``out.partial(N)``.
    """
    setup_torch(threads)
    device = device or default_device()
    model.to(device)
    gt = load_dataset(gt_json)
    train, train_counts = training_counts(train_json, label_map, device)
    counts = train_counts if counts is None else counts.to(device)
    cal_heads = {k: v.to(device).eval() for k, v in cal_heads.items()}
    scorers = build_scorers(specs, cal_heads, counts)
    with_targets = any(h.kind == "oracle" for h in specs)

    dataset = DetectionDataset(gt, images, label_map=label_map, with_masks=False, source=gt_json)
    indices = list(range(len(dataset)))[: max_images or None]
    if len(indices) < len(dataset):  # never in place of the whole split's predictions
        out = out.partial(len(indices))
        if verbose:
            print(f"the first {len(indices)} of {len(dataset)} images: predictions go to {out.root}")
    loader = data_loader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        writers = {tag: stack.enter_context(results_file(out.head(tag).results)) for tag in scorers}
        for imgs, targets in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            per_head = model.detect(
                [im.to(device) for im in imgs],
                scorers,
                targets=targets if with_targets else None,
                with_masks="segm" in ious,
            )
            for tag, dets in per_head.items():
                for det, tgt in zip(dets, targets):
                    for rec in detections_to_results(det, int(tgt["image_id"]), label_map):
                        writers[tag].write(rec)
    if verbose:
        for tag, w in writers.items():
            print(f"{tag}: {w.count} detections on {len(indices)} images -> {out.head(tag).results}")
    if not evaluate_results:
        return {}
    if max_images:
        gt = first_images(gt, len(indices))
    stats = resolve_category_stats(gt, gt_json, train, str(train_json))
    metrics: dict[str, dict[str, EvalResult]] = {}
    for tag in scorers:
        files = out.head(tag)
        results = json.loads(files.results.read_text())
        metrics[tag] = {}
        for iou in ious:
            result = evaluate(gt, results, iou, stats)
            write_json(files.metrics(iou), {**result.to_json(), "gt": str(gt_json)}, indent=1)
            if verbose:
                print(f"[{tag}] {result.table()}")
            metrics[tag][iou] = result
    return metrics


def infer_batch(model: LongTailMaskRCNN, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """The original head's detections per image, in original image coordinates, masks pasted."""
    return model.detect(images, {"orig": build_scorer("orig")})["orig"]
