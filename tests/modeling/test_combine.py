"""Dual-head score combiners and post-hoc calibrations against values written out by hand."""

from __future__ import annotations

import pytest
import torch

from simcal.modeling.combine import (
    COMBINERS,
    POSTHOC,
    combine,
    combine_avg,
    combine_cal_only,
    combine_orig,
    combine_sel,
    combine_sel_norm,
    combine_sel_scale,
    combine_sel_thr,
    logit_adjustment,
    merge_detections,
    norcal,
    sel_mask,
)

torch.set_num_threads(1)

# R = 2 RoIs, C = 3 foreground classes, column 0 background
P_ORIG = [
    [0.70, 0.10, 0.15, 0.05],
    [0.40, 0.20, 0.10, 0.30],
]
P_CAL = [
    [0.50, 0.30, 0.04, 0.16],
    [0.20, 0.03, 0.45, 0.32],
]
COUNTS = [5, 300, 301]  # class 1 tail, class 2 exactly at T = 300, class 3 just above


def t(rows: list[list[float]] | list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def p_orig(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return t(P_ORIG, dtype)


def p_cal(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return t(P_CAL, dtype)


def counts() -> torch.Tensor:
    return torch.tensor(COUNTS, dtype=torch.int64)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- sel
def test_sel_takes_calibrated_columns_up_to_T_inclusive_background_from_orig() -> None:
    out = combine_sel(p_orig(), p_cal(), counts(), T=300.0)
    close(out, t([[0.70, 0.30, 0.04, 0.05], [0.40, 0.03, 0.45, 0.30]]))


def test_sel_strict_excludes_the_boundary() -> None:
    out = combine_sel(p_orig(), p_cal(), counts(), T=300.0, strict=True)
    close(out, t([[0.70, 0.30, 0.15, 0.05], [0.40, 0.03, 0.10, 0.30]]))


def test_sel_released_code_setting_T100_strict() -> None:
    out = combine_sel(p_orig(), p_cal(), counts(), T=100.0, strict=True)
    close(out, t([[0.70, 0.30, 0.15, 0.05], [0.40, 0.03, 0.10, 0.30]]))


def test_sel_extremes_of_T() -> None:
    all_cal = combine_sel(p_orig(), p_cal(), counts(), T=301.0)
    close(all_cal, t([[0.70, 0.30, 0.04, 0.16], [0.40, 0.03, 0.45, 0.32]]))  # background still orig
    close(combine_sel(p_orig(), p_cal(), counts(), T=4.0), p_orig())


def test_sel_mask() -> None:
    assert sel_mask(COUNTS, 300.0).tolist() == [False, True, True, False]
    assert sel_mask(COUNTS, 300.0, strict=True).tolist() == [False, True, False, False]


def test_sel_counts_as_list_and_float_tensor() -> None:
    expected = combine_sel(p_orig(), p_cal(), counts(), T=300.0)
    close(combine_sel(p_orig(), p_cal(), COUNTS, T=300.0), expected)
    close(combine_sel(p_orig(), p_cal(), torch.tensor(COUNTS, dtype=torch.float32), T=300.0), expected)


def test_sel_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="C = 3"):
        combine_sel(p_orig(), p_cal(), [5, 300], T=300.0)
    with pytest.raises(ValueError, match="R, C\\+1"):
        combine_sel(p_orig(), p_cal()[:, :3], counts(), T=300.0)


# ----------------------------------------------------------------------------- other combiners
def test_orig_and_cal_only() -> None:
    close(combine_orig(p_orig(), p_cal()), p_orig())
    close(combine_cal_only(p_orig(), p_cal()), p_cal())  # background from the calibrated head too


def test_avg() -> None:
    out = combine_avg(p_orig(), p_cal())
    close(out, t([[0.60, 0.20, 0.095, 0.105], [0.30, 0.115, 0.275, 0.31]]))


def test_sel_thr_zeroes_low_calibrated_scores() -> None:
    # calibrated 0.04 (row 0, class 2) and 0.03 (row 1, class 1) fall below 0.05; orig's 0.05 stays
    out = combine_sel_thr(p_orig(), p_cal(), counts(), T=300.0)
    close(out, t([[0.70, 0.30, 0.00, 0.05], [0.40, 0.00, 0.45, 0.30]]))


def test_sel_scale_ratio_by_hand() -> None:
    # mean calibrated background (0.5 + 0.2) / 2 = 0.35, mean original (0.7 + 0.4) / 2 = 0.55
    s = 0.35 / 0.55  # 7 / 11 < 1: the calibrated head's inflated foreground scores shrink
    out = combine_sel_scale(p_orig(), p_cal(), counts(), T=300.0)
    close(out, t([[0.70, 0.30 * s, 0.04 * s, 0.05], [0.40, 0.03 * s, 0.45 * s, 0.30]]))


def test_sel_scale_empty() -> None:
    out = combine_sel_scale(torch.zeros(0, 4), torch.zeros(0, 4), COUNTS, T=300.0)
    assert out.shape == (0, 4)


def test_sel_norm_rows_sum_to_one() -> None:
    out = combine_sel_norm(p_orig(), p_cal(), counts(), T=300.0)
    close(
        out,
        t([[0.70 / 1.09, 0.30 / 1.09, 0.04 / 1.09, 0.05 / 1.09], [0.40 / 1.18, 0.03 / 1.18, 0.45 / 1.18, 0.30 / 1.18]]),
    )
    close(out.sum(1), t([1.0, 1.0]))


def test_registry_and_dispatch() -> None:
    assert set(COMBINERS) == {"orig", "cal-only", "avg", "sel", "sel-thr", "sel-scale", "sel-norm"}
    assert set(POSTHOC) == {"norcal", "logit-adj"}
    for name, fn in COMBINERS.items():
        out = fn(p_orig(), p_cal(), counts(), 300.0)  # uniform signature
        assert out.shape == (2, 4), name
        close(combine(name, p_orig(), p_cal(), counts(), 300.0), out)
    close(combine("sel", p_orig(), p_cal(), counts()), combine_sel(p_orig(), p_cal(), counts(), 300.0))
    close(
        combine("sel", p_orig(), p_cal(), counts(), 300.0, strict=True),
        combine_sel(p_orig(), p_cal(), counts(), 300.0, strict=True),
    )
    for name, fn in POSTHOC.items():
        assert fn(p_orig().log(), counts(), 0.5).shape == (2, 4), name


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="valid names: orig, cal-only, avg, sel, sel-thr, sel-scale, sel-norm"):
        combine("max", p_orig(), p_cal(), counts())
    with pytest.raises(ValueError, match="merge_detections"):
        combine("det", p_orig(), p_cal(), counts())


# ----------------------------------------------------------------------------- det
def dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_merge_detections_class_wise_nms() -> None:
    a = dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.3], [1, 2])
    b = dets(
        [[1, 0, 11, 10], [0, 0, 10, 10], [8, 0, 18, 10]],
        [0.8, 0.6, 0.5],
        [1, 3, 1],
    )
    # b[0]: class 1, IoU 90/110 with a[0] -> suppressed; b[1]: same box, class 3 -> kept;
    # b[2]: class 1, IoU 20/180 with a[0] -> kept
    out = merge_detections(a, b, iou=0.5, max_dets=300)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6, 0.5, 0.3])
    assert out["labels"].tolist() == [1, 3, 1, 2]
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [8, 0, 18, 10], [20, 20, 30, 30]]

    capped = merge_detections(a, b, iou=0.5, max_dets=2)
    assert capped["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert capped["labels"].tolist() == [1, 3]
    assert capped["boxes"].shape == (2, 4)


def test_merge_detections_empty() -> None:
    out = merge_detections(dets([], [], []), dets([], [], []))
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)


