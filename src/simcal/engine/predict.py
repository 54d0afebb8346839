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

import json
import math
import os
import tempfile
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
from simcal.config import Config, InferenceConfig, apply_overrides, classifier_of
from simcal.data.annotations import check_categories, first_images, load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap, data_loader
from simcal.data.stats import class_instance_counts, declared_bins
from simcal.engine import distributed as dist_utils
from simcal.engine.runtime import default_device, setup_torch
from simcal.errors import InputError
from simcal.evaluation.lvis_eval import EvalResult, evaluate_protocols, resolve_category_stats
from simcal.io import atomic_open, file_sha256, load_checkpoint, write_json, writes_run
from simcal.modeling.calibration import load_head
from simcal.modeling.detector import (
    LongTailMaskRCNN,
    build_detector,
    eval_mode,
    load_detector_weights,
    paste_masks,
)
from simcal.modeling.roi_heads import Scorer
from simcal.modeling.scoring import build_scorer
from simcal.run import DEFAULT_CALIBRATION, HeadTag, PredictionFiles, Run, parse_split, resolve_split

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
        self.write_line(json.dumps(det))

    def write_line(self, line: str) -> None:
        """Write one detection already serialised as json (no newline)."""
        self._f.write(("[\n" if self._first else ",\n") + line)
        self._first = False
        self.count += 1

    def close(self) -> None:
        self._f.write("[]\n" if self._first else "\n]\n")


@contextmanager
def results_file(path: str | os.PathLike[str]) -> Iterator[ResultsWriter]:
    """A :class:`ResultsWriter` on ``path``, written atomically (nothing appears if the block fails).
    It streams for the whole prediction: a signal stops it at once (only the rename waits)."""
    with atomic_open(path, "w", defer_signals=False) as f:
        w = ResultsWriter(f)
        yield w
        w.close()


class TopKResults:
    """The ``k`` best detections of each class over a split, kept as the images stream past.

    Every detection handed to :meth:`add` is spooled as a json line to an anonymous temporary file
    beside ``path`` (gone however the process ends); memory holds only scores and line numbers, at
    most ``k`` per class plus one batch. :attr:`floor` ``(C+1,)`` is each class's ``k``-th best
    score so far (``-inf`` until it has ``k``): a candidate below it can never be among the ``k``
    best, so predict drops it before NMS. :meth:`finish` writes the kept lines to ``path``
    atomically, in the order they came (image order).
    """

    def __init__(self, path: Path, num_classes: int, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.path, self.k = Path(path), k
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._spool: TextIO = tempfile.TemporaryFile("w+", dir=self.path.parent, encoding="utf-8")
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(self.path.parent)) from e
        self._scores = [np.empty(0, np.float64) for _ in range(num_classes + 1)]
        self._ids = [np.empty(0, np.int64) for _ in range(num_classes + 1)]
        self.floor = torch.full((num_classes + 1,), -math.inf)
        self.seen = 0
        self.count = 0

    def add(self, labels: Tensor, records: list[dict[str, Any]]) -> None:
        """One batch of detections: ``labels`` ``(N,)`` contiguous class labels of ``records``."""
        if not records:
            return
        try:
            self._spool.write("".join(json.dumps(r) + "\n" for r in records))
        except OSError as e:  # the spool has no name of its own: name the folder it fills
            raise OSError(e.errno, e.strerror or str(e), str(self.path.parent)) from e
        lab = labels.cpu().numpy()
        scores = np.array([r["score"] for r in records], dtype=np.float64)
        ids = np.arange(self.seen, self.seen + len(records))
        self.seen += len(records)
        order = np.argsort(lab, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(lab[order])) + 1):
            c = int(lab[group[0]])
            s = np.concatenate([self._scores[c], scores[group]])
            i = np.concatenate([self._ids[c], ids[group]])
            if s.size > self.k:
                best = np.argpartition(-s, self.k - 1)[: self.k]
                s, i = s[best], i[best]
            self._scores[c], self._ids[c] = s, i
            if s.size >= self.k:
                self.floor[c] = float(s.min())

    def finish(self) -> None:
        """Write the kept detections to ``path`` (atomically) and close the spool."""
        keep = np.zeros(self.seen, dtype=bool)
        keep[np.concatenate(self._ids)] = True
        self._spool.seek(0)
        with results_file(self.path) as w:
            for line, kept in zip(self._spool, keep):
                if kept:
                    w.write_line(line.rstrip("\n"))
        self.count = w.count
        self.close()

    def close(self) -> None:
        self._spool.close()


def merge_parts(parts: list[Path], path: Path, label_map: LabelMap, topk: int | None = None) -> int:
    """The processes' parts of one head's results (each a results file of its contiguous share
    of the images), concatenated in the given (rank, hence image) order into ``path``, atomically,
    a line at a time; with ``topk``, cut again to the ``topk`` best of each class over all parts
    (each part holds its own share's best). The parts are removed. Returns the detections written."""

    def lines() -> Iterator[str]:
        for part in parts:
            with open(part, encoding="utf-8") as f:
                for line in f:
                    line = line.strip().rstrip(",")
                    if line and line not in ("[", "]", "[]"):
                        yield line

    if topk:
        top = TopKResults(path, label_map.num_classes, topk)
        try:
            block: list[dict[str, Any]] = []
            for line in lines():
                block.append(json.loads(line))
                if len(block) == 4096:
                    top.add(torch.tensor([label_map.to_label(d["category_id"]) for d in block]), block)
                    block = []
            top.add(torch.tensor([label_map.to_label(d["category_id"]) for d in block], dtype=torch.long), block)
            top.finish()
        finally:
            top.close()
        count = top.count
    else:
        with results_file(path) as w:
            for line in lines():
                w.write_line(line)
        count = w.count
    for part in parts:
        part.unlink()
    return count


