"""Analysis metrics that need no model: class-agnostic proposal recall (COCO-style AR) and the
sources of classification errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hotcoco
import numpy as np
from pycocotools import mask as mask_utils


def proposal_recall(
    gt: dict[str, Any], proposals: dict[int, np.ndarray], max_dets: Sequence[int] = (100, 1000)
) -> dict[str, Any]:
    """Class-agnostic average recall of region proposals, as COCO's AR (IoU 0.50:0.95).

    Args:
        gt: validated ground truth (crowd regions are ignored, as in COCO).
        proposals: per image id, ``(P, 5)`` rows ``x1, y1, x2, y2, objectness`` in image pixels.
        max_dets: the proposal budgets (top by objectness).

    Returns:
        ``{"AR@100": .., "AR@1000": .., "recall_by_iou": {"100": [10 values], ...}, "iou_thresholds": [...]}``.
    """
    cat = gt["categories"][0]["id"] if gt["categories"] else 1
    dets = []
    for image_id, props in proposals.items():
        for x1, y1, x2, y2, s in np.asarray(props, dtype=np.float64).reshape(-1, 5):
            dets.append(
                {"image_id": int(image_id), "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
            )
    coco_gt = hotcoco.COCO({"images": gt["images"], "annotations": gt["annotations"], "categories": gt["categories"]})
    ev = hotcoco.COCOeval(coco_gt, coco_gt.load_res(dets), "bbox")
    ev.params.use_cats = False
    ev.params.max_dets = sorted(max_dets)
    ev.params.img_ids = sorted(proposals)
    ev.evaluate()
    ev.accumulate()
    recall = np.asarray(ev.eval["recall"])  # [T, K=1, A, M]
    out: dict[str, Any] = {"iou_thresholds": [round(float(t), 2) for t in ev.params.iou_thrs], "recall_by_iou": {}}
    for m, md in enumerate(sorted(max_dets)):
        r = recall[:, 0, 0, m]
        out[f"AR@{md}"] = float(r[r > -1].mean()) if (r > -1).any() else None
        out["recall_by_iou"][str(md)] = [float(v) for v in r]
    return out


def other_object_groups(
    gt: dict[str, Any], results: list[dict[str, Any]], group_of: dict[int, str], iou: float = 0.5
) -> list[str | None]:
    """Per detection, the frequency group of the OTHER-class object it sits on, else None.

    A detection of class c "sits on" an object of class d != c when its box overlaps that object's
    box at ``iou`` or more while it overlaps no object of c that much: a classification error
    (TIDE's "Cls" error), not a background or localisation one. Among several such objects the
    most overlapped counts. Boxes decide for ``segm`` too; the question is which object, not how
    well the mask fits.

    Args:
        gt: validated ground truth; crowd objects count as objects.
        results: detections ``{image_id, category_id, bbox, ...}``.
        group_of: category id -> ``"r"`` / ``"c"`` / ``"f"``.

    Returns:
        One entry per detection, in order: ``None`` or the group of the object it sits on.
    """
    objects: dict[int, list[dict[str, Any]]] = {}
    for a in gt["annotations"]:
        objects.setdefault(a["image_id"], []).append(a)
    by_image: dict[int, list[int]] = {}
    for k, r in enumerate(results):
        by_image.setdefault(r["image_id"], []).append(k)
    out: list[str | None] = [None] * len(results)
    for image_id, ks in by_image.items():
        objs = objects.get(image_id, [])
        if not objs:
            continue
        ious = np.asarray(
            mask_utils.iou([results[k]["bbox"] for k in ks], [o["bbox"] for o in objs], [0] * len(objs))
        ).reshape(len(ks), len(objs))
        obj_cats = np.array([o["category_id"] for o in objs])
        for row, k in zip(ious, ks):
            own = obj_cats == results[k]["category_id"]
            if (row[own] >= iou).any():
                continue
            other = np.where(~own, row, -1.0)
            j = int(other.argmax())
            if other[j] >= iou:
                out[k] = group_of[int(obj_cats[j])]
    return out
