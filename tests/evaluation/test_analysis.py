import numpy as np
import pytest

from simcal.data.annotations import validate_dataset
from tests.conftest import tiny_lvis


def test_proposal_recall_by_hand():
    from simcal.evaluation.analysis import proposal_recall

    gt = validate_dataset(tiny_lvis())  # 3 objects: [10,10,20,20], [50,40,30,20] in image 1; [5,5,40,40] in 2
    exact = {1: np.array([[10, 10, 30, 30, 1.0], [50, 40, 80, 60, 0.9]]), 2: np.array([[5, 5, 45, 45, 1.0]])}
    out = proposal_recall(gt, exact, (100, 1000))
    assert out["AR@100"] == pytest.approx(1.0) and out["AR@1000"] == pytest.approx(1.0)
    # shift each box by d along x: IoU = (w - d) / (w + d) = 0.619, 0.622, 0.619, recalled at IoU
    # thresholds 0.50, 0.55 and 0.60 only -> AR 3/10
    shifted = {1: np.array([[14.7, 10, 34.7, 30, 1.0], [57, 40, 87, 60, 0.9]]), 2: np.array([[14.4, 5, 54.4, 45, 1.0]])}
    out = proposal_recall(gt, shifted, (100, 1000))
    assert out["AR@100"] == pytest.approx(0.3)
    assert out["recall_by_iou"]["100"][:4] == [1.0, 1.0, 1.0, 0.0]
    # the array form (what torchrun's parts join into) is the same; an image without proposals
    # keeps its objects missed: 1 of 3 objects found
    from simcal.evaluation.analysis import proposal_rows

    rows = np.concatenate([proposal_rows(i, b[:, :4]) for i, b in shifted.items()])
    assert proposal_recall(gt, rows, (100, 1000)) == out
    one_found = {1: np.zeros((0, 5)), 2: exact[2]}
    assert proposal_recall(gt, one_found)["AR@100"] == pytest.approx(1 / 3)
    assert proposal_recall(gt, np.zeros((0, 6)), image_ids=[1, 2])["AR@100"] == 0.0


def test_other_object_groups_by_hand():
    from simcal.evaluation.analysis import other_object_groups

    data = tiny_lvis()  # image 1: class 1 at [10,10,20,20], class 2 at [50,40,30,20]; image 2: class 2
    data["annotations"].append({**data["annotations"][0], "id": 4, "category_id": 3, "bbox": [11, 10, 20, 20]})
    gt = validate_dataset(data)
    group_of = {1: "f", 2: "r", 3: "c"}
    dets = [
        (1, 1, [10, 10, 20, 20]),  # on its own object (also on the class-3 one at IoU 0.9): not an error
        (1, 1, [50, 40, 30, 20]),  # on the class-2 object: a frequent-class detection on a rare object
        (1, 2, [10, 10, 20, 20]),  # on class 1 (IoU 1) and class 3 (IoU 0.9): the most overlapped counts
        (2, 1, [5, 5, 40, 40]),  # on image 2's class-2 object
        (1, 1, [0, 60, 10, 10]),  # on nothing: background, not a classification error
        (1, 1, [62, 40, 30, 20]),  # on the class-2 object at IoU 0.43 only: a localisation error
    ]
    results = [{"image_id": i, "category_id": c, "bbox": b, "score": 0.5} for i, c, b in dets]
    assert other_object_groups(gt, results, group_of) == [None, "r", "f", "r", None, None]
    assert other_object_groups(gt, results, group_of, iou=0.4)[5] == "r"
