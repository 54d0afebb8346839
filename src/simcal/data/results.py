"""Detection results files read into columns, validated as whole columns.

A results file is a JSON list of ``{image_id, category_id, score, bbox, segmentation}``
(``simcal predict`` writes one detection per line; ``json.dump`` one line). It is read here into
:class:`Detections`: an ``(N, 7)`` float64 array ``[image_id, x, y, width, height, score,
category_id]`` (the evaluation engine's array form) and, for masks, each detection's compressed
RLE string (ASCII, one compact ``str`` each: no dict per detection). LVIS v1 val's 19,809 images x
300 detections with masks take about 2 GB this way, where Python dicts take several times that.

The file is read a part at a time (:func:`simcal.io.iter_json_blocks`), each part decoded by
msgspec straight into typed records (:meth:`_Columns.typed`) and checked as columns with numpy
(ids, finite numbers, box sizes, RLE sizes); a file of :data:`PARALLEL_READ_BYTES` or more by two
processes. A part that fails a column check, or holds anything the records cannot take (a
missing key, a bool, a polygon), is checked again detection by detection with
:func:`validate_results`' checks: the error names the file, the detection's position and the
field, as before.

The masks' areas (for the engine's size ranges) are counted by :func:`areas_later`, by a forked
process for many masks while the engine loads them.
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import msgspec
import numpy as np
from pycocotools import mask as mask_utils

from simcal.choices import EVAL_IOU_TYPES
from simcal.data.annotations import (
    _check_bbox,
    _check_rle_size,
    _check_segmentation,
    _is_number,
    collector_paused,
)
from simcal.errors import InputError
from simcal.io import NotLines, iter_json_blocks, read_json, require_file, split_json_lines


@dataclass(frozen=True)
class Detections:
    """Detections as columns (what ``simcal evaluate`` reads a results file into).

    ``array`` ``(N, 7)`` float64 rows ``[image_id, x, y, width, height, score, category_id]``;
    ``counts`` the ``N`` compressed RLE strings of the masks (ASCII ``str``, pycocotools'
    ``counts`` as a results file holds them; ``None``: boxes only) and
    ``sizes`` ``(N, 2)`` int64 their ``[height, width]`` (each its image's). ``boxes``: whether
    the array's box columns hold the detections' boxes (read for masks alone they are zero; the
    engine's mask IoU does not read them).
    """

    array: np.ndarray
    counts: list[str] | None = None
    sizes: np.ndarray | None = None
    boxes: bool = True

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def image_ids(self) -> np.ndarray:
        """``(N,)`` int64."""
        return self.array[:, 0].astype(np.int64)

    @property
    def category_ids(self) -> np.ndarray:
        """``(N,)`` int64."""
        return self.array[:, 6].astype(np.int64)

    @property
    def scores(self) -> np.ndarray:
        """``(N,)`` float64."""
        return self.array[:, 5]

    def take(self, index: np.ndarray) -> Detections:
        """The detections at ``index`` (ascending positions or a boolean mask), in that order."""
        index = np.flatnonzero(index) if index.dtype == bool else np.asarray(index, dtype=np.int64)
        if self.counts is None:
            return Detections(self.array[index], boxes=self.boxes)
        counts = [self.counts[i] for i in index.tolist()]
        return Detections(self.array[index], counts, self.sizes[index], self.boxes)  # type: ignore[index]

    def segmentation(self) -> list[dict[str, Any]]:
        """The masks as RLE dicts ``{"size": [h, w], "counts": str}``, one per row (made when the
        engine is called: the detections keep only the strings); one size list per image size."""
        if self.counts is None or self.sizes is None:
            raise ValueError("these detections have no masks")
        lists, at = _size_lists(self.sizes)
        return [{"size": lists[i], "counts": c} for i, c in zip(at, self.counts)]

    def to_dicts(self) -> list[dict[str, Any]]:
        """One dict per detection: its ``bbox``, or with masks its ``segmentation`` alone (``counts``
        as str; a box would make pycocotools-style engines take the box's area)."""
        out = []
        segs = self.segmentation() if self.counts is not None else itertools.repeat(None)
        for row, seg in zip(self.array.tolist(), segs):
            det: dict[str, Any] = {"image_id": int(row[0]), "category_id": int(row[6]), "score": row[5]}
            if seg is None:
                det["bbox"] = row[1:5]
            else:
                det["segmentation"] = {"size": list(seg["size"]), "counts": seg["counts"]}
            out.append(det)
        return out

    @classmethod
    def concatenate(cls, parts: list[Detections]) -> Detections:
        """The rows of ``parts`` one after the other (all with masks, or none)."""
        if not parts:
            return cls(np.zeros((0, 7)))
        if len(parts) == 1:
            return parts[0]
        array, boxes = np.concatenate([p.array for p in parts]), parts[0].boxes
        if parts[0].counts is None:
            return cls(array, boxes=boxes)
        counts: list[str] = []
        for p in parts:
            counts.extend(p.counts)  # type: ignore[arg-type]
        return cls(array, counts, np.concatenate([p.sizes for p in parts]), boxes)  # type: ignore[misc]


def _size_lists(sizes: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """``sizes`` ``(N, 2)`` ``[height, width]`` as one list ``[h, w]`` per distinct size and each
    row's index into them (a list per row would be ``N`` new objects)."""
    code = sizes[:, 0] * (1 << 32) + sizes[:, 1]
    unique, inverse = np.unique(code, return_inverse=True)
    return [[c >> 32, c & 0xFFFFFFFF] for c in unique.tolist()], inverse.reshape(-1).tolist()


#: at least this many masks have their areas counted by a forked process (:func:`areas_later`)
PARALLEL_AREA_MASKS = 100_000

#: pycocotools 2.0.11 under numpy 2 refuses more than 255 RLEs in one ``area`` call
_AREA_CHUNK = 255


def mask_areas(counts: Sequence[str], sizes: np.ndarray) -> np.ndarray:
    """Each mask's pixel count (pycocotools' ``area`` of its compressed RLE) ``(N,)`` float64,
    for ``counts`` (``N`` strings) of masks of ``sizes`` ``(N, 2)`` ``[height, width]``."""
    out = np.empty(len(counts), dtype=np.float64)
    lists, at = _size_lists(sizes)
    for start in range(0, len(counts), _AREA_CHUNK):
        stop = start + _AREA_CHUNK
        out[start:stop] = mask_utils.area(
            [{"size": lists[i], "counts": c} for i, c in zip(at[start:stop], counts[start:stop])]
        )
    return out


def areas_later(dets: Detections, of: int = 0) -> Callable[[], np.ndarray]:
    """:func:`mask_areas` of ``dets``' masks as a call that returns them: counted meanwhile by a
    forked process (pycocotools, which runs no threads of its own) where there are
    :data:`PARALLEL_AREA_MASKS` masks or more, at least half of the ``of`` read (``dets`` kept
    of them), and this process can fork (:func:`_can_fork`), so that the engine's loading of the
    masks and their counting run at once; else when called.

    A kept few are scattered over the pages of all that was read: each mask the engine then
    loads makes the parent copy a page the child shares (LVIS v1 val's size under LVIS rules,
    169k masks kept of 5.9 M: 0.3 s slower forked), where the masks of a whole file lie packed
    (592k masks, COCO rules: 0.17 s faster forked)."""
    if dets.counts is None or dets.sizes is None:
        raise ValueError("these detections have no masks")
    counts, sizes = dets.counts, dets.sizes
    if len(counts) < PARALLEL_AREA_MASKS or 2 * len(counts) < of or not _can_fork():
        return lambda: mask_areas(counts, sizes)
    counted = _forked(lambda out: out.write(mask_areas(counts, sizes).tobytes()))
    if counted is None:
        return lambda: mask_areas(counts, sizes)

    def collect() -> np.ndarray:
        got = counted(lambda pipe: pipe.read())
        if got is None or len(got) != 8 * len(counts):  # the child failed: count here
            return mask_areas(counts, sizes)
        return np.frombuffer(got, dtype=np.float64)

    return collect


def _forked(work: Callable[[BinaryIO], object]) -> Callable[[Callable[[BinaryIO], T]], T | None] | None:
    """``work`` done by a forked child meanwhile, writing to a pipe: the call reads the pipe with
    the reader it is given and returns what that read (None where the child failed), once the
    child has left; a second call returns None. None instead of the call where no child can be
    made (the caller then does the work itself).

    The child runs only numpy, msgspec and pycocotools (no threads of their own) and leaves
    without running this process's exit handlers, so a fork after hotcoco's thread pool has
    started is safe: the child never calls into it (Python 3.12's warning about forking a
    multi-threaded process is silenced here for that reason)."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multi-threaded.*", category=DeprecationWarning)
            pid = os.fork()
    except OSError:  # no memory or processes left for a child
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as out:
                work(out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    done: list[bool] = []

    def collect(read: Callable[[BinaryIO], T]) -> T | None:
        if done:
            return None
        done.append(True)
        try:
            with os.fdopen(read_end, "rb") as pipe:
                try:
                    got: T | None = read(pipe)
                except (EOFError, pickle.UnpicklingError):
                    got = None
        finally:
            _, status = os.waitpid(pid, 0)
        return got if status == 0 else None

    return collect


def _positions(known: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """Where each of ``ids`` is in the sorted ``known`` ids; None when one is not there. A table
    lookup where the ids are small (COCO's and LVIS's are), else a binary search."""
    if not len(known):
        return None if len(ids) else np.zeros(0, dtype=np.int64)
    low, high = int(known[0]), int(known[-1])
    if low >= 0 and high < 1 << 26 and len(ids) > 4096:
        table = np.full(high + 2, -1, dtype=np.int64)
        table[known] = np.arange(len(known))
        at = table[np.clip(ids, -1, high + 1)]  # -1 and past the end: the sentinel at the end
        return None if (at < 0).any() else at
    at = np.searchsorted(known, ids).clip(0, len(known) - 1)
    return at if (known[at] == ids).all() else None


class _Mask(msgspec.Struct, gc=False):
    size: tuple[int, int]
    counts: str


class _Record(msgspec.Struct, gc=False):
    """A detection's fields of the usual types, as a results file holds them (no dict per detection)."""

    image_id: int
    category_id: int
    score: float


class _Box(_Record, gc=False):
    bbox: tuple[float, float, float, float]


class _MaskOnly(_Record, gc=False):
    segmentation: _Mask


class _BoxMask(_Box, gc=False):
    segmentation: _Mask


T = TypeVar("T")

_RECORDS = {(True, False): _Box, (False, True): _MaskOnly, (True, True): _BoxMask}


class DetectionsBuilder:
    """:class:`Detections` gathered a result record at a time (``{image_id, category_id, bbox,
    score, segmentation}`` as ``simcal predict`` writes them), for evaluating a prediction without
    reading its results file back. ``masks``: the records carry masks."""

    def __init__(self, masks: bool) -> None:
        self.masks = masks
        self._rows: list[tuple[float, ...]] = []
        self._counts: list[str] = []
        self._sizes: list[list[int]] = []

    def add(self, record: dict[str, Any]) -> None:
        self._rows.append((record["image_id"], *record["bbox"], record["score"], record["category_id"]))
        if self.masks:
            seg = record["segmentation"]
            self._counts.append(seg["counts"])
            self._sizes.append(seg["size"])

    def build(self) -> Detections:
        array = np.array(self._rows, dtype=np.float64).reshape(-1, 7)
        if not self.masks:
            return Detections(array)
        return Detections(array, self._counts, np.array(self._sizes, dtype=np.int64).reshape(-1, 2))


class _Columns:
    """Where a block's columns are checked: the ground truth's ids and image sizes, sorted."""

    def __init__(self, dataset: dict[str, Any], src: str, ious: tuple[str, ...]) -> None:
        self.src, self.ious = src, ious
        self.boxes = "bbox" in ious
        self.masks = any(iou != "bbox" for iou in ious)
        self.mask_iou = next((iou for iou in ious if iou != "bbox"), "segm")
        self.image_set = {img["id"] for img in dataset["images"]}
        self.cat_set = {cat["id"] for cat in dataset["categories"]}
        images = sorted(dataset["images"], key=lambda im: im["id"])
        self.image_ids = np.array([im["id"] for im in images], dtype=np.int64)
        self.image_hw = np.array([[im["height"], im["width"]] for im in images], dtype=np.int64).reshape(-1, 2)
        self.cat_ids = np.array(sorted(self.cat_set), dtype=np.int64)
        self.hw = {img["id"]: [img["height"], img["width"]] for img in dataset["images"]}
        self._decoder = msgspec.json.Decoder(list[_RECORDS[self.boxes, self.masks]])  # type: ignore[index]

    def block(self, items: list[Any], start: int) -> Detections:
        """Detections ``start .. start + len(items) - 1`` as columns, validated."""
        fast = self._fast(items)
        if fast is not None:
            return fast
        return self._slow(items, start)

    def typed(self, text: bytes) -> Detections | None:
        """The JSON text of a list of detections decoded straight into records of the usual types
        (msgspec: no dict per detection) and checked as columns; None when anything is unusual
        (the caller then checks the parsed items one by one, which names it)."""
        try:
            records = self._decoder.decode(text)
        except (msgspec.MsgspecError, RecursionError):
            return None
        n = len(records)
        if n == 0:
            return None
        try:
            rows = np.empty((n, 7), dtype=np.float64)
            image_ids = np.fromiter(map(attrgetter("image_id"), records), np.int64, n)
            cat_ids = np.fromiter(map(attrgetter("category_id"), records), np.int64, n)
            rows[:, 5] = np.fromiter(map(attrgetter("score"), records), np.float64, n)
            if self.boxes:
                boxes = itertools.chain.from_iterable(map(attrgetter("bbox"), records))
                rows[:, 1:5] = np.fromiter(boxes, np.float64, 4 * n).reshape(n, 4)
            else:
                rows[:, 1:5] = 0.0  # read for masks alone: no boxes (the mask IoU does not read them)
            if self.masks:
                masks = list(map(attrgetter("segmentation"), records))
                sizes = np.fromiter(itertools.chain.from_iterable(map(attrgetter("size"), masks)), np.int64, 2 * n)
                counts = list(map(attrgetter("counts"), masks))
                if not all(map(str.isascii, counts)):
                    return None
        except (OverflowError, ValueError):  # an id past int64, a non-ASCII RLE string
            return None
        rows[:, 0], rows[:, 6] = image_ids, cat_ids
        at = self._check(rows, image_ids, cat_ids, sizes.reshape(n, 2) if self.masks else None)
        if at is None:
            return None
        if not self.masks:
            return Detections(rows)
        return Detections(rows, counts, sizes.reshape(n, 2), self.boxes)

    def _check(
        self, rows: np.ndarray, image_ids: np.ndarray, cat_ids: np.ndarray, sizes: np.ndarray | None
    ) -> np.ndarray | None:
        """The columns' checks: known ids, finite numbers, boxes of non-negative size, each RLE its
        image's size. Returns each row's image position, or None when a check fails."""
        at = _positions(self.image_ids, image_ids)
        if at is None or _positions(self.cat_ids, cat_ids) is None:
            return None
        ok = np.isfinite(rows[:, 5]).all()
        if sizes is not None:
            ok = ok and (sizes == self.image_hw[at]).all()
        if self.boxes:
            ok = ok and np.isfinite(rows[:, 1:5]).all() and (rows[:, 3:5] >= 0).all()
        return at if ok else None

    def _fast(self, items: list[Any]) -> Detections | None:
        """Whole-column checks; None when anything is unusual (the slow path then names it)."""
        n = len(items)
        if n == 0:
            return _from_valid([], self.hw, self.boxes, self.masks)
        try:
            if set(map(type, items)) != {dict}:
                return None
            img, cat, score = zip(*map(itemgetter("image_id", "category_id", "score"), items))
            if not set(map(type, img)) | set(map(type, cat)) <= {int} or not set(map(type, score)) <= {int, float}:
                return None
            rows = np.empty((n, 7), dtype=np.float64)
            image_ids = np.array(img, dtype=np.int64)
            cat_ids = np.array(cat, dtype=np.int64)
            rows[:, 0], rows[:, 6], rows[:, 5] = image_ids, cat_ids, score
            if self.masks:
                segs = list(map(itemgetter("segmentation"), items))
                if set(map(type, segs)) != {dict}:
                    return None
                size, counts = zip(*map(itemgetter("size", "counts"), segs))
                if set(map(type, counts)) != {str} or set(map(type, size)) != {list} or set(map(len, size)) != {2}:
                    return None
                if not set(map(type, itertools.chain.from_iterable(size))) <= {int}:
                    return None
                sizes = np.array(size, dtype=np.int64)
                if not all(map(str.isascii, counts)):
                    return None
                rles = list(counts)
            if not self.boxes:
                rows[:, 1:5] = 0.0  # read for masks alone: no boxes (the mask IoU does not read them)
            else:
                boxes = list(map(itemgetter("bbox"), items))
                if set(map(type, boxes)) != {list} or set(map(len, boxes)) != {4}:
                    return None
                if not set(map(type, itertools.chain.from_iterable(boxes))) <= {int, float}:
                    return None
                rows[:, 1:5] = np.array(boxes, dtype=np.float64)
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        if self._check(rows, image_ids, cat_ids, sizes if self.masks else None) is None:
            return None
        if not self.masks:
            return Detections(rows)
        return Detections(rows, rles, sizes, self.boxes)

    def _slow(self, items: list[Any], start: int) -> Detections:
        """Detection by detection: the first bad one raises with its message; polygons and
        uncompressed RLEs are encoded to compressed RLEs."""
        for j, det in enumerate(items):
            for iou in self.ious:
                _check_detection(self.src, start + j, det, self.image_set, self.cat_set, iou, self.hw)
        return _from_valid(items, self.hw, self.boxes, self.masks)


def _from_valid(items: list[dict[str, Any]], hw: dict[int, list[int]], boxes: bool, masks: bool) -> Detections:
    """Columns of validated detections (any valid segmentation form)."""
    n = len(items)
    rows = np.zeros((n, 7), dtype=np.float64)
    for i, d in enumerate(items):
        rows[i, 0], rows[i, 5], rows[i, 6] = d["image_id"], d["score"], d["category_id"]
        if boxes:
            rows[i, 1:5] = d["bbox"]
    if not masks:
        return Detections(rows)
    counts, sizes = [], np.zeros((n, 2), dtype=np.int64)
    for i, d in enumerate(items):
        h, w = hw[d["image_id"]]
        counts.append(_compressed(d["segmentation"], h, w))
        sizes[i] = h, w
    return Detections(rows, counts, sizes, boxes)


def _compressed(seg: Any, h: int, w: int) -> str:
    """A valid segmentation (polygons, uncompressed or compressed RLE) as compressed RLE counts."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        return seg["counts"]  # checked: ASCII (a compressed RLE's alphabet)
    return rle["counts"].decode("ascii")


def _check_detection(
    src: str,
    i: int,
    det: Any,
    image_ids: set[int],
    cat_ids: set[int],
    iou_type: str,
    sizes: dict[int, list[int]] | None = None,
) -> None:
    field = f"[{i}]"
    if not isinstance(det, dict):
        raise InputError(src, field, "expected an object")
    if det.get("image_id") not in image_ids:
        raise InputError(src, f"{field}.image_id", f"unknown image id {det.get('image_id')!r}")
    if det.get("category_id") not in cat_ids:
        raise InputError(src, f"{field}.category_id", f"unknown category id {det.get('category_id')!r}")
    if not _is_number(det.get("score")):
        raise InputError(src, f"{field}.score", f"expected a finite number, got {det.get('score')!r}")
    if iou_type == "bbox":
        if "bbox" not in det:
            raise InputError(src, f"{field}.bbox", "missing (needed for --iou bbox)")
        _check_bbox(src, f"{field}.bbox", det["bbox"])
    else:
        seg = det.get("segmentation")
        if seg is None:
            raise InputError(src, f"{field}.segmentation", f"missing (needed for --iou {iou_type})")
        _check_segmentation(src, f"{field}.segmentation", seg)
        if sizes is not None:
            _check_rle_size(src, f"{field}.segmentation", seg, sizes[det["image_id"]])
        if isinstance(seg, dict) and isinstance(seg["counts"], str) and not seg["counts"].isascii():
            raise InputError(src, f"{field}.segmentation.counts", "not a compressed RLE string (non-ASCII characters)")


def _ious(iou: str | Sequence[str]) -> tuple[str, ...]:
    """``iou`` as a tuple of IoU types; a wrong one is the caller's mistake (the evaluation names
    the setting before anything is read)."""
    ious = (iou,) if isinstance(iou, str) else tuple(iou)
    for iou_type in ious:
        if iou_type not in EVAL_IOU_TYPES:
            raise ValueError(f"iou: expected bbox, segm or boundary, got {iou_type!r}")
    return ious


def validate_results(
    results: Any,
    dataset: dict[str, Any],
    iou_type: str,
    source: str | os.PathLike[str] = "<results>",
) -> list[dict[str, Any]]:
    """Check a detection results list against its ground truth, detection by detection.

    Args:
        results: the parsed results json: a list of ``{image_id, category_id, score, bbox | segmentation}``.
        dataset: the validated ground truth it refers to.
        iou_type: ``"bbox"`` needs ``bbox``; ``"segm"`` and ``"boundary"`` need ``segmentation``.

    Returns:
        The list itself. An empty list is valid.
    """
    src = str(source)
    if not isinstance(results, list):
        raise InputError(src, "(top level)", f"results must be a list of detections, got {type(results).__name__}")
    _ious(iou_type)
    image_ids = {img["id"] for img in dataset["images"]}
    cat_ids = {cat["id"] for cat in dataset["categories"]}
    sizes = {img["id"]: [img["height"], img["width"]] for img in dataset["images"]} if iou_type != "bbox" else None
    for i, det in enumerate(results):
        _check_detection(src, i, det, image_ids, cat_ids, iou_type, sizes)
    return results


def as_detections(
    results: list[dict[str, Any]] | Detections | str | os.PathLike[str],
    dataset: dict[str, Any],
    iou: str | Sequence[str],
    source: str | os.PathLike[str] = "<results>",
) -> Detections:
    """Detections as columns for ``iou`` (one IoU type or several): a results file is read
    (:func:`read_results`); a list of dicts is checked as a results file is; :class:`Detections`
    are taken as they are, if they have what ``iou`` needs (boxes for ``bbox``, masks for
    ``segm`` / ``boundary``)."""
    if isinstance(results, (str, os.PathLike)):
        return read_results(results, dataset, iou)
    ious = _ious(iou)
    if isinstance(results, Detections):
        for iou_type in ious:
            if iou_type == "bbox" and not results.boxes:
                raise ValueError("these detections were read for their masks alone: no boxes for --iou bbox")
            if iou_type != "bbox" and results.counts is None:
                raise ValueError(f"these detections have no masks (needed for --iou {iou_type})")
        return results
    if not isinstance(results, list):
        raise InputError(
            str(source), "(top level)", f"results must be a list of detections, got {type(results).__name__}"
        )
    columns = _Columns(dataset, str(source), ious)
    with collector_paused():
        return columns.block(results, 0)


#: a results file at least this large is read by two processes where it can be (:func:`read_results`)
PARALLEL_READ_BYTES = 32 << 20


def _can_fork() -> bool:
    """Whether this process may fork a helper (:func:`_forked`): where there is a second core and
    fork, and torch is not loaded (fork copies only the thread that calls it, and torch's threads
    may hold its locks)."""
    return hasattr(os, "fork") and (os.cpu_count() or 1) > 1 and "torch" not in sys.modules


def _read_by_two(path: str | os.PathLike[str]) -> bool:
    """Whether a file is read by two processes by default: :data:`PARALLEL_READ_BYTES` or more,
    where this process can fork (:func:`_can_fork`)."""
    return os.path.getsize(path) >= PARALLEL_READ_BYTES and _can_fork()


def _read_share(
    path: str | os.PathLike[str],
    columns: _Columns,
    block: int,
    share: tuple[int, int],
    each: Callable[[Detections], Any] | None = None,
) -> list[Any] | None:
    """``each`` of one share's parts of detections (by default the part), a part at a time, or
    None where anything in the share is unusual (the whole file is then read in one process, which
    names it)."""
    parts = []
    try:
        for items in iter_json_blocks(path, block=block, fast=columns.typed, share=share):
            if not isinstance(items, Detections):
                return None
            parts.append(items if each is None else each(items))
    except NotLines:
        return None
    return parts


def _read_in_two(path: str | os.PathLike[str], columns: _Columns, block: int) -> Detections | None:
    """The file read as two shares at once: a forked child reads the second and sends its columns
    back through a pipe while this process reads the first. None where the file cannot be cut
    into shares of whole lines, or a share holds anything unusual."""
    shares = split_json_lines(path, 2)
    if shares is None:
        return None
    second = _forked(
        lambda out: pickle.dump(_read_share(path, columns, block, shares[1]), out, pickle.HIGHEST_PROTOCOL)
    )
    if second is None:
        return None
    try:
        first = _read_share(path, columns, block, shares[0])
    finally:
        rest = second(pickle.load)
    if first is None or rest is None:
        return None
    return Detections.concatenate(first + rest) if first or rest else columns.block([], 0)


def _first_detection(path: str | os.PathLike[str]) -> Any:
    """The first item of a results file as JSON parses it (None for an empty list), from the
    file's first block (64 KiB where the items end at line ends or commas)."""
    blocks = iter_json_blocks(path, block=1 << 16)
    try:
        return next((part[0] for part in blocks if len(part)), None)
    finally:
        blocks.close()


def checked_later(
    path: str | os.PathLike[str],
    dataset: dict[str, Any],
    iou: str,
    areas: Callable[[Any], bool],
    block: int = 1 << 23,
) -> Callable[[], tuple[int, np.ndarray | None] | None] | None:
    """The results file checked for ``iou`` meanwhile, for an engine that reads it itself: two
    forked children each check a share of the lines as :func:`read_results` does, and send back
    only how many detections they read and, where ``areas`` holds for the file's first detection
    (as JSON parses it), their masks' areas (:func:`mask_areas`), not the columns. The call returns
    ``(N, areas (N,) float64 or None)``, or None where a share holds anything unusual
    (:func:`read_results` then names it). None instead of the call where :func:`read_results`
    would read in one process (:func:`_read_by_two`), or the file is not a list cut into lines.
    """
    if not _read_by_two(path):
        return None
    shares = split_json_lines(path, 2)
    if shares is None:
        return None
    try:
        counted = areas(_first_detection(path))
    except InputError:  # not a list of detections: read_results says so
        return None
    columns = _Columns(dataset, str(path), _ious(iou))

    def summary(part: Detections) -> tuple[int, np.ndarray | None]:
        return len(part), mask_areas(part.counts, part.sizes) if counted else None  # type: ignore[arg-type]

    def child(share: tuple[int, int]) -> Callable[[BinaryIO], object]:
        def work(out: BinaryIO) -> None:
            with collector_paused():
                got = _read_share(path, columns, block, share, summary)
            pickle.dump(got, out, pickle.HIGHEST_PROTOCOL)

        return work

    children = [_forked(child(share)) for share in shares]

    def collect() -> tuple[int, np.ndarray | None] | None:
        got: list[Any] = []
        try:
            for c in children:
                got.append(None if c is None else c(pickle.load))
        finally:  # every child is waited for, even where this wait is interrupted
            for c in children[len(got) + 1 :]:
                if c is not None:
                    c(lambda pipe: None)
        if any(g is None for g in got):
            return None
        parts = [part for share in got for part in share]  # type: ignore[union-attr]
        n = sum(count for count, _ in parts)
        if not counted:
            return n, None
        return n, np.concatenate([a for _, a in parts]) if parts else np.zeros(0)

    return collect


def read_results(
    path: str | os.PathLike[str],
    dataset: dict[str, Any],
    iou: str | Sequence[str],
    block: int = 1 << 23,
    processes: int | None = None,
) -> Detections:
    """Read and validate a results json as :class:`Detections` for ``iou`` (one IoU type or
    several: ``("bbox", "segm")`` keeps boxes and masks), streaming it
    (:func:`simcal.io.iter_json_blocks`, ``block`` bytes at a time): memory holds the columns and
    one block of detections, never the whole list as dicts. Errors are :func:`validate_results`'s,
    naming the same fields.

    ``processes``: 2 reads a file written one detection per line as two shares at once (a forked
    child reads the second half); default: 2 for a file of :data:`PARALLEL_READ_BYTES` or more
    where this process can fork (:func:`_can_fork`), else 1. The columns are the same either way;
    a share with anything unusual in it makes the whole file be read in one process."""
    require_file(Path(path))
    columns = _Columns(dataset, str(path), _ious(iou))
    if processes is None:
        processes = 2 if _read_by_two(path) else 1
    if processes > 1:
        with collector_paused():
            got = _read_in_two(path, columns, block)
        if got is not None:
            return got
    parts, start = [], 0
    with collector_paused():
        for items in iter_json_blocks(path, "results must be a list of detections", block=block, fast=columns.typed):
            parts.append(items if isinstance(items, Detections) else columns.block(items, start))
            start += len(items)
    if not parts:
        parts.append(columns.block([], 0))
    return Detections.concatenate(parts)


def load_results(path: str | os.PathLike[str], dataset: dict[str, Any], iou_type: str) -> list[dict[str, Any]]:
    """Read and validate a results json as a list of dicts (see :func:`validate_results`); for the
    analyses that keep each detection's fields. :func:`read_results` is the columns."""
    with collector_paused():
        return validate_results(read_json(path), dataset, iou_type, path)
