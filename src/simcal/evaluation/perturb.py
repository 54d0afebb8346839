"""Detections made from ground truth, and random LVIS-like ground truth without images.

Used where real detections are not at hand: the evaluation parity tests, the evaluation speed
benchmark, and the demo before training exists. Nothing here is used to compute a real result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from simcal.data.stats import count_instances, frequency_of


def _rle(poly: list[float], h: int, w: int) -> dict[str, Any]:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_poly(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def random_lvis_gt(
    num_images: int,
    num_categories: int,
    *,
    seed: int = 0,
    image_size: int = 256,
    max_objects: int = 12,
    not_exhaustive_fraction: float = 0.05,
    neg_per_image: int = 8,
) -> dict[str, Any]:
    """A random long-tailed LVIS-format dataset (no image files), for evaluation tests.

    Category frequencies follow a power law; objects are boxes with a polygon mask (a rectangle
    with a cut corner, so mask and box areas differ). Images carry ``neg_category_ids`` (random
    absent categories) and, for some, ``not_exhaustive_category_ids`` (a present category).
    Categories carry ``frequency`` / ``image_count`` / ``instance_count`` of this split itself.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_categories + 1) ** 1.2
    weights /= weights.sum()
    images, anns = [], []
    for img_id in range(1, num_images + 1):
        n = int(rng.integers(1, max_objects + 1))
        cats = rng.choice(num_categories, size=n, p=weights) + 1
        for c in cats:
            w, h = rng.uniform(4, image_size / 2, size=2)
            x, y = rng.uniform(0, image_size - w), rng.uniform(0, image_size - h)
            cut = 0.4 * min(w, h)
            poly = [x, y, x + w - cut, y, x + w, y + cut, x + w, y + h, x, y + h]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(c),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h - cut * cut / 2),
                    "segmentation": [[float(v) for v in poly]],
                    "iscrowd": 0,
                }
            )
        present = {int(c) for c in cats}
        absent = [c for c in range(1, num_categories + 1) if c not in present]
        neg = rng.choice(absent, size=min(neg_per_image, len(absent)), replace=False) if absent else []
        nel = [int(cats[0])] if rng.random() < not_exhaustive_fraction else []
        images.append(
            {
                "id": img_id,
                "width": image_size,
                "height": image_size,
                "file_name": f"{img_id:06d}.png",
                "neg_category_ids": sorted(int(c) for c in neg),
                "not_exhaustive_category_ids": nel,
            }
        )
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"cat{c:04d}"} for c in range(1, num_categories + 1)],
    }
    counts = count_instances(data)
    for cat in data["categories"]:
        n_inst, n_img = counts[cat["id"]]
        cat.update(instance_count=n_inst, image_count=n_img, frequency=frequency_of(n_img))
    return data


def perturb_ground_truth(
    gt: dict[str, Any],
    *,
    seed: int = 0,
    jitter: float = 0.1,
    miss_rate: float = 0.1,
    confuse_rate: float = 0.1,
    false_positives: int = 3,
    iou_type: str = "both",
) -> list[dict[str, Any]]:
    """Detections that look like a detector's: jittered ground truth plus false positives.

    Each ground-truth object is missed with ``miss_rate``, else detected with a box shifted and
    scaled by up to ``jitter`` of its size and a score; with ``confuse_rate`` its class is
    replaced by a random one. ``false_positives`` random boxes per image (random classes, low
    scores) are added. Results carry ``bbox`` and an RLE ``segmentation`` (the shifted box) when
    ``iou_type`` is ``"both"``; only one of them for ``"bbox"`` / ``"segm"``.
    """
    rng = np.random.default_rng(seed)
    images = {img["id"]: img for img in gt["images"]}
    cat_ids = np.array(sorted(c["id"] for c in gt["categories"]))
    out: list[dict[str, Any]] = []

    def emit(img_id: int, cat: int, box: list[float], score: float) -> None:
        img = images[img_id]
        x, y, w, h = box
        x, y = max(0.0, x), max(0.0, y)
        w, h = max(1.0, min(w, img["width"] - x)), max(1.0, min(h, img["height"] - y))
        det: dict[str, Any] = {"image_id": img_id, "category_id": int(cat), "score": float(score)}
        if iou_type in ("both", "bbox"):
            det["bbox"] = [round(float(v), 2) for v in (x, y, w, h)]
        if iou_type in ("both", "segm"):
            det["segmentation"] = _rle(_box_poly(x, y, w, h), img["height"], img["width"])
        out.append(det)

    for ann in gt["annotations"]:
        if rng.random() < miss_rate:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-jitter, jitter, size=2) * np.array([w, h])
        sw, sh = 1 + rng.uniform(-jitter, jitter, size=2)
        cat = ann["category_id"]
        if rng.random() < confuse_rate:
            cat = int(rng.choice(cat_ids))
        emit(ann["image_id"], cat, [x + dx, y + dy, w * sw, h * sh], rng.uniform(0.3, 1.0))
    for img_id, img in images.items():
        for _ in range(false_positives):
            w, h = rng.uniform(4, img["width"] / 2), rng.uniform(4, img["height"] / 2)
            x, y = rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h)
            emit(img_id, int(rng.choice(cat_ids)), [x, y, w, h], rng.uniform(0.0, 0.5))
    return out
