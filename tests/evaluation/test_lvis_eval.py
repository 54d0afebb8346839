"""The evaluator against the official LVIS API, and each LVIS guard on a hand-made case."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

from simcal.data.annotations import validate_dataset
from simcal.data.stats import BIN_PRESETS, bin_index, category_stats
from simcal.errors import InputError
from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats
from simcal.evaluation.perturb import perturb_ground_truth, random_lvis_gt
from simcal.evaluation.protocols import LVIS_MAX_DETS
from tests.conftest import tiny_lvis

EDGES = (3, 15, 60)  # bins that the small fixture populates


@pytest.fixture(scope="module")
def lt_gt():
    """Long-tailed LVIS-like ground truth: 120 images, 40 categories, neg / not-exhaustive ids."""
    gt = validate_dataset(random_lvis_gt(120, 40, seed=3, not_exhaustive_fraction=0.2))
    assert any(img["not_exhaustive_category_ids"] for img in gt["images"])
    return gt


@pytest.fixture(scope="module")
def lt_results(lt_gt):
    # 350 false positives per image: every image exceeds the 300 cap before the guard
    return perturb_ground_truth(lt_gt, seed=4, false_positives=350, confuse_rate=0.2)


def official_lvis(gt, results, iou_type, monkeypatch, max_dets=300):
    """Run the official LVIS API (lvis 0.5.3), numpy 2 patched here only; -1 means empty.
    ``max_dets``: its per-image cap (-1: none)."""
    monkeypatch.setattr(np, "float", float, raising=False)
    from lvis import LVIS, LVISEval, LVISResults

    lvis_gt = LVIS.__new__(LVIS)
    lvis_gt.logger = logging.getLogger("lvis-test")
    lvis_gt.dataset = copy.deepcopy(gt)
    lvis_gt._create_index()
    res = copy.deepcopy(results)
    drop = "bbox" if iou_type == "segm" else "segmentation"
    for d in res:
        d.pop(drop, None)
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, res, max_dets=max_dets), iou_type)
    ev.run()
    return ev


@pytest.mark.slow
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_parity_with_official_lvis_api(lt_gt, lt_results, iou_type, monkeypatch):
    stats = resolve_category_stats(lt_gt, "gt", edges=EDGES)
    ours = evaluate(lt_gt, lt_results, iou_type, stats, EDGES)
    ev = official_lvis(lt_gt, lt_results, iou_type, monkeypatch)

    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        theirs = float(ev.results[key])
        mine = ours.metrics[key]
        assert (mine if mine is not None else -1.0) == pytest.approx(theirs, abs=1e-6), key

    # bins and per-class AP from the official precision array
    prec = ev.eval["precision"][:, :, :, 0]  # [T, R, K] area all
    per_cat = {}
    for k, cid in enumerate(sorted(ev.params.cat_ids)):
        v = prec[:, :, k]
        if (v > -1).any():
            per_cat[cid] = float(v[v > -1].mean())
    by_bin = {}
    for cat in lt_gt["categories"]:
        if cat["id"] in per_cat:
            by_bin.setdefault(bin_index(cat["instance_count"], EDGES), []).append(per_cat[cat["id"]])
    assert len(by_bin) == 4, "fixture must populate every bin"
    for b, aps in by_bin.items():
        assert ours.metrics[f"AP{b + 1}"] == pytest.approx(np.mean(aps), abs=1e-6)
    for row in ours.per_class:
        if row["id"] in per_cat:
            assert row["AP"] == pytest.approx(per_cat[row["id"]], abs=1e-6)
        else:
            assert row["AP"] is None and row["eval_instance_count"] == 0
    assert ours.metrics["AP"] > 0.05  # a real, non-degenerate comparison


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_evaluation_leaves_its_inputs_as_they_were(lt_gt, lt_results, iou_type):
    """The engine reads copies: the ground truth's polygons and the results stay as given."""
    gt, results = copy.deepcopy(lt_gt), copy.deepcopy(lt_results)
    evaluate(gt, results, iou_type, resolve_category_stats(gt, "gt", edges=EDGES), EDGES)
    assert gt == lt_gt and results == lt_results


def _det(image_id, cat, box, score, h=80, w=100):
    from pycocotools import mask as mask_utils

    x, y, bw, bh = box
    rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w))
    rle["counts"] = rle["counts"].decode()
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score, "segmentation": rle}


