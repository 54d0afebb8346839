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
