"""Load and validate COCO / LVIS annotation files (results files: :mod:`simcal.data.results`).

Every check raises :class:`simcal.errors.InputError` naming the file and the field
(``annotations[12].bbox``), so a user sees one clear line instead of a traceback deep inside an
evaluation or training loop. Validation is done once, here; the rest of simcal trusts the dicts.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from simcal.errors import InputError
from simcal.io import read_json

FREQUENCIES = ("r", "c", "f")
LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_bbox(src: str, field: str, bbox: Any) -> None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise InputError(src, field, f"expected [x, y, width, height], got {str(bbox)[:60]}")
    if not all(_is_number(v) for v in bbox):
        raise InputError(src, field, f"non-finite or non-numeric value in {bbox}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise InputError(src, field, f"negative width or height in {bbox}")


def _check_segmentation(src: str, field: str, seg: Any) -> None:
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) and v >= 0 for v in size):
            raise InputError(src, f"{field}.size", "RLE needs size [height, width]")
        if not isinstance(counts, (str, list)):
            raise InputError(src, f"{field}.counts", "RLE counts must be a string or a list")
        return
    if not isinstance(seg, list):
        raise InputError(src, field, "expected a list of polygons or an RLE dict")
    for j, poly in enumerate(seg):
        if not isinstance(poly, list):
            raise InputError(src, f"{field}[{j}]", "polygon must be a flat list of x, y numbers")
        try:
            arr = np.asarray(poly, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(src, f"{field}[{j}]", "polygon must be a flat list of x, y numbers") from None
        if arr.ndim != 1 or arr.size < 6 or arr.size % 2:
            raise InputError(
                src, f"{field}[{j}]", f"polygon needs an even number (>= 6) of coordinates, got {arr.size}"
            )
        if not np.isfinite(arr).all():
            raise InputError(src, f"{field}[{j}]", "polygon has a non-finite coordinate")


def _check_ids(src: str, items: list[Any], key: str) -> dict[int, dict[str, Any]]:
    by_id: dict[int, dict[str, Any]] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(src, f"{key}[{i}]", "expected an object")
        iid = item.get("id")
        if not _is_int(iid):
            raise InputError(src, f"{key}[{i}].id", f"expected an integer id, got {iid!r}")
        if iid in by_id:
            raise InputError(src, f"{key}[{i}].id", f"duplicate id {iid}")
        by_id[iid] = item
    return by_id


def validate_dataset(data: Any, source: str | os.PathLike[str] = "<dataset>") -> dict[str, Any]:
    """Check a COCO/LVIS dataset dict in place and fill in derivable fields.

    Fills ``area`` (from the mask, else the box) and ``iscrowd`` (0) where missing.

    Returns:
        The same dict, with ``images``, ``annotations`` and ``categories`` validated.
    """
    src = str(source)
    if not isinstance(data, dict):
        raise InputError(src, "(top level)", f"expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(src, key, "missing top-level key")
        if not isinstance(data[key], list):
            raise InputError(src, key, f"expected a list, got {type(data[key]).__name__}")

    images = _check_ids(src, data["images"], "images")
    categories = _check_ids(src, data["categories"], "categories")
    _check_ids(src, data["annotations"], "annotations")

    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat.get("name", ""), str):
            raise InputError(src, f"categories[{i}].name", "expected a string")
        cat.setdefault("name", str(cat["id"]))
        freq = cat.get("frequency")
        if freq is not None and freq not in FREQUENCIES:
            raise InputError(src, f"categories[{i}].frequency", f"expected one of r, c, f, got {freq!r}")
        for key in ("image_count", "instance_count"):
            if key in cat and not (_is_int(cat[key]) and cat[key] >= 0):
                raise InputError(src, f"categories[{i}].{key}", "expected a non-negative integer")

    for i, img in enumerate(data["images"]):
        for key in ("width", "height"):
            if not (_is_int(img.get(key)) and img[key] > 0):
                raise InputError(src, f"images[{i}].{key}", f"expected a positive integer, got {img.get(key)!r}")
        for key in LVIS_IMAGE_FIELDS:
            if key not in img:
                continue
            ids = img[key]
            if not isinstance(ids, list):
                raise InputError(src, f"images[{i}].{key}", "expected a list of category ids")
            for cid in ids:
                if cid not in categories:
                    raise InputError(src, f"images[{i}].{key}", f"unknown category id {cid!r}")

    if _annotations_pass(src, data["annotations"], images, categories):
        return data
    for i, ann in enumerate(data["annotations"]):
        field = f"annotations[{i}]"
        if ann.get("image_id") not in images:
            raise InputError(src, f"{field}.image_id", f"unknown image id {ann.get('image_id')!r}")
        if ann.get("category_id") not in categories:
            raise InputError(src, f"{field}.category_id", f"unknown category id {ann.get('category_id')!r}")
        if "bbox" not in ann:
            raise InputError(src, f"{field}.bbox", "missing")
        _check_bbox(src, f"{field}.bbox", ann["bbox"])
        if "segmentation" in ann:
            _check_segmentation(src, f"{field}.segmentation", ann["segmentation"])
            _check_rle_size(src, f"{field}.segmentation", ann["segmentation"], images[ann["image_id"]])
            _check_rle_counts(src, f"{field}.segmentation", ann["segmentation"])
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = annotation_area(ann, images[ann["image_id"]])
        elif not (_is_number(ann["area"]) and ann["area"] >= 0):
            raise InputError(src, f"{field}.area", f"expected a non-negative number, got {ann['area']!r}")
    return data


def _annotations_pass(
    src: str, anns: list[dict[str, Any]], images: dict[int, dict[str, Any]], categories: dict[int, dict[str, Any]]
) -> bool:
    """The annotations' checks of :func:`validate_dataset` on whole columns (and its fill-ins:
    ``iscrowd``, a missing ``area``). True when every annotation passes; False when anything is
    unusual, and the per-annotation checks then name the first bad field. The RLEs among them (a
    COCO set's crowd regions) are checked one by one here too."""
    n = len(anns)
    if n == 0:
        return True
    try:
        image_ids, cat_ids, boxes = zip(*map(itemgetter("image_id", "category_id", "bbox"), anns))
    except (KeyError, TypeError):
        return False
    if not set(map(type, image_ids)) | set(map(type, cat_ids)) <= {int}:
        return False
    if not (set(image_ids) <= images.keys() and set(cat_ids) <= categories.keys()):
        return False
    if set(map(type, boxes)) != {list} or set(map(len, boxes)) != {4}:
        return False
    coords = list(itertools.chain.from_iterable(boxes))
    if not set(map(type, coords)) <= {int, float}:
        return False
    box = np.array(coords, dtype=np.float64).reshape(n, 4)
    if not np.isfinite(box).all() or (box[:, 2:] < 0).any():
        return False
    polygons = []
    for i, ann in enumerate(anns):
        if "segmentation" not in ann:
            continue
        seg = ann["segmentation"]
        if type(seg) is list:
            polygons.append(seg)
        elif type(seg) is dict:  # an RLE: few in a set (crowd regions); checked as the others are
            field = f"annotations[{i}].segmentation"
            _check_segmentation(src, field, seg)
            _check_rle_size(src, field, seg, images[ann["image_id"]])
            _check_rle_counts(src, field, seg)
        else:
            return False
    polys = list(itertools.chain.from_iterable(polygons))
    if not set(map(type, polys)) <= {list}:
        return False
    lengths = np.fromiter(map(len, polys), dtype=np.int64, count=len(polys))
    if (lengths < 6).any() or (lengths % 2).any():
        return False
    xy = list(itertools.chain.from_iterable(polys))
    if not set(map(type, xy)) <= {int, float} or not np.isfinite(np.array(xy, dtype=np.float64)).all():
        return False
    areas = [ann.get("area", 0) for ann in anns]
    if not set(map(type, areas)) <= {int, float}:
        return False
    area = np.array(areas, dtype=np.float64)
    if not np.isfinite(area).all() or (area < 0).any():
        return False
    for ann in anns:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = annotation_area(ann, images[ann["image_id"]])
    return True


def annotation_area(ann: dict[str, Any], image: dict[str, Any]) -> float:
    """Area of an annotation: of its mask when it has one, else of its box (pixels)."""
    seg = ann.get("segmentation")
    if seg:
        h, w = image["height"], image["width"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return float(mask_utils.area(rle))
    return float(ann["bbox"][2] * ann["bbox"][3])


def load_dataset(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a COCO or LVIS annotation json (v0.5 or v1)."""
    return validate_dataset(read_json(path), path)


def is_lvis(dataset: dict[str, Any]) -> bool:
    """True when the images carry LVIS's federated fields (negative / not-exhaustive ids)."""
    images = dataset.get("images", [])
    return bool(images) and any(k in images[0] for k in LVIS_IMAGE_FIELDS)


def image_path(image: dict[str, Any], root: str | os.PathLike[str]) -> Path:
    """Where an image lives: ``file_name`` (COCO, LVIS v0.5) or the tail of ``coco_url`` (LVIS v1).

    LVIS v1 names images by ``coco_url`` such as ``http://images.cocodataset.org/val2017/X.jpg``;
    the split folder is kept so one root holding ``train2017/`` and ``val2017/`` serves both.
    """
    if image.get("file_name"):
        return Path(root) / image["file_name"]
    url = image.get("coco_url")
    if url:
        parts = url.rstrip("/").split("/")
        return Path(root, *parts[-2:])
    raise InputError(str(root), f"images[id={image.get('id')}]", "has neither file_name nor coco_url")


def _check_rle_size(src: str, field: str, seg: Any, image: dict[str, Any] | list[int]) -> None:
    """An RLE's ``size`` must be its image's ``[height, width]`` (pycocotools would compare masks
    of different sizes without a word)."""
    hw = [image["height"], image["width"]] if isinstance(image, dict) else image
    if isinstance(seg, dict) and list(seg["size"]) != hw:
        size = list(seg["size"])
        raise InputError(src, f"{field}.size", f"RLE size {size} differs from its image's [height, width] {hw}")


def _check_rle_counts(src: str, field: str, seg: Any) -> None:
    """A ground-truth RLE must decode to its ``size``: counts that sum to another pixel count, or a
    compressed string that is not an RLE, would be scored silently (AP 0) by pycocotools' IoU.
    Only the ground truth's RLEs are decoded here (few: COCO's crowd regions; LVIS has polygons);
    a results file's are not, since that would decode every predicted mask."""
    if not isinstance(seg, dict):
        return
    h, w = (int(v) for v in seg["size"])
    counts = seg["counts"]
    if isinstance(counts, list):
        if sum(counts) != h * w:
            why = f"the run lengths sum to {sum(counts)}, its size {h}x{w} has {h * w} pixels"
            raise InputError(src, f"{field}.counts", why)
        return
    try:
        mask_utils.decode({"size": [h, w], "counts": counts})
    except (ValueError, TypeError):
        raise InputError(src, f"{field}.counts", f"not a valid compressed RLE of {h}x{w} pixels") from None


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off while ~10^6 small dicts are made: it would walk every live
    object each time (2.2 s instead of 0.2 s for 600k detections); nothing made here is cyclic."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def first_images(gt: dict[str, Any], n: int | None) -> dict[str, Any]:
    """The ground truth of the first ``n`` images (all when None): what ``predict --max-images`` predicted."""
    if n is None:
        return gt
    kept = {im["id"] for im in gt["images"][:n]}
    return {
        **gt,
        "images": [im for im in gt["images"] if im["id"] in kept],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in kept],
    }


def check_categories(
    gt: dict[str, Any],
    source: str,
    expected: list[int],
    what: str,
    allow_subset: bool = False,
    remedy: str = "pass --allow-category-subset for that",
) -> None:
    """Refuse annotations whose categories are not exactly ``expected`` (a run's label map): AP would
    be computed over the categories both have only, silently. ``allow_subset`` (``predict
    --allow-category-subset``) asks for that subset explicitly. The error names the missing and
    extra ids (the first few of each), then ``remedy``."""
    have = {c["id"] for c in gt["categories"]}
    want = set(expected)
    if have == want or allow_subset:
        return

    def ids(xs: list[int]) -> str:
        return ", ".join(map(str, xs[:8])) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

    parts = []
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        parts.append(f"{len(missing)} of {what}'s categories are not in it (ids {ids(missing)})")
    if extra:
        parts.append(f"{len(extra)} of its categories are not {what}'s (ids {ids(extra)})")
    raise InputError(
        source,
        "categories",
        "; ".join(parts) + f": AP would cover only the categories both have; {remedy}",
    )
