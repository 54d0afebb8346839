"""AP-fixed and AP-pool (Dave et al. 2021): against the official LVIS API and worked by hand."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from simcal.cli import main
from simcal.data.annotations import validate_dataset
from simcal.data.stats import CategoryStat
from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats
from simcal.evaluation.perturb import perturb_ground_truth, random_lvis_gt
from simcal.evaluation.protocols import cap_per_class
from tests.evaluation.test_lvis_eval import EDGES, official_lvis

K = 40  # a small per-class cap, so that it binds on the fixture


@pytest.fixture(scope="module")
def gt():
    return validate_dataset(random_lvis_gt(80, 30, seed=5, not_exhaustive_fraction=0.2))


@pytest.fixture(scope="module")
def results(gt):
    # 350 detections per image: far past the 300 cap, and past K for most classes
    return perturb_ground_truth(gt, seed=6, false_positives=350, confuse_rate=0.3)


def _reference_cap(results, k):
    """The definition, written out: per class, the k highest scores over the dataset (earlier wins a tie)."""
    by_class = {}
    for i, d in enumerate(results):
        by_class.setdefault(d["category_id"], []).append((-d["score"], i))
    keep = sorted(i for dets in by_class.values() for _, i in sorted(dets)[:k])
    return [results[i] for i in keep]


def test_cap_per_class_is_the_definition(results):
    assert cap_per_class(results, K) == _reference_cap(results, K)
    assert cap_per_class(results, 10**9) == results and cap_per_class([], K) == []
    far = [{**d, "category_id": d["category_id"] + 10**12} for d in results]  # ids past a counting table
    assert [d["score"] for d in cap_per_class(far, K)] == [d["score"] for d in _reference_cap(results, K)]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_fixed_equals_the_official_api_without_the_per_image_cap(gt, results, iou_type, monkeypatch):
    """AP-fixed = the official LVIS evaluation (lvis 0.5.3) of the K best detections per class
    with no per-image cap (its ``LVISResults(max_dets=-1)``), as lvis_challenge_2021 defines it."""
    stats = resolve_category_stats(gt, "gt", edges=EDGES)
    ours = evaluate(gt, results, iou_type, stats, EDGES, protocol="fixed", dets_per_class=K)
    ref = official_lvis(gt, _reference_cap(results, K), iou_type, monkeypatch, max_dets=-1)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        theirs = float(ref.results[key])
        assert (ours.metrics[key] if ours.metrics[key] is not None else -1.0) == pytest.approx(theirs, abs=1e-9), key
    prec = ref.eval["precision"][:, :, :, 0]
    for k, row in enumerate(ours.per_class):
        v = prec[:, :, k]
        assert row["AP"] == (pytest.approx(float(v[v > -1].mean()), abs=1e-9) if (v > -1).any() else None)
    lvis = evaluate(gt, results, iou_type, stats, EDGES)
    assert ours.metrics["AP"] != lvis.metrics["AP"]  # the caps bind: a different protocol, not a relabel
    assert ours.protocol == "fixed" and ours.dets_per_class == K and ours.to_json()["protocol"] == "fixed"


def _one_image():
    return validate_dataset(
        {
            "images": [
                {"id": 1, "width": 100, "height": 80, "neg_category_ids": [], "not_exhaustive_category_ids": []}
            ],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 40, 30, 20], "area": 600},
            ],
            "categories": [
                {"id": 1, "name": "a", "frequency": "r", "instance_count": 5, "image_count": 5},
                {"id": 2, "name": "b", "frequency": "r", "instance_count": 6, "image_count": 6},
            ],
        }
    )


def test_ap_pool_worked_by_hand_and_what_scaling_one_class_does():
    """Class a: a true positive (0.9) above a false positive (0.8); class b: a true positive (0.5).
    Each class alone has AP 1. Pooled: TP, FP, TP; precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1,
    made monotone 1, 2/3, 2/3: the 51 recall thresholds up to 0.5 read 1, the 50 above read 2/3,
    AP-pool = (51 + 50 * 2/3) / 101. Raise class b's score above the false positive (x1.9) and
    AP-pool becomes 1, while the per-class AP (and AP-fixed) cannot move."""
    gt = _one_image()
    stats = resolve_category_stats(gt, "gt")
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [70, 5, 10, 10], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [50, 40, 30, 20], "score": 0.5},
    ]
    fixed = evaluate(gt, dets, "bbox", stats, protocol="fixed")
    pooled = evaluate(gt, dets, "bbox", stats, protocol="pool")
    assert fixed.metrics["AP"] == pytest.approx(1.0)
    assert pooled.metrics["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert pooled.metrics["APr"] == pooled.metrics["AP"] and pooled.metrics["APf"] is None
    assert [r["AP"] for r in pooled.per_class] == [pytest.approx(1.0)] * 2  # per class: AP-fixed's
    scaled = copy.deepcopy(dets)
    scaled[2]["score"] *= 1.9
    assert evaluate(gt, scaled, "bbox", stats, protocol="fixed").metrics["AP"] == pytest.approx(1.0)
    assert evaluate(gt, scaled, "bbox", stats, protocol="pool").metrics["AP"] == pytest.approx(1.0)


def test_a_pool_of_one_class_is_that_class_ap(gt, results):
    """With every class in its own bin, each bin's AP-pool is that class's AP: the pooling reads
    the engine's matches exactly as the engine's own accumulation does (ignored detections too)."""
    stats = resolve_category_stats(gt, "gt", edges=EDGES)
    ours = evaluate(gt, results, "bbox", stats, EDGES, protocol="pool", dets_per_class=K)
    fixed = evaluate(gt, results, "bbox", stats, EDGES, protocol="fixed", dets_per_class=K)
    singles = [b for b in range(len(EDGES) + 1) if sum(s.bin == b for s in stats if _has_gt(gt, s.id)) == 1]
    for b in singles:
        only = next(r for r in fixed.per_class if r["bin"] == b + 1 and r["AP"] is not None)
        assert ours.metrics[f"AP{b + 1}"] == pytest.approx(only["AP"], abs=1e-12)
    assert ours.metrics["AP"] != pytest.approx(fixed.metrics["AP"])  # pooled over 30 classes: another number
    assert np.isfinite(ours.metrics["AP"]) and 0 < ours.metrics["AP"] < 1


def _pooled_by_the_api(ev, stats, num_bins):
    """An official evaluator's (lvis 0.5.3's or pycocotools') per-(class, area, image) matches,
    after ``evaluate()``, pooled as the authors' LVISPooledEval (large-vocab-devil) pools them:
    each pool's entries handed to the API's own accumulation as if they were one class's.
    ``{key: AP-pool}``."""
    coco = hasattr(ev, "evalImgs")  # pycocotools' spelling
    params = [ev.params, ev._paramsEval] if coco else [ev.params]
    p = ev.params
    cat_ids = list(p.catIds if coco else p.cat_ids)
    num_a = len(p.areaRng if coco else p.area_rng)
    num_i = len(p.imgIds if coco else p.img_ids)
    matches = ev.evalImgs if coco else ev.eval_imgs
    by_id = {s.id: s for s in stats}
    pools = [cat_ids, *([c for c in cat_ids if by_id[c].frequency == g] for g in "rcf")]
    pools += [[c for c in cat_ids if by_id[c].bin == b] for b in range(num_bins)]

    def entries(cats, a):
        starts = [cat_ids.index(c) * num_a * num_i + a * num_i for c in cats]
        return [e for s in starts for e in matches[s : s + num_i] if e is not None]

    width = max(len(entries(cats, a)) for cats in pools for a in range(num_a))
    table = []
    for cats in pools:
        for a in range(num_a):
            got = entries(cats, a)
            table += got + [None] * (width - len(got))
    for q in params:
        if coco:
            q.catIds, q.imgIds = list(range(len(pools))), list(range(width))
        else:
            q.cat_ids, q.img_ids = list(range(len(pools))), list(range(width))
    if coco:
        ev.evalImgs = table
        with contextlib.redirect_stdout(io.StringIO()):
            ev.accumulate()
        prec = ev.eval["precision"][..., -1]
    else:
        ev.eval_imgs = table
        ev.accumulate()
        prec = ev.eval["precision"]  # [T, R, pool, A]

    def mean(x):
        return float(x[x > -1].mean()) if (x > -1).any() else None

    out = {"AP": mean(prec[:, :, 0, 0]), "AP50": mean(prec[0, :, 0, 0]), "AP75": mean(prec[5, :, 0, 0])}
    out.update({key: mean(prec[:, :, 0, a]) for a, key in enumerate(("APs", "APm", "APl"), start=1)})
    keys = ["APr", "APc", "APf", *(f"AP{b + 1}" for b in range(num_bins))]
    out.update({key: mean(prec[:, :, j, 0]) for j, key in enumerate(keys, start=1)})
    return out


def official_pooled(gt, results, iou_type, stats, num_bins, monkeypatch):
    """AP-pool by the official LVIS API's matches of AP-fixed's detections (:func:`_pooled_by_the_api`)."""
    ev = official_lvis(gt, _reference_cap(results, K), iou_type, monkeypatch, max_dets=-1)
    return _pooled_by_the_api(ev, stats, num_bins)


def pycocotools_pooled(gt, results, iou_type, stats, num_bins):
    """AP-pool under COCO rules by pycocotools' matches of AP-fixed's detections (K per image
    and class at most, as the per-class cap leaves them)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        res = copy.deepcopy(_reference_cap(results, K))
        for d in res:
            d.pop("bbox" if iou_type == "segm" else "segmentation", None)
        ev = COCOeval(coco_gt, coco_gt.loadRes(res), iou_type)
        ev.params.maxDets = [K]
        ev.evaluate()
    return _pooled_by_the_api(ev, stats, num_bins)