# ----------------------------------------------------------------------------- post-hoc
LOGITS = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.7, 0.9]]


def sm(z: torch.Tensor) -> torch.Tensor:
    """The softmax classifier's log-scores: post-hoc methods read the scores (in log space), not logits."""
    return torch.log_softmax(z, 1)


def test_norcal_gamma0_is_softmax() -> None:
    z = t(LOGITS)
    close(norcal(sm(z), counts(), gamma=0.0), torch.softmax(z, 1))


def test_norcal_by_hand() -> None:
    # equal logits: softmax 1/4 each; background stays 1/4; foreground proportional to
    # N^-1/2 = 1/2, 1/4, 1 for N = 4, 16, 1 -> (2, 1, 4) / 7 of the remaining 3/4
    out = norcal(sm(torch.zeros(1, 4, dtype=torch.float64)), [4, 16, 1], gamma=0.5)
    close(out, t([[0.25, 3 / 14, 3 / 28, 3 / 7]]))


def test_norcal_down_weights_frequent_classes() -> None:
    z = t(LOGITS)
    out, soft = norcal(sm(z), [4, 16, 1], gamma=0.5), torch.softmax(z, 1)
    # class 1 (N = 4) vs class 2 (N = 16): ratio grows by (16 / 4)^0.5 = 2; class 3 (N = 1) vs 1 by 2
    close(out[:, 1] / out[:, 2], 2 * soft[:, 1] / soft[:, 2])
    close(out[:, 3] / out[:, 1], 2 * soft[:, 3] / soft[:, 1])
    close(out[:, 0], soft[:, 0])  # background untouched
    close(out.sum(1), t([1.0, 1.0]))