def test_rule_top_300_per_image_before_matching():
    gt = validate_dataset(tiny_lvis())
    stats = resolve_category_stats(gt, "gt")
    # 300 negatives (category 3 is negative in image 1) outscore the one true positive of class 1
    fps = [_det(1, 3, (60, 5, 10, 10), 0.9) for _ in range(LVIS_MAX_DETS)]
    tp = _det(1, 1, (10, 10, 20, 20), 0.5)
    r = evaluate(gt, [*fps, tp], "bbox", stats)
    ap1 = next(row["AP"] for row in r.per_class if row["id"] == 1)
    assert ap1 == 0.0  # the engine alone (300 per image AND class) would give 1.0
    assert r.num_detections_evaluated == LVIS_MAX_DETS
    # one fewer false positive and the true positive survives the cap
    r = evaluate(gt, [*fps[:-1], tp], "bbox", stats)
    assert next(row["AP"] for row in r.per_class if row["id"] == 1) == pytest.approx(1.0)


def test_rule_federated_filter_drops_unverified_classes():
    gt = validate_dataset(tiny_lvis())
    stats = resolve_category_stats(gt, "gt")
    tp = _det(1, 1, (10, 10, 20, 20), 0.5)
    # class 1 is neither in image 2's ground truth nor in its negatives: the FP does not count
    unverified_fp = _det(2, 1, (50, 50, 20, 20), 0.9)
    r = evaluate(gt, [tp, unverified_fp], "bbox", stats)
    assert r.num_detections_evaluated == 1
    assert next(row["AP"] for row in r.per_class if row["id"] == 1) == pytest.approx(1.0)
    # once class 1 is a verified negative of image 2, the same FP costs precision
    gt2 = copy.deepcopy(gt)
    gt2["images"][1]["neg_category_ids"] = [1]
    r = evaluate(gt2, [tp, unverified_fp], "bbox", stats)
    assert next(row["AP"] for row in r.per_class if row["id"] == 1) < 0.6


def test_not_exhaustive_unmatched_detections_are_ignored():
    gt = validate_dataset(tiny_lvis())
    stats = resolve_category_stats(gt, "gt")
    tp = _det(2, 2, (5, 5, 40, 40), 0.5)
    fp = _det(2, 2, (60, 40, 30, 30), 0.9)  # class 2 is not exhaustive in image 2
    tp1 = _det(1, 2, (50, 40, 30, 20), 0.4)
    r = evaluate(gt, [tp, fp, tp1], "bbox", stats)
    assert next(row["AP"] for row in r.per_class if row["id"] == 2) == pytest.approx(1.0)


def test_rule_segm_drops_bbox_so_sizes_use_mask_area():
    gt = validate_dataset(tiny_lvis())
    stats = resolve_category_stats(gt, "gt")
    tp = _det(1, 1, (10, 10, 20, 20), 0.5)  # small object (400 px)
    fp = _det(1, 1, (60, 5, 10, 10), 0.9)  # small mask, but claims a large box
    fp["bbox"] = [0, 0, 100, 80]
    r = evaluate(gt, [tp, fp], "segm", stats)
    assert fp["bbox"] == [0, 0, 100, 80]  # input untouched
    # small objects: class 1 (FP ranked above TP: AP 0.5) and class 2 (not detected: AP 0).
    # With the box area the FP would be 'large', ignored in APs, and APs would be (1 + 0) / 2.
    assert r.metrics["APs"] == pytest.approx((0.5 + 0.0) / 2, abs=0.01)


def test_empty_results_are_valid_and_score_zero():
    gt = validate_dataset(tiny_lvis())
    r = evaluate(gt, [], "segm", resolve_category_stats(gt, "gt"))
    assert r.metrics["AP"] == 0.0
    assert r.metrics["APr"] == 0.0 and r.metrics["APc"] == 0.0
    assert r.metrics["APf"] is None  # no category of group f has ground truth here
    assert r.num_detections == 0


