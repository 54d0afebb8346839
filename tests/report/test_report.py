"""``simcal report``: the HTML page from a tiny calibrated and predicted run, and its parts."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
import torch
from PIL import Image

from simcal.cli import main
from simcal.data.annotations import load_dataset
from simcal.report.gallery import gallery, pick_images
from simcal.report.html import read_results

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reported_run(calibrated_run):
    run = calibrated_run
    common = ["--run", str(run), "--no-progress"]
    assert main(["predict", *common, "--head", "orig,cal,dual"]) == 0
    assert main(["analyze", "sweep-T", *common, "--max-images", "8"]) == 0
    assert main(["analyze", "dynamics", *common, "--max-images", "8"]) == 0
    assert main(["analyze", "errors", *common]) == 0
    assert main(["analyze", "confusion", "--run", str(run)]) == 0
    assert main(["analyze", "recall", *common, "--max-images", "4"]) == 0
    assert main(["analyze", "oracle", *common, "--max-images", "4"]) == 0
    assert main(["compare", "--run", str(run), "--bootstrap", "50"]) == 0
    assert main(["report", "--run", str(run)]) == 0
    return run


def _cells(page: str, head: str, iou: str) -> list[str]:
    row = re.search(rf"<tr><td>{re.escape(head)}</td><td>{iou}</td>(.*?)</tr>", page)
    assert row, (head, iou)
    return re.findall(r"<td>(.*?)</td>", row.group(1))


def test_report_tables_match_the_metrics(reported_run):
    page = (reported_run / "report" / "index.html").read_text()
    pred = reported_run / "predictions" / "val"
    header = re.search(r"<tr><th>head</th><th>AP on</th>(.*?)</tr>", page).group(1)
    keys = re.findall(r"<th>(.*?)</th>", header)
    assert keys[:5] == ["images", "AP1", "AP2", "AP3", "AP4"] and "AP" in keys
    for tag, name in (("orig", "original"), ("cal", "calibrated only"), ("dual", "dual head (SimCal)")):
        for iou, label in (("bbox", "box"), ("segm", "mask")):
            m = json.loads((pred / tag / f"metrics_{iou}.json").read_text())
            want = [str(m["num_images"])] + ["-" if m[k] is None else f"{100 * m[k]:.1f}" for k in keys[1:]]
            assert _cells(page, name, label) == want


def test_report_is_self_contained_with_every_figure(reported_run):
    rep = reported_run / "report"
    page = (rep / "index.html").read_text()
    meta = json.loads((rep / "report.json").read_text())
    figures = meta["figures"]
    expected = {"class_frequency", "bins_bbox", "bins_segm", "sweep_T", "dynamics", "calibration_loss"}
    expected |= {"per_class_bbox", "per_class_segm", "errors", "errors_calibration"}
    expected |= {"confusion", "recall", "oracle"}  # every analysis' figure, drawn here from its json
    assert expected <= set(figures)
    assert not list((reported_run / "analysis").glob("*.png"))  # the analyses wrote numbers only
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(figures)
    files = {(rep / name).read_bytes() for name in figures.values()}
    for data in embedded:
        raw = base64.b64decode(data)
        assert raw in files
        w, h = Image.open(io.BytesIO(raw)).size
        assert w >= 300 and h >= 200
    # nothing fetched from elsewhere: no external scripts, styles or images
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "No T sweep yet" not in page and "No calibration dynamics yet" not in page
    assert "<h2>Errors and score calibration</h2>" in page and "<th>ECE</th>" in page
    assert "<h2>dual against orig: is the gain more than noise?</h2>" in page and "<th>P(delta &gt; 0)</th>" in page


def test_gallery_shows_rare_classes_from_the_ground_truth(reported_run, tiny_data):
    meta = json.loads((reported_run / "report" / "report.json").read_text())
    gt = load_dataset(tiny_data / "val.json")
    train = load_dataset(tiny_data / "train.json")
    names = {c["name"]: c for c in train["categories"]}
    rows = meta["gallery"]
    rare = {c["id"] for c in train["categories"] if c["frequency"] == "r"}
    assert rare & {a["category_id"] for a in gt["annotations"]}, "the tiny set has no rare class in val"
    assert rows and {names[row["rare_class"]]["id"] for row in rows} <= rare
    for row in rows:
        cat = names[row["rare_class"]]
        assert any(a["image_id"] == row["image_id"] and a["category_id"] == cat["id"] for a in gt["annotations"])
        assert set(row["heads"]) == {"original head", "dual head (SimCal)"}
    assert "gallery" in meta["figures"]


def test_report_names_missing_analyses(run, tmp_path):
    assert main(["predict", "--run", str(run), "--no-progress"]) == 0  # orig only, no analysis
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert f"simcal analyze sweep-T --run {run}" in page
    assert "simcal analyze dynamics" in page
    assert "Low-shot detections" not in page  # no dual head: no gallery


def test_report_without_predictions_is_one_clear_line(run, capsys):
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predictions" in err[0] and "simcal predict" in err[0]


def test_pick_images_follows_the_rare_order_and_never_repeats_an_image():
    gt = {
        "annotations": [
            {"image_id": 5, "category_id": 1},
            {"image_id": 3, "category_id": 1},
            {"image_id": 3, "category_id": 2},
            {"image_id": 9, "category_id": 2},
            {"image_id": 4, "category_id": 7},
        ]
    }
    assert pick_images(gt, [1, 2, 7], 10) == [(3, 1), (9, 2), (4, 7)]
    assert pick_images(gt, [2, 1], 10) == [(3, 2), (5, 1)]
    assert pick_images(gt, [1, 2, 7], 2) == [(3, 1), (9, 2)]
    assert pick_images(gt, [8], 3) == []


def test_read_results_streams_simcal_files_and_reads_plain_lists(tmp_path):
    dets = [{"image_id": i % 3, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1 * i} for i in range(7)]
    ours = tmp_path / "ours.json"
    ours.write_text("[\n" + ",\n".join(json.dumps(d) for d in dets) + "\n]\n")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(dets))
    for path in (ours, plain):
        got = read_results(path, [1, 2, 8])
        assert got[1] == [d for d in dets if d["image_id"] == 1]
        assert got[2] == [d for d in dets if d["image_id"] == 2]
        assert got[8] == []
        assert 0 not in got


def test_gallery_marks_the_rare_object_found_only_by_the_head_that_found_it(tiny_data, tmp_path):
    gt = load_dataset(tiny_data / "val.json")
    ann = gt["annotations"][0]
    image_id, cat = ann["image_id"], ann["category_id"]
    hit = {"image_id": image_id, "category_id": cat, "bbox": ann["bbox"], "score": 0.9}
    wrong_class = {**hit, "category_id": next(c["id"] for c in gt["categories"] if c["id"] != cat)}
    low = {**hit, "score": 0.2}
    results = {"a": {image_id: [wrong_class, low]}, "b": {image_id: [hit]}}
    info = gallery(tmp_path / "g.png", gt, tiny_data / "images", results, [(image_id, cat)], score_thresh=0.5)
    assert info[0]["heads"]["a"] == {"shown": 1, "rare_found": False}  # wrong class shown, right one below 0.5
    assert info[0]["heads"]["b"] == {"shown": 1, "rare_found": True}
    # one row of three 384-px panels (ground truth, a, b) with 8-px gaps, each under a 22-px title
    assert Image.open(tmp_path / "g.png").size == (3 * 384 + 2 * 8, 384 + 22)


def test_spread_and_rare_hits():
    from simcal.report.gallery import rare_hits, spread

    assert spread([1, 2, 3], 5) == [1, 2, 3]
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    gt = {
        "annotations": [
            {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10]},
            {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10]},
        ]
    }
    good = {"category_id": 7, "bbox": [1, 1, 10, 10], "score": 0.4}
    other = {"category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.9}
    results = {
        # image 1 has two objects: the top two detections are shown, so the rare one counts
        "a": {1: [other, good], 2: [{**good, "bbox": [30, 30, 10, 10]}]},  # image 2: wrong place
        # image 1: the rare detection ranks third of two shown -> not found; image 2: found
        "b": {1: [other, {**other, "score": 0.8}, good], 2: [good]},
    }
    assert rare_hits(gt, results, [7]) == {"a": (1, 2), "b": (1, 2)}
    assert rare_hits(gt, results, [7], score_thresh=0.5) == {"a": (0, 2), "b": (0, 2)}


def test_the_report_reads_a_run_without_torch(reported_run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "rep"
    code = (
        "import sys\n"
        "from simcal.report.html import build_report\n"
        f"build_report({str(reported_run)!r}, out={str(out)!r}, gallery_images=2)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
    assert "dual head (SimCal)" in (out / "index.html").read_text()
