"""Analysis metrics that need no model: class-agnostic proposal recall (COCO-style AR)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster


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
    coco_gt = COCO(
        {"images": gt["images"], "annotations": gt["annotations"], "categories": gt["categories"]},
        print_function=lambda *a: None,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a: None)
        ev.params.useCats = 0
        ev.params.maxDets = sorted(max_dets)
        ev.params.imgIds = sorted(proposals)
        ev.evaluate()
        ev.accumulate()
    recall = np.asarray(ev.eval["recall"])  # [T, K=1, A, M]
    out: dict[str, Any] = {"iou_thresholds": [round(float(t), 2) for t in ev.params.iouThrs], "recall_by_iou": {}}
    for m, md in enumerate(sorted(max_dets)):
        r = recall[:, 0, 0, m]
        out[f"AR@{md}"] = float(r[r > -1].mean()) if (r > -1).any() else None
        out["recall_by_iou"][str(md)] = [float(v) for v in r]
    return out