def test_plain_coco_uses_coco_rules_and_train_counts():
    coco = tiny_lvis()
    for img in coco["images"]:
        del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    for cat in coco["categories"]:
        for k in ("frequency", "instance_count", "image_count"):
            del cat[k]
    gt = validate_dataset(coco)
    with pytest.raises(InputError, match="instance_count"):
        resolve_category_stats(gt, "val.json")
    train = copy.deepcopy(gt)
    stats = resolve_category_stats(gt, "val.json", train, "train.json")
    assert [s.instance_count for s in stats] == [1, 2, 0]
    # a class-3 detection in image 2 counts as a false positive under COCO rules (no federation)
    dets = [_det(1, 1, (10, 10, 20, 20), 0.5), _det(2, 3, (5, 5, 40, 40), 0.9)]
    r = evaluate(gt, dets, "bbox", stats)
    assert r.mode == "coco" and r.max_dets == 100
    assert r.num_detections_evaluated == 2
    assert r.metrics["APr"] == pytest.approx(1.0 / 2)  # class 1: AP 1; class 2: no detection


def test_train_must_cover_gt_categories():
    gt = validate_dataset(tiny_lvis())
    train = copy.deepcopy(gt)
    train["categories"] = train["categories"][:2]
    train["annotations"] = [a for a in train["annotations"] if a["category_id"] != 3]
    with pytest.raises(InputError, match=r"train.json: categories: lacks category ids \[3\]"):
        resolve_category_stats(gt, "val.json", train, "train.json")


def test_bins_from_train_split(lt_gt, lt_results):
    stats = category_stats(lt_gt, BIN_PRESETS["lvis"])
    r = evaluate(lt_gt, lt_results, "bbox", stats)
    assert [row["bin"] for row in r.per_class] == [s.bin + 1 for s in stats]
    assert set(r.metrics) >= {"AP1", "AP2", "AP3", "AP4"}


def test_coco_rules_ignore_detections_on_crowd_regions():
    """COCO rules: a detection on a crowd region is neither a true nor a false positive."""
    from pycocotools import mask as mask_utils

    coco = tiny_lvis()
    for img in coco["images"]:
        del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    crowd = {"id": 9, "image_id": 2, "category_id": 1, "bbox": [60, 40, 30, 30], "area": 900, "iscrowd": 1}
    crowd["segmentation"] = mask_utils.frPyObjects([[60, 40, 90, 40, 90, 70, 60, 70]], 80, 100)[0]
    crowd["segmentation"]["counts"] = crowd["segmentation"]["counts"].decode()
    coco["annotations"].append(crowd)
    gt = validate_dataset(coco)
    stats = resolve_category_stats(gt, "val.json", copy.deepcopy(gt), "train.json")
    tp = _det(1, 1, (10, 10, 20, 20), 0.5)
    on_crowd = _det(2, 1, (60, 40, 30, 30), 0.9)
    for iou in ("bbox", "segm"):
        r = evaluate(gt, [tp, on_crowd], iou, stats)
        assert r.mode == "coco"
        assert next(row["AP"] for row in r.per_class if row["id"] == 1) == pytest.approx(1.0), iou
        away = _det(2, 1, (0, 0, 8, 8), 0.9)  # the same detection off the crowd region: a false positive
        r = evaluate(gt, [tp, away], iou, stats)
        assert next(row["AP"] for row in r.per_class if row["id"] == 1) == pytest.approx(0.5, abs=0.01), iou


