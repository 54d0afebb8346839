"""``simcal predict``: batched inference to an LVIS results json per head, then evaluation.

One forward pass per batch gives boxes and masks together, for every head asked for (original,
calibrated, dual, post-hoc): the backbone, RPN and RoI features are shared; masks are pasted into the image
only for the final detections, in chunks, with ``grid_sample`` (no per-mask Python loop), and
RLE-encoded straight away. Results stream to a temporary file that is renamed when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from tqdm import tqdm

from simcal.data.annotations import load_dataset
from simcal.data.dataset import DetectionDataset, LabelMap, collate
from simcal.engine.checkpoint import FINAL, load_checkpoint
from simcal.engine.train import LABEL_MAP_FILE, class_instance_counts, load_run_config, setup_torch
from simcal.errors import InputError
from simcal.evaluation.lvis_eval import EvalResult, evaluate, resolve_category_stats
from simcal.io import write_json
from simcal.modeling.calibration import load_head
from simcal.modeling.combine import COMBINERS, POSTHOC, combine, merge_detections
from simcal.modeling.detector import build_detector

PASTE_PIXELS = 20_000_000  # pixels of pasted masks held at once


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """Paste ``M x M`` mask probabilities into the image and binarise.

    Args:
        masks: ``(N, M, M)`` probabilities in box coordinates.
        boxes: ``(N, 4)`` xyxy in image pixels.

    Returns:
        ``(N, height, width)`` bool.
    """
    n = masks.shape[0]
    out = torch.zeros((n, height, width), dtype=torch.bool, device=masks.device)
    if n == 0:
        return out
    chunk = max(1, PASTE_PIXELS // max(1, height * width))
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    for s in range(0, n, chunk):
        b = boxes[s : s + chunk].float()
        x0, y0, x1, y1 = b.unbind(1)
        gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1  # (n, H)
        gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1  # (n, W)
        k = b.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, height, width), gy[:, :, None].expand(k, height, width)], dim=3)
        pasted = F.grid_sample(masks[s : s + chunk, None].float(), grid, align_corners=False)[:, 0]
        out[s : s + chunk] = pasted >= threshold
    return out


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
    """Write a JSON list one detection at a time; the file appears only when complete."""

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            w = ResultsWriter(f)
            yield w
            w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    """One way of scoring the shared RoI features.

    ``kind``: ``orig`` (the trained head), ``cal`` (the calibrated head alone), ``dual`` (both,
    merged by ``combine`` with threshold ``T``), ``norcal`` / ``logit-adj`` (zero-training
    post-hoc calibration of the original logits with ``param`` = gamma / tau), ``oracle`` (the
    analysis "props-gt": each RoI matching a ground truth at IoU >= 0.5 gets that class, with the
    original foreground probability; needs the ground truth). ``cal`` names which calibrated
    head when several are loaded (``""``: the only one).
    """

    kind: str
    combine: str = "sel"
    T: float = 300.0
    param: float = 1.0
    cal: str = ""

    @property
    def tag(self) -> str:
        suffix = f"@{self.cal}" if self.cal else ""
        if self.kind == "dual":
            base = "dual" if (self.combine, self.T) == ("sel", 300.0) else f"dual_{self.combine}_T{self.T:g}"
            return base + suffix
        if self.kind in POSTHOC:
            return f"{self.kind}_{self.param:g}"
        return self.kind + (suffix if self.kind == "cal" else "")

    @property
    def needs_calibrated_head(self) -> bool:
        return self.kind in ("cal", "dual")


HEAD_KINDS = ("orig", "cal", "dual", "oracle", *POSTHOC)


def parse_heads(kinds: list[str], combine_name: str, T: float, param: float) -> list[HeadSpec]:
    """Head specs from kind names, with clear errors for unknown kinds or combiners."""
    specs = []
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise InputError("--head", "head", f"unknown head {kind!r}: expected one of {', '.join(HEAD_KINDS)}")
        if kind == "dual" and combine_name not in (*COMBINERS, "det"):
            raise InputError(
                "--combine", "combine", f"unknown {combine_name!r}: one of {', '.join([*COMBINERS, 'det'])}"
            )
        specs.append(HeadSpec(kind, combine_name, float(T), float(param)))
    if len({s.tag for s in specs}) != len(specs):
        raise InputError("--head", "head", "a head is listed twice")
    return specs


class MultiHeadPredictor:
    """Detections of several heads from ONE pass of the backbone, RPN and RoI box features.

    For each head only the scores differ: probabilities ``(R, C+1)`` from the shared logits (and
    the calibrated head on the shared pooled features), then class-wise NMS, then the mask head on
    that head's final detections. Boxes and masks always come from the original heads.
    """

    def __init__(
        self,
        model: MaskRCNN,
        heads: list[HeadSpec],
        cal_head: torch.nn.Module | dict[str, torch.nn.Module] | None = None,
        counts: Tensor | None = None,
        with_masks: bool = True,
    ) -> None:
        self.cal_heads = cal_head if isinstance(cal_head, dict) else ({"": cal_head} if cal_head is not None else {})
        for h in heads:
            if h.needs_calibrated_head and h.cal not in self.cal_heads:
                raise InputError("--head", "head", "cal and dual need a calibrated head: run simcal calibrate first")
        self.model, self.heads, self.counts, self.with_masks = model, heads, counts, with_masks

    def probabilities(
        self, spec: HeadSpec, logits: Tensor, p_cal: dict[str, Tensor], oracle: Tensor | None = None
    ) -> Tensor:
        """Scores ``(R, C+1)`` of one head from the shared logits and calibrated probabilities."""
        p_orig = F.softmax(logits, -1)
        if spec.kind == "orig":
            return p_orig
        if spec.kind == "cal":
            return p_cal[spec.cal]
        if spec.kind == "dual":
            return combine(spec.combine, p_orig, p_cal[spec.cal], self.counts, spec.T)
        if spec.kind == "oracle":
            if oracle is None:
                raise InputError("--head", "head", "the oracle needs ground truth")
            matched = oracle > 0
            probs = p_orig.clone()
            fg = 1 - p_orig[matched, 0]
            probs[matched, 1:] = 0
            probs[matched, oracle[matched]] = fg
            return probs
        return POSTHOC[spec.kind](logits, self.counts, spec.param)

    @staticmethod
    def _oracle_labels(proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """Per RoI, the label of the ground truth it matches at IoU >= 0.5 (0: none), ``(R,)``."""
        out = []
        for props, tgt in zip(proposals, targets):
            lab = torch.zeros(props.shape[0], dtype=torch.long, device=props.device)
            if tgt["boxes"].numel() and props.numel():
                iou = box_ops.box_iou(props, tgt["boxes"])
                best, idx = iou.max(1)
                lab[best >= 0.5] = tgt["labels"][idx[best >= 0.5]]
            out.append(lab)
        return torch.cat(out)

    @torch.no_grad()
    def __call__(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, list[dict[str, Tensor]]]:
        """Detections per head: ``{tag: [per image {"boxes" (N, 4) xyxy, "scores", "labels",
        "masks" (N, H, W) bool}]}`` in original image coordinates. ``targets`` (boxes, labels) are
        needed only by the oracle."""
        model, roi = self.model, self.model.roi_heads
        sizes = [im.shape[-2:] for im in images]
        if targets is not None:
            targets = [
                {"boxes": t["boxes"].to(images[0].device), "labels": t["labels"].to(images[0].device)} for t in targets
            ]
        batch, targets = model.transform(images, targets)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        pooled, box_feats, logits, deltas = roi.box_features(features, proposals, batch.image_sizes)
        used = {h.cal for h in self.heads if h.needs_calibrated_head or (h.kind == "dual" and h.combine == "det")}
        p_cal = {name: F.softmax(self.cal_heads[name](pooled), -1) for name in used}
        oracle = self._oracle_labels(proposals, targets) if targets is not None else None
        n = len(images)
        out: dict[str, list[dict[str, Tensor]]] = {}
        for spec in self.heads:
            if spec.kind == "dual" and spec.combine == "det":
                a = roi.postprocess_detections(F.softmax(logits, -1), deltas, proposals, batch.image_sizes, True)
                b = roi.postprocess_detections(p_cal[spec.cal], deltas, proposals, batch.image_sizes, True)
                out[spec.tag] = [
                    merge_detections(
                        {"boxes": a[0][i], "scores": a[1][i], "labels": a[2][i], "roi": a[3][i]},
                        {"boxes": b[0][i], "scores": b[1][i], "labels": b[2][i], "roi": b[3][i]},
                        iou=roi.nms_thresh,
                        max_dets=roi.detections_per_img,
                    )
                    for i in range(n)
                ]
            else:
                probs = self.probabilities(spec, logits, p_cal, oracle)
                boxes, scores, labels, index = roi.postprocess_detections(
                    probs, deltas, proposals, batch.image_sizes, True
                )
                out[spec.tag] = [
                    {"boxes": b, "scores": s, "labels": lab, "roi": i}
                    for b, s, lab, i in zip(boxes, scores, labels, index)
                ]
        if roi.has_mask() and self.with_masks:
            self._masks(features, out, batch.image_sizes)
        for result in out.values():
            for r, resized, (h, w) in zip(result, batch.image_sizes, sizes):
                r.pop("roi", None)
                r["boxes"] = resize_boxes(r["boxes"], resized, (h, w))
                if "masks" in r:
                    r["masks"] = paste_masks(r["masks"][:, 0], r["boxes"], int(h), int(w))
        return out

    def _masks(self, features: dict[str, Tensor], out: dict[str, list[dict[str, Tensor]]], sizes: list) -> None:
        """Run the mask head once per distinct (RoI, class) over all heads, then hand out the masks.

        A detection's box and mask depend only on its RoI and class, never on the head that
        scored it, so heads that keep the same detections share their mask computation.
        """
        roi = self.model.roi_heads
        num_classes = roi.box_predictor.cls_score.out_features
        union = []
        for i in range(len(sizes)):
            dets = [result[i] for result in out.values()]
            keys = torch.cat([d["roi"] * num_classes + d["labels"] for d in dets])
            uniq, inverse = torch.unique(keys, return_inverse=True)
            first = torch.full((uniq.numel(),), -1, dtype=torch.long, device=keys.device)
            first.scatter_(0, inverse.flip(0), torch.arange(keys.numel() - 1, -1, -1, device=keys.device))
            all_boxes = torch.cat([d["boxes"] for d in dets])
            all_labels = torch.cat([d["labels"] for d in dets])
            union.append(
                ({"boxes": all_boxes[first], "labels": all_labels[first]}, inverse, [len(d["labels"]) for d in dets])
            )
        result = [u[0] for u in union]
        roi.mask_inference(features, result, sizes)
        for i, (u, inverse, lengths) in enumerate(union):
            for r, part in zip((res[i] for res in out.values()), inverse.split(lengths)):
                r["masks"] = u["masks"][part]


def infer_batch(model: MaskRCNN, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """The original head's detections per image, in original image coordinates, masks pasted."""
    return MultiHeadPredictor(model, [HeadSpec("orig")])(images)["orig"]