def _check_pooled(ours, theirs):
    assert set(theirs) == {k for k in ours.metrics}
    for key, value in theirs.items():
        assert (ours.metrics[key] if ours.metrics[key] is not None else -1.0) == pytest.approx(
            value if value is not None else -1.0, abs=1e-12
        ), key
    assert sum(v is None for v in theirs.values()) < 2  # the groups are there to compare


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_pool_equals_the_official_apis_matches_pooled(gt, results, iou_type, monkeypatch):
    """AP-pool (one engine run on virtual images, each group re-accumulated over its classes'
    images) equals the official API's own matches pooled per group, every key; per class it is
    AP-fixed's."""
    stats = resolve_category_stats(gt, "gt", edges=EDGES)
    ours = evaluate(gt, results, iou_type, stats, EDGES, protocol="pool", dets_per_class=K)
    _check_pooled(ours, official_pooled(gt, results, iou_type, stats, len(EDGES) + 1, monkeypatch))
    fixed = evaluate(gt, results, iou_type, stats, EDGES, protocol="fixed", dets_per_class=K)
    assert ours.per_class == fixed.per_class and ours.metrics["AP"] != pytest.approx(fixed.metrics["AP"])
    mixed = [*stats[::-1], CategoryStat(10**6, "not in the gt", 5, 5, "f", 0)]  # looked up by id, not by place
    assert evaluate(gt, results, iou_type, mixed, EDGES, protocol="pool", dets_per_class=K).metrics == ours.metrics


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_pool_breaks_score_ties_as_the_official_pooling_does(gt, results, iou_type, monkeypatch):
    """Scores tied across classes (rounded to 0.05: a pool's ranking then depends on the order of
    the tied detections): a pool's detections are in class order, then image order, before the
    stable sort by score, as the official API's matches pooled class by class."""
    tied = [{**d, "score": round(d["score"] * 20) / 20} for d in results]
    stats = resolve_category_stats(gt, "gt", edges=EDGES)
    ours = evaluate(gt, tied, iou_type, stats, EDGES, protocol="pool", dets_per_class=K)
    _check_pooled(ours, official_pooled(gt, tied, iou_type, stats, len(EDGES) + 1, monkeypatch))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_pool_under_coco_rules_equals_pycocotools_matches_pooled(gt, results, iou_type):
    """A plain COCO json (no federated rule, no not-exhaustive classes, some crowd regions):
    AP-pool equals pycocotools' own matches pooled per group, every key."""
    plain = copy.deepcopy(gt)
    for image in plain["images"]:
        image.pop("neg_category_ids"), image.pop("not_exhaustive_category_ids")
    for ann in plain["annotations"][::7]:
        ann["iscrowd"] = 1  # matched detections on it are ignored, not counted
    stats = resolve_category_stats(plain, "gt", edges=EDGES)
    ours = evaluate(plain, results, iou_type, stats, EDGES, protocol="pool", dets_per_class=K)
    assert ours.mode == "coco"
    _check_pooled(ours, pycocotools_pooled(plain, results, iou_type, stats, len(EDGES) + 1))


def _has_gt(gt, cid):
    return any(a["category_id"] == cid for a in gt["annotations"])


def test_protocols_from_the_command_line(tmp_path, capsys):
    import json

    gt = _one_image()
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [70, 5, 10, 10], "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": [50, 40, 30, 20], "score": 0.5},
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(dets))
    argv = ["evaluate", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "res.json"), "--iou", "bbox"]
    assert main([*argv, "--protocol", "pool", "--dets-per-class", "5", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "bbox AP-pool (pooled over each group's classes) (LVIS rules, no per-image cap, 5 dets/class" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["protocol"] == "pool" and m["dets_per_class"] == 5 and m["AP"] == pytest.approx((51 + 100 / 3) / 101)
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--protocol", "fixed", "--dets-per-class", "0"])
    assert stop.value.code == 2
    assert "argument --dets-per-class: expected an integer >= 1" in capsys.readouterr().err