@pytest.mark.parametrize("iou", ["bbox", "segm"])
@pytest.mark.parametrize("protocol", ["lvis", "fixed", "pool"])
def test_a_results_file_streamed_into_columns_evaluates_as_its_dicts(lt_gt, lt_results, protocol, iou, tmp_path):
    """`simcal evaluate` streams the results file into columns (Detections: boxes, or the masks'
    RLE strings as bytes): every metric, per-class AP and count equals the evaluation of the same
    detections as dicts by the engine alone (hotcoco's LVISResults, as before), under every
    protocol; the file's layout does not matter."""
    import json

    from simcal import api
    from simcal.data.results import Detections, read_results

    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(lt_gt))
    dets = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score", "segmentation")} for d in lt_results]
    lines, one_line, indented = tmp_path / "lines.json", tmp_path / "one.json", tmp_path / "indented.json"
    lines.write_text("[\n" + ",\n".join(json.dumps(d) for d in dets) + "\n]\n")
    one_line.write_text(json.dumps(dets))
    indented.write_text(json.dumps(dets, indent=2))
    columns = read_results(lines, lt_gt, iou, block=1000)  # many blocks
    assert isinstance(columns, Detections) and len(columns) == len(dets)
    for other in (one_line, indented):
        again = read_results(other, lt_gt, iou)
        assert np.array_equal(columns.array, again.array) and columns.counts == again.counts
    for processes in (1, 2):  # two processes, each reading a share of the lines: the same columns
        for size in (1000, 1 << 23):
            again = read_results(lines, lt_gt, iou, block=size, processes=processes)
            assert np.array_equal(columns.array, again.array) and columns.counts == again.counts
            assert again.boxes == (iou == "bbox")
    if iou == "segm":
        assert columns.counts[0] == dets[0]["segmentation"]["counts"]
        assert columns.sizes.tolist()[0] == dets[0]["segmentation"]["size"]
    kw = dict(iou=iou, bins=list(EDGES), protocol=protocol, dets_per_class=150)
    as_dicts = api.evaluate(gt_path, dets, **kw).to_json()
    assert as_dicts["num_detections_evaluated"] < as_dicts["num_detections"]  # caps at work
    assert api.evaluate(gt_path, lines, **kw).to_json() == as_dicts
    if protocol == "lvis":  # the engine alone, on the dicts (a mask's box and area are the mask's)
        import hotcoco

        engine_dets = [{k: v for k, v in d.items() if k != ("segmentation" if iou == "bbox" else "bbox")} for d in dets]
        coco_gt = hotcoco.COCO(lt_gt)
        ev = hotcoco.COCOeval(coco_gt, hotcoco.LVISResults(coco_gt, engine_dets, max_dets=300), iou, lvis_style=True)
        ev.params.max_dets = [300]
        ev.evaluate()
        ev.accumulate()
        precision = np.asarray(ev.eval["precision"])[..., 0, -1]  # [T, R, K], area all
        assert as_dicts["AP"] == pytest.approx(float(precision[precision > -1].mean()), abs=1e-12)


BAD_DETECTIONS = {
    "bbox": [
        {"bbox": [1, 2, -3, 4]},
        {"image_id": -7, "bbox": [1, 2, 3, 4]},
        {"score": "high", "bbox": [1, 2, 3, 4]},
        {},
        [1, 2],
        {"score": True, "bbox": [1, 2, 3, 4]},
        {"score": float("nan"), "bbox": [1, 2, 3, 4]},
        {"score": float("inf"), "bbox": [1, 2, 3, 4]},
        {"bbox": [1, 2, 3, 4, 5]},
        {"bbox": [1, 2, 3, None]},
        {"bbox": [1, 2, 3, "4"]},
        {"category_id": "1", "bbox": [1, 2, 3, 4]},
        {"category_id": 10**30, "bbox": [1, 2, 3, 4]},
    ],
    "segm": [
        {"segmentation": {"size": [1, 1], "counts": "1"}},
        {"segmentation": {"size": [64], "counts": "1"}},
        {"segmentation": {"size": [64, True], "counts": "1"}},
        {"segmentation": {"counts": "1"}},
        {"segmentation": {"size": [64, 64], "counts": 7}},
        {"segmentation": [[1, 2, 3]]},
        {"segmentation": "RLE"},
        {"bbox": [1, 2, 3, 4]},
        {"image_id": -7},
        {"score": float("nan")},
    ],
}