@contextmanager
def no_per_image_cap(model: LongTailMaskRCNN) -> Iterator[None]:
    """Every detection that survives NMS, however many per image (``detections_per_img`` 0)."""
    old = model.roi_heads.detections_per_img
    model.roi_heads.detections_per_img = 0
    try:
        yield
    finally:
        model.roi_heads.detections_per_img = old


#: masks pasted and encoded at a time by :func:`detections_to_results` (bounds its memory)
PASTE_CHUNK = 256


def encode_masks(det: dict[str, Tensor], size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """The RLEs of one image's masks: pasted ``(N, H, W)`` bool, or ``(N, 1, 28, 28)`` probabilities
    that are pasted into an image of ``size`` and encoded :data:`PASTE_CHUNK` at a time."""
    masks = det["masks"]
    if masks.dim() == 3:
        return encode_rle(masks)
    if size is None:
        raise ValueError("masks in box coordinates need the image size to be pasted")
    h, w = size
    rles: list[dict[str, Any]] = []
    for s in range(0, masks.shape[0], PASTE_CHUNK):
        rles += encode_rle(paste_masks(masks[s : s + PASTE_CHUNK, 0], det["boxes"][s : s + PASTE_CHUNK], h, w))
    return rles


def detections_to_results(
    det: dict[str, Tensor], image_id: int, label_map: LabelMap, size: tuple[int, int] | None = None
) -> Iterator[dict[str, Any]]:
    """One image's detections (boxes xyxy in original pixels; masks pasted, or in box coordinates
    with the image's ``size`` (H, W), see :func:`encode_masks`) as LVIS results."""
    boxes = det["boxes"].cpu()
    scores = det["scores"].cpu().tolist()
    labels = det["labels"].cpu().tolist()
    rles = encode_masks(det, size) if "masks" in det else [None] * len(scores)
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
        return HeadTag(self.base, self.cal if self.needs_calibrated_head else "").format()

    @property
    def base(self) -> str:
        """:attr:`simcal.run.HeadTag.base`: the scorer with the settings that are not the paper's defaults."""
        if self.kind == "dual":
            paper = InferenceConfig()  # the paper's dual head (sel, T = 300) is just "dual"
            return "dual" if (self.combine, self.T) == (paper.combine, paper.T) else f"dual_{self.combine}_T{self.T:g}"
        if self.kind in choices.POSTHOC:
            return f"{self.kind}_{self.param:g}"
        return self.kind

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
    classifier = classifier_of(cfg)
    weights = Path(checkpoint) if checkpoint else r.model_final
    state = load_checkpoint(weights)
    saved = state.get("classifier") if isinstance(state, dict) else None
    groups = saved.get("groups") if isinstance(saved, dict) and saved.get("name") == classifier else None
    counts = None
    if classifier == "group_softmax" and groups is None:  # a checkpoint from before the groups were saved
        if not cfg.data.train_json or not os.path.exists(cfg.data.train_json):
            raise InputError(
                r.config, "data.train_json", "the group softmax classifier needs the training annotations (its groups)"
            )
        counts = class_instance_counts(load_dataset(cfg.data.train_json), label_map.category_ids, cfg.data.train_json)
    model = build_detector(
        cfg.model,
        label_map.num_classes,
        classifier=classifier,
        instance_counts=counts,
        classifier_groups=groups,
        pretrained=False,
    )  # its weights come from the run: model.weights / weights_backbone are not read again
    state = load_detector_weights(model, weights, r.label_map, state=state)
    model.provenance = detector_provenance(weights, state)
    return model.eval(), label_map, cfg


def detector_provenance(path: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, Any]:
    """What identifies a detector's weights: the file, its sha256 and the training iteration it holds."""
    iteration = state.get("iteration") if isinstance(state, dict) else None
    return {"checkpoint": str(path), "sha256": file_sha256(path), "iteration": iteration}


def load_calibrated_head(run: str | os.PathLike[str], name: str | None, model: LongTailMaskRCNN) -> nn.Module:
    """The calibrated head ``name`` of a run (default: :meth:`simcal.run.Run.resolve_calibration`).

    A head records the detector it was calibrated on (:func:`detector_provenance`); a head whose
    detector is not ``model``'s (the run trained on since, or another ``--checkpoint``) is an
    :class:`InputError` saying how to recalibrate. Heads from before the record are taken as they are.
    """
    r = Run(run)
    path = r.calibration(r.resolve_calibration(name)).head
    head, meta = load_head(path, model.roi_heads)
    calibrated_on, now = meta.get("detector"), getattr(model, "provenance", None)
    if isinstance(calibrated_on, dict) and now is not None and calibrated_on.get("sha256") != now["sha256"]:
        raise InputError(
            path,
            "meta.detector",
            f"calibrated on another detector ({Path(str(calibrated_on.get('checkpoint'))).name} at iteration "
            f"{calibrated_on.get('iteration')}, sha256 {str(calibrated_on.get('sha256'))[:12]}) than "
            f"{Path(now['checkpoint']).name} now (iteration {now['iteration']}, sha256 {now['sha256'][:12]}): "
            f"calibrate again (simcal calibrate --run {run} --name NEW_NAME), or predict with the detector it "
            "was calibrated on (--checkpoint)",
        )
    head.provenance = {
        "name": path.parent.name,
        "file": str(path),
        "sha256": file_sha256(path),
        "detector": calibrated_on,
    }
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
                    records = detections_to_results(det, int(tgt["image_id"]), label_map, tuple(im.shape[-2:]))
                    if topk_per_class:
                        tops[tag].add(det["labels"], list(records))
                        continue
                    for rec in records:
                        writers[tag].write(rec)
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
        results = json.loads(files.results.read_text())
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
