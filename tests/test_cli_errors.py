"""Bad input: one line naming file and field, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simcal.cli import main
from tests.conftest import tiny_lvis

GOOD_RESULTS = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]


def _gt_case(mutate):
    data = tiny_lvis()
    mutate(data)
    return data


GT_CASES = {
    "missing key": (lambda d: d.pop("annotations"), "annotations: missing top-level key"),
    "not a list": (lambda d: d.update(categories={}), "categories: expected a list"),
    "unknown image": (
        lambda d: d["annotations"][1].update(image_id=99),
        "annotations[1].image_id: unknown image id 99",
    ),
    "unknown category": (
        lambda d: d["annotations"][2].update(category_id=7),
        "annotations[2].category_id: unknown category id 7",
    ),
    "duplicate image id": (lambda d: d["images"][1].update(id=1), "images[1].id: duplicate id 1"),
    "duplicate ann id": (lambda d: d["annotations"][2].update(id=1), "annotations[2].id: duplicate id 1"),
    "negative box": (
        lambda d: d["annotations"][0].update(bbox=[1, 1, -3, 4]),
        "annotations[0].bbox: negative width or height",
    ),
    "non-finite box": (
        lambda d: d["annotations"][0].update(bbox=[1, 1, float("nan"), 4]),
        "annotations[0].bbox: non-finite",
    ),
    "short box": (
        lambda d: d["annotations"][0].update(bbox=[1, 1, 4]),
        "annotations[0].bbox: expected [x, y, width, height]",
    ),
    "odd polygon": (
        lambda d: d["annotations"][1].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]),
        "annotations[1].segmentation[0]: polygon needs an even number",
    ),
    "tiny polygon": (
        lambda d: d["annotations"][1].update(segmentation=[[1, 2, 3, 4]]),
        "annotations[1].segmentation[0]: polygon needs",
    ),
    "nested polygon": (
        lambda d: d["annotations"][1].update(segmentation=[[[1, 2], [3, 4], [5, 6]]]),
        "annotations[1].segmentation[0]: polygon",
    ),
    "text polygon": (
        lambda d: d["annotations"][1].update(segmentation=[["a", 2, 3, 4, 5, 6]]),
        "annotations[1].segmentation[0]: polygon must be",
    ),
    "bad rle": (
        lambda d: d["annotations"][1].update(segmentation={"counts": "abc"}),
        "annotations[1].segmentation.size: RLE needs size",
    ),
    "bad neg ids": (
        lambda d: d["images"][0].update(neg_category_ids=[42]),
        "images[0].neg_category_ids: unknown category id 42",
    ),
    "bad frequency": (lambda d: d["categories"][0].update(frequency="x"), "categories[0].frequency"),
    "no width": (lambda d: d["images"][0].pop("width"), "images[0].width: expected a positive integer"),
}


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("case", sorted(GT_CASES))
def test_bad_ground_truth(case, write_json, capsys, tmp_path):
    mutate, expected = GT_CASES[case]
    gt = write_json("val.json", _gt_case(mutate))
    res = write_json("res.json", GOOD_RESULTS)
    out = tmp_path / "m.json"
    rc, err = _run(capsys, ["evaluate", "--gt", gt, "--results", res, "--iou", "bbox", "--out", out])
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"simcal: error: {gt}: ")
    assert expected in err
    assert not out.exists()


RESULT_CASES = {
    "not a list": ({"annotations": []}, "(top level): results must be a list"),
    "unknown image": ([{**GOOD_RESULTS[0], "image_id": 5}], "[0].image_id: unknown image id 5"),
    "unknown category": (
        [GOOD_RESULTS[0], {**GOOD_RESULTS[0], "category_id": 9}],
        "[1].category_id: unknown category id 9",
    ),
    "no score": ([{k: v for k, v in GOOD_RESULTS[0].items() if k != "score"}], "[0].score: expected a finite number"),
    "inf score": ([{**GOOD_RESULTS[0], "score": float("inf")}], "[0].score: expected a finite number"),
    "negative box": ([{**GOOD_RESULTS[0], "bbox": [0, 0, 5, -1]}], "[0].bbox: negative width or height"),
    "no box": ([{k: v for k, v in GOOD_RESULTS[0].items() if k != "bbox"}], "[0].bbox: missing"),
    "not an object": ([3], "[0]: expected an object"),
}


@pytest.mark.parametrize("case", sorted(RESULT_CASES))
def test_bad_results(case, write_json, capsys):
    results, expected = RESULT_CASES[case]
    gt = write_json("val.json", tiny_lvis())
    res = write_json("res.json", results)
    rc, err = _run(capsys, ["evaluate", "--gt", gt, "--results", res, "--iou", "bbox"])
    assert rc == 2 and err.count("\n") == 1
    assert f"{res}: " in err and expected in err


def test_invalid_json_names_file_and_position(write_json, capsys):
    gt = write_json("val.json", '{"images": [')
    res = write_json("res.json", GOOD_RESULTS)
    rc, err = _run(capsys, ["evaluate", "--gt", gt, "--results", res])
    assert rc == 2 and err.count("\n") == 1
    assert f"{gt}: (json): invalid JSON at line 1" in err


def test_missing_file(capsys, tmp_path):
    rc, err = _run(capsys, ["stats", tmp_path / "nope.json"])
    assert rc == 2 and "nope.json: (file): no such file" in err


def test_segm_results_need_segmentation(write_json, capsys):
    gt = write_json("val.json", tiny_lvis())
    res = write_json("res.json", GOOD_RESULTS)
    rc, err = _run(capsys, ["evaluate", "--gt", gt, "--results", res, "--iou", "segm"])
    assert rc == 2 and "[0].segmentation: missing (needed for --iou segm)" in err


def test_empty_results_give_zero_ap_and_files(write_json, capsys, tmp_path):
    gt = write_json("val.json", tiny_lvis())
    res = write_json("res.json", [])
    out, csv = tmp_path / "m.json", tmp_path / "pc.csv"
    rc = main(
        [
            "evaluate",
            "--gt",
            str(gt),
            "--results",
            str(res),
            "--iou",
            "segm",
            "--out",
            str(out),
            "--per-class",
            str(csv),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AP1" in printed and "APr" in printed
    metrics = json.loads(out.read_text())
    assert metrics["AP"] == 0.0 and metrics["APr"] == 0.0 and metrics["APf"] is None
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"} <= set(metrics)
    assert [r["train_instance_count"] for r in metrics["per_class"]] == [3, 50, 5000]
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("id,name,frequency,bin") and len(lines) == 4


def test_console_script_prints_no_traceback(write_json, tmp_path):
    gt = write_json("val.json", _gt_case(lambda d: d["annotations"][0].update(bbox="x")))
    res = write_json("res.json", [])
    exe = __import__("shutil").which("simcal") or f"{sys.prefix}/bin/simcal"
    p = subprocess.run([exe, "evaluate", "--gt", str(gt), "--results", str(res)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"simcal: error: {gt}: annotations[0].bbox: expected [x, y, width, height], got x"
    ]
    assert p.stdout == ""