@pytest.mark.parametrize("iou", ["bbox", "segm"])
def test_a_bad_detection_in_a_streamed_file_is_named_as_before(lt_gt, tmp_path, iou):
    """The column checks find what the detection-by-detection checks found, with the same line:
    the file, the detection's position and the field."""
    import json

    from simcal.data.results import load_results, read_results

    image = lt_gt["images"][0]
    hw = [image["height"], image["width"]]
    good = {"image_id": image["id"], "category_id": lt_gt["categories"][0]["id"], "score": 0.5}
    good["segmentation" if iou == "segm" else "bbox"] = {"size": hw, "counts": "0"} if iou == "segm" else [0, 0, 1, 1]
    assert image["height"] != 64 or image["width"] != 64  # the bad sizes below are not the image's
    for bad in BAD_DETECTIONS[iou]:
        if isinstance(bad, dict):
            bad = {**{k: v for k, v in good.items() if k not in ("bbox", "segmentation")}, **bad}
        path = tmp_path / "res.json"
        path.write_text("[\n" + ",\n".join(json.dumps(d) for d in [good] * 3 + [bad]) + "\n]\n")
        with pytest.raises(InputError) as streamed:
            read_results(path, lt_gt, iou)
        with pytest.raises(InputError) as in_two:  # the bad line in the second process's share
            read_results(path, lt_gt, iou, processes=2)
        with pytest.raises(InputError) as whole:
            load_results(path, lt_gt, iou)
        assert str(streamed.value) == str(in_two.value) == str(whole.value) and "[3]" in str(whole.value), bad
    # what the checks let through in another type (an image id 1.0 is the image 1) reads as well
    odd = {**good, "image_id": float(good["image_id"])}
    path.write_text(json.dumps([good, odd]))
    got = read_results(path, lt_gt, iou)
    assert got.image_ids.tolist() == [good["image_id"]] * 2
    if iou == "bbox":
        assert got.array[1].tolist() == [good["image_id"], 0, 0, 1, 1, 0.5, good["category_id"]]
    else:  # a polygon is read as its compressed RLE
        poly = {**good, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}
        path.write_text(json.dumps([poly]))
        from pycocotools import mask as mask_utils

        want = mask_utils.merge(mask_utils.frPyObjects(poly["segmentation"], *hw))["counts"].decode()
        assert read_results(path, lt_gt, iou).counts == [want]


def _coco_rules(gt):
    """``gt`` without LVIS's image fields: evaluated under COCO rules."""
    out = copy.deepcopy(gt)
    for img in out["images"]:
        for k in ("neg_category_ids", "not_exhaustive_category_ids"):
            img.pop(k, None)
    return out


def _engine_reads(monkeypatch):
    """Every results file large enough for hotcoco to read itself (the two readers' size: 0 here);
    returns the count of forks made."""
    import os

    from simcal.data import results

    forks = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or fork())
    monkeypatch.setattr(results, "PARALLEL_READ_BYTES", 0)
    monkeypatch.setattr(results, "_can_fork", lambda: True)  # another test may have loaded torch here
    return forks


@pytest.mark.parametrize("boxes", ["every", "none", "after the first"])
def test_a_file_of_masks_under_coco_rules_read_by_the_engine_evaluates_as_its_columns(
    lt_gt, lt_results, boxes, tmp_path, monkeypatch, capfd
):
    """Under COCO rules every mask goes to the engine, so a large results file is parsed by hotcoco
    itself while two forked children check it: every metric, per-class AP and count equals the
    evaluation of the file's columns, on a file of lines or of one line. A mask's size range is its
    mask's: the boxes written here cover the whole image, and hotcoco, which takes every box's area
    where the first detection has a box (pycocotools' rule), gets the masks' areas counted by the
    children instead; where the first has none it takes every mask's own."""
    import json

    from simcal import api
    from simcal.data import results
    from simcal.data.results import read_results

    gt = _coco_rules(lt_gt)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    hw = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    dets = []
    for i, d in enumerate(lt_results):
        det = {k: d[k] for k in ("image_id", "category_id", "score", "segmentation")}
        if boxes == "every" or (boxes == "after the first" and i):
            det["bbox"] = [0, 0, hw[d["image_id"]][1], hw[d["image_id"]][0]]
        dets.append(det)
    path = tmp_path / "res.json"
    path.write_text("[\n" + ",\n".join(json.dumps(d) for d in dets) + "\n]\n")
    kw = dict(iou="segm", bins=list(EDGES))
    columns = api.evaluate(gt_path, read_results(path, gt, "segm", processes=1).to_dicts(), **kw).to_json()
    assert columns["mode"] == "coco" and columns["num_detections_evaluated"] == len(dets)

    forks = _engine_reads(monkeypatch)
    read = results.read_results
    monkeypatch.setattr(results, "read_results", lambda *a, **k: pytest.fail("read as columns"))
    assert api.evaluate(gt_path, path, **kw).to_json() == columns
    assert forks == [1, 1]  # the two checking children; no areas counter
    assert capfd.readouterr().err == ""
    one_line = tmp_path / "one_line.json"  # as json.dump writes it
    one_line.write_text(json.dumps(dets))
    assert api.evaluate(gt_path, one_line, **kw).to_json() == columns and len(forks) == 4
    if boxes == "every":  # the test can fail: with the boxes' areas, the sizes' APs move
        checked = results.checked_later
        monkeypatch.setattr(
            "simcal.evaluation.engines.checked_later", lambda *a, areas, **k: checked(*a, areas=lambda _: False, **k)
        )
        by_box = api.evaluate(gt_path, path, **kw).to_json()
        assert by_box["AP"] == columns["AP"] and by_box["APs"] != columns["APs"] != -1
    # another protocol, or LVIS rules, read the columns
    monkeypatch.setattr(results, "read_results", read)
    monkeypatch.setattr("simcal.evaluation.engines.checked_later", lambda *a, **k: pytest.fail("read by the engine"))
    assert api.evaluate(gt_path, path, **{**kw, "protocol": "fixed"}).to_json()["protocol"] == "fixed"
    lvis_path = tmp_path / "lvis.json"
    lvis_path.write_text(json.dumps(lt_gt))
    assert api.evaluate(lvis_path, path, **kw).to_json()["mode"] == "lvis"