def test_logit_adjustment() -> None:
    z = t(LOGITS)
    close(logit_adjustment(sm(z), counts(), tau=0.0), torch.softmax(z, 1))
    # equal logits, prior proportional to 4, 16, 1 -> foreground (4, 1, 16) / 21 of 3/4
    out = logit_adjustment(sm(torch.zeros(1, 4, dtype=torch.float64)), [4, 16, 1], tau=1.0)
    close(out, t([[0.25, 1 / 7, 1 / 28, 4 / 7]]))
    close(logit_adjustment(sm(z), counts(), tau=0.7), norcal(sm(z), counts(), gamma=0.7))


def test_zero_counts_and_extreme_logits_are_finite() -> None:
    z = t([[50.0, -50.0, 0.0, 30.0], [-80.0, 80.0, 0.0, -80.0]])
    for zero in ([0, 300, 301], [0, 0, 0]):
        for fn in (norcal, logit_adjustment):
            out = fn(sm(z), zero, 1.0)
            assert torch.isfinite(out).all()
            close(out.sum(1), t([1.0, 1.0]))
    close(norcal(sm(z), [0, 300, 301], 1.0), norcal(sm(z), [1, 300, 301], 1.0))  # N = 0 counts as 1


# ----------------------------------------------------------------------------- purity, dtype
def test_inputs_not_modified_and_outputs_not_aliased() -> None:
    po, pc, c, z = p_orig(), p_cal(), counts(), t(LOGITS)
    copies = [x.clone() for x in (po, pc, c, z)]
    for name in COMBINERS:
        out = combine(name, po, pc, c, 300.0)
        out.add_(1.0)  # writing to the result must not write through to the inputs
    for fn in POSTHOC.values():
        fn(z, c, 0.5).add_(1.0)  # any (R, C+1) tensor: here the logits stand in for scores
    a = dets([[0, 0, 10, 10]], [0.9], [1])
    a_copy = {k: v.clone() for k, v in a.items()}
    merge_detections(a, dets([[1, 0, 11, 10]], [0.8], [1]))
    for x, y in zip((po, pc, c, z), copies):
        assert torch.equal(x, y)
    for k in a:
        assert torch.equal(a[k], a_copy[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_dtype_preserved(dtype: torch.dtype) -> None:
    for name in COMBINERS:
        assert combine(name, p_orig(dtype), p_cal(dtype), counts(), 300.0).dtype == dtype, name
    for name, fn in POSTHOC.items():
        assert fn(sm(t(LOGITS, dtype)), counts(), 0.5).dtype == dtype, name


def test_norcal_on_unnormalised_scores_divides_without_renormalising() -> None:
    # sigmoid-style scores: N = 1, 4, 16, gamma = 0.5 -> weights 1, 1/2, 1/4 (the rarest class keeps its score)
    log_scores = torch.log(t([[0.5, 0.8, 0.4, 0.2]]))
    close(norcal(log_scores, [1, 4, 16], gamma=0.5, normalized=False), t([[0.5, 0.8, 0.2, 0.05]]))
    close(logit_adjustment(log_scores, [1, 4, 16], tau=0.5, normalized=False), t([[0.5, 0.8, 0.2, 0.05]]))


def test_post_hoc_from_log_softmax_equals_the_logit_form() -> None:
    """norcal of log_softmax(z) is the softmax of z_c - gamma log N_c over the foreground times
    1 - p_0, and the background p_0, computed from the logits (the form the paper's methods take)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 8, generator=g, dtype=torch.float64) * 15
    n = torch.tensor([1, 5, 30, 300, 1000, 2, 7], dtype=torch.float64)
    log_z = torch.logsumexp(z, 1, keepdim=True)
    fg_mass = torch.exp(torch.logsumexp(z[:, 1:], 1, keepdim=True) - log_z)
    for gamma in (0.0, 0.5, 1.0):
        ref = torch.cat([torch.exp(z[:, :1] - log_z), torch.softmax(z[:, 1:] - gamma * n.log(), 1) * fg_mass], 1)
        torch.testing.assert_close(norcal(sm(z), n, gamma), ref, rtol=1e-12, atol=1e-15)