def load_model(run: Path, checkpoint: str | None = None) -> tuple[MaskRCNN, LabelMap, Any]:
    """The trained detector of a run directory (final weights unless ``checkpoint`` is given)."""
    cfg = load_run_config(run)
    label_map = LabelMap.load(run / LABEL_MAP_FILE)
    model = build_detector(cfg.model, label_map.num_classes)
    state = load_checkpoint(Path(checkpoint) if checkpoint else run / FINAL)
    model.load_state_dict(state["model"])
    return model.eval(), label_map, cfg


def predict(
    run: str | os.PathLike[str],
    *,
    heads: list[str] | None = None,
    combine_name: str | None = None,
    T: float | None = None,
    param: float = 1.0,
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
    """Run the trained detector with each of ``heads`` (default: the original) on a split.

    ``heads`` are kinds from :data:`HEAD_KINDS`; ``dual`` merges with ``combine_name`` and ``T``
    (default: the run config's ``inference`` section, the paper's sel / 300); ``param`` is gamma
    for ``norcal`` and tau for ``logit-adj``.

    One pass per batch serves every head. Writes ``RUN/predictions/<split>/<head>/results.json``
    and, with ``evaluate_results``, ``metrics_bbox.json`` / ``metrics_segm.json`` beside it.
    ``calibration`` names the calibrated head (``RUN/calibration/<name>/head.pth``; default:
    ``3fc_ft``, else the only one there is). Results of a head other than ``3fc_ft`` go to
    ``cal@<name>`` / ``dual@<name>``, so comparing calibrations never overwrites ``cal`` / ``dual``.

    Returns:
        ``{head tag: {"bbox": EvalResult, "segm": EvalResult}}`` (empty without evaluation).
    """
    run = Path(run)
    model, label_map, cfg = load_model(run, checkpoint)
    specs = parse_heads(
        heads or ["orig"], combine_name or cfg.inference.combine, cfg.inference.T if T is None else T, param
    )
    cal_heads = {}
    if any(h.needs_calibrated_head for h in specs):
        name = resolve_calibration(run, calibration)
        key = "" if name == "3fc_ft" else name
        cal_heads[key] = load_calibrated_head(run, name, model)
        specs = [replace(h, cal=key) if h.needs_calibrated_head else h for h in specs]
    return run_heads(
        run,
        model,
        label_map,
        cfg,
        specs,
        cal_heads,
        split=split,
        gt_json=gt_json,
        images=images,
        batch_size=batch_size,
        num_workers=num_workers,
        max_images=max_images,
        progress=progress,
        evaluate_results=evaluate_results,
    )


def split_annotations(cfg: Any, split: str, gt_json: str | None, needs: str = "--gt") -> str:
    """The annotations json of a split: ``gt_json`` when given, else the config's ``val`` / ``train``."""
    if gt_json is None:
        gt_json = {"val": cfg.data.val_json, "train": cfg.data.train_json}.get(split)
        if not gt_json:
            raise InputError("--split", "split", f"no annotations for split {split!r}: pass {needs}")
    return gt_json


def resolve_split(cfg: Any, split: str, gt_json: str | None, images: str | None) -> tuple[str, str]:
    """The annotations and image folder of a split: the config's ``val`` / ``train`` or given."""
    if gt_json is None:
        images = images or {"val": cfg.data.val_images, "train": cfg.data.train_images}.get(split)
    gt_json = split_annotations(cfg, split, gt_json, needs="--gt and --images")
    if not images:
        raise InputError("--images", "images", "an image folder is needed with --gt")
    return gt_json, images


def run_heads(
    run: Path,
    model: MaskRCNN,
    label_map: LabelMap,
    cfg: Any,
    specs: list[HeadSpec],
    cal_heads: dict[str, torch.nn.Module],
    *,
    split: str = "val",
    gt_json: str | None = None,
    images: str | None = None,
    batch_size: int = 8,
    num_workers: int = 1,
    max_images: int | None = None,
    progress: bool = True,
    evaluate_results: bool = True,
    ious: tuple[str, ...] = ("bbox", "segm"),
    out_dir: Path | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, EvalResult]]:
    """Predict with every head spec in one pass per batch; write results (and metrics) per head
    under ``out_dir`` (default ``RUN/predictions/<split>``). Without ``segm`` in ``ious`` no mask
    is computed."""
    setup_torch(cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    gt_json, images = resolve_split(cfg, split, gt_json, images)
    gt = load_dataset(gt_json)
    train = load_dataset(cfg.data.train_json) if cfg.data.train_json and os.path.exists(cfg.data.train_json) else None
    counts = None
    if train is not None:
        counts = torch.tensor(class_instance_counts(train, label_map), dtype=torch.float32, device=device)
    elif any(h.kind not in ("orig", "oracle") for h in specs):
        raise InputError("data.train_json", "train_json", "training counts are needed for calibrated heads")
    cal_heads = {k: v.to(device).eval() for k, v in cal_heads.items()}
    with_masks = "segm" in ious
    predictor = MultiHeadPredictor(model, specs, cal_heads, counts, with_masks=with_masks)
    oracle = any(h.kind == "oracle" for h in specs)

    dataset = DetectionDataset(gt, images, label_map=label_map, with_masks=False, source=gt_json)
    indices = list(range(len(dataset)))[: max_images or None]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=collate
    )
    out_dir = out_dir or run / "predictions" / split
    with ExitStack() as stack:
        writers = {h.tag: stack.enter_context(results_file(out_dir / h.tag / "results.json")) for h in specs}
        for imgs, targets in tqdm(loader, desc=f"predict {split}", disable=not progress, dynamic_ncols=True):
            per_head = predictor([im.to(device) for im in imgs], targets if oracle else None)
            for tag, dets in per_head.items():
                for det, tgt in zip(dets, targets):
                    for r in detections_to_results(det, int(tgt["image_id"]), label_map):
                        writers[tag].write(r)
    if verbose:
        for tag, w in writers.items():
            print(f"{tag}: {w.count} detections on {len(indices)} images -> {out_dir / tag / 'results.json'}")
    if not evaluate_results:
        return {}
    if max_images:
        gt = first_images(gt, len(indices))
    stats = resolve_category_stats(gt, gt_json, train, cfg.data.train_json)
    metrics: dict[str, dict[str, EvalResult]] = {}
    for h in specs:
        results = json.loads((out_dir / h.tag / "results.json").read_text())
        metrics[h.tag] = {}
        for iou in ious:
            r = evaluate(gt, results, iou, stats)
            write_json(out_dir / h.tag / f"metrics_{iou}.json", r.to_json(), indent=1)
            if verbose:
                print(f"[{h.tag}] {r.table()}")
            metrics[h.tag][iou] = r
    return metrics