def test_a_bad_file_of_masks_read_by_the_engine_gets_the_columns_error_alone(lt_gt, tmp_path, monkeypatch, capfd):
    """A file the children's checks refuse is read again as columns, which name the detection
    and the field; what hotcoco printed while it parsed (an image id not in the ground truth, which
    it only warns about) is not shown, and what it refuses itself (a NaN score) gets the same line.
    A file the children leave to the columns (a polygon) evaluates as its columns."""
    import json

    from simcal import api
    from simcal.data.results import read_results

    gt = _coco_rules(lt_gt)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    image = gt["images"][0]
    good = {"image_id": image["id"], "category_id": gt["categories"][0]["id"], "score": 0.5}
    good["segmentation"] = {"size": [image["height"], image["width"]], "counts": "0"}
    path = tmp_path / "res.json"
    unknown = max(img["id"] for img in gt["images"]) + 1
    forks = _engine_reads(monkeypatch)
    for bad in ({"image_id": unknown}, {"score": float("nan")}, {"segmentation": {"size": [1, 1], "counts": "1"}}):
        path.write_text("[\n" + ",\n".join(json.dumps(d) for d in [good] * 6 + [{**good, **bad}]) + "\n]\n")
        with pytest.raises(InputError) as columns:
            read_results(path, gt, "segm", processes=1)
        capfd.readouterr()
        forks.clear()
        with pytest.raises(InputError) as routed:
            api.evaluate(gt_path, path, iou="segm")
        assert str(routed.value) == str(columns.value) and "[6]" in str(columns.value), bad
        assert forks[:2] == [1, 1] and capfd.readouterr().err == "", bad
    polygon = {**good, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}
    path.write_text("[\n" + ",\n".join(json.dumps(d) for d in [good] * 6 + [polygon]) + "\n]\n")
    forks.clear()
    got = api.evaluate(gt_path, path, iou="segm").to_json()
    assert forks[:2] == [1, 1]
    assert got == api.evaluate(gt_path, read_results(path, gt, "segm", processes=1).to_dicts(), iou="segm").to_json()


def test_the_engines_mask_iou_does_not_read_the_rows_box(lt_gt, lt_results):
    """The engine gets masks as rows of the results array plus their RLEs; the rows' boxes are
    the detections' boxes or zeros (a file read for its masks alone). hotcoco's mask IoU must not
    read them: the same precision with the masks' own boxes, the file's boxes and zeros. (Should
    an upgrade start to, this fails, and engines._hotcoco_results must give the masks' boxes.)"""
    import hotcoco

    from simcal.data.results import as_detections
    from simcal.evaluation.engines import gt_for_engine

    stats = resolve_category_stats(lt_gt, "gt")
    dets = as_detections(lt_results, lt_gt, ("bbox", "segm"))
    segs = dets.segmentation()
    area = np.asarray(hotcoco.mask.area(segs), dtype=np.float64)
    coco_gt = hotcoco.COCO(gt_for_engine(lt_gt, stats))
    precisions = []
    for boxes in (np.asarray(hotcoco.mask.toBbox(segs)), dets.array[:, 1:5], np.zeros((len(dets), 4))):
        array = dets.array.copy()
        array[:, 1:5] = boxes
        coco_dt = coco_gt.load_res(array, segmentation=segs)
        coco_dt.update_anns(ids=np.arange(1, len(dets) + 1), area=area)
        ev = hotcoco.COCOeval(coco_gt, coco_dt, "segm", lvis_style=True)
        ev.evaluate()
        ev.accumulate()
        precisions.append(np.asarray(ev.eval["precision"]))
    assert (precisions[0] > 0).any()
    assert all(np.array_equal(precisions[0], p) for p in precisions[1:])


