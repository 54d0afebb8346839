"""LVIS results files: the detections of one head written as a json list, streamed and atomic
(:func:`results_file`), the per-class top-k kept over a split (:class:`TopKResults`, AP-fixed's
inference), the part files of a torchrun prediction merged in image order (:func:`merge_parts`),
and one image's detections turned into result records (boxes in xywh, masks as compressed RLE).

Reading results files is the data layer's (:func:`simcal.data.results.read_results`, into the
columns the evaluation takes).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from simcal.data.dataset import LabelMap
from simcal.io import atomic_open
from simcal.modeling.detector import paste_masks


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