def first_images(gt: dict[str, Any], n: int | None) -> dict[str, Any]:
    """The ground truth of the first ``n`` images (all when None): what ``--max-images`` predicted."""
    if n is None:
        return gt
    kept = {im["id"] for im in gt["images"][:n]}
    return {
        **gt,
        "images": [im for im in gt["images"] if im["id"] in kept],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in kept],
    }


def load_calibrated_head(run: Path, name: str | None, model: MaskRCNN) -> torch.nn.Module:
    """The calibrated head ``RUN/calibration/<name>/head.pth`` (``name`` as :func:`resolve_calibration`)."""
    head, _ = load_head(run / "calibration" / resolve_calibration(run, name) / "head.pth", model.roi_heads)
    return head.eval()


def resolve_calibration(run: Path, name: str | None) -> str:
    """``name``, or when None the default calibrated head: ``3fc_ft``, else the only one there is."""
    root = run / "calibration"
    if name is None:
        found = sorted(p.parent.name for p in root.glob("*/head.pth")) if root.is_dir() else []
        if not found:
            raise InputError(root, "(calibration)", "no calibrated head: run simcal calibrate first")
        if "3fc_ft" in found:
            name = "3fc_ft"
        elif len(found) == 1:
            name = found[0]
        else:
            raise InputError(
                root, "(calibration)", f"several calibrated heads ({', '.join(found)}): pass --calibration"
            )
    return name