def test_mask_areas_counted_by_a_forked_process_are_the_pixel_counts(lt_gt, lt_results, monkeypatch):
    """The masks' areas (the size ranges of segm AP) are counted by a forked process while the
    engine loads the masks, where there are many: the same numbers as counted here, and as the
    masks' decoded pixels; more than pycocotools' 255 RLEs at once."""
    import os

    from pycocotools import mask as mask_utils

    from simcal.data import results
    from simcal.data.results import areas_later, as_detections

    dets = as_detections(lt_results, lt_gt, "segm")
    assert len(dets) > 255
    pixels = [float(mask_utils.decode(s).sum()) for s in dets.segmentation()]
    forks = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or fork())
    monkeypatch.setattr(results, "PARALLEL_AREA_MASKS", 10)
    monkeypatch.setattr(results, "_can_fork", lambda: True)  # another test may have loaded torch here
    assert areas_later(dets)().tolist() == pixels and forks == [1]
    monkeypatch.setattr(results, "_can_fork", lambda: False)
    assert areas_later(dets)().tolist() == pixels and forks == [1]


def test_summary_means_are_the_valid_precisions_means():
    """Each summary AP is the mean of the valid (> -1) precisions it covers: all of a class, or
    none (no ground truth: None), or a mix (an area range without ground truth in some classes)."""
    from simcal.data.stats import CategoryStat
    from simcal.evaluation.lvis_eval import summarize

    rng = np.random.default_rng(0)
    precision = rng.random((10, 101, 4, 4))  # [T, R, K, A]
    precision[:, :, 1] = -1  # class 1: no ground truth
    precision[:, :, 2, 1] = -1  # class 2: no small objects
    precision[3:, 60:, 3, 0] = -1  # class 3: a mixed block (as an engine never makes it; still a mean)
    stats = [CategoryStat(k + 1, f"c{k}", 10 * (k + 1), k + 1, "rcfc"[k], k % 2) for k in range(4)]
    gt = {"images": [{"id": 1}], "annotations": [], "categories": [{"id": s.id, "name": s.name} for s in stats]}
    result = summarize(precision, [1, 2, 3, 4], gt, stats, [15.0], "segm", True, 300, 0, 0)

    def mean(p):
        v = p[p > -1]
        return float(v.mean()) if v.size else None

    m = result.metrics
    assert m["AP"] == pytest.approx(mean(precision[..., 0]), abs=1e-12)
    assert m["AP50"] == pytest.approx(mean(precision[0, :, :, 0]), abs=1e-12)
    assert m["AP75"] == pytest.approx(mean(precision[5, :, :, 0]), abs=1e-12)
    for key, a in (("APs", 1), ("APm", 2), ("APl", 3)):
        assert m[key] == pytest.approx(mean(precision[..., a]), abs=1e-12)
    per_class = [mean(precision[:, :, k, 0]) for k in range(4)]
    assert [c["AP"] for c in result.per_class][1] is None
    for got, want in zip(result.per_class, per_class):
        assert got["AP"] == (None if want is None else pytest.approx(want, abs=1e-12))
    assert result.per_class[3]["AP50"] == pytest.approx(mean(precision[0, :, 3, 0]), abs=1e-12)
    assert m["APr"] == pytest.approx(per_class[0], abs=1e-12) and m["APf"] == pytest.approx(per_class[2], abs=1e-12)
    assert m["APc"] == pytest.approx(per_class[3], abs=1e-12)  # class 1 (c) has no AP: left out
    assert m["AP1"] == pytest.approx((per_class[0] + per_class[2]) / 2, abs=1e-12)
