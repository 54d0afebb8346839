"""Annotations whose categories are not the run's are one line naming the ids (issue 28, point 7),
unless the subset is asked for."""

from __future__ import annotations

import json

from simcal.cli import main
from tests.reliability.conftest import one_line


def _fewer(tiny_data, tmp_path):
    """The val annotations with the run's last two categories taken out: ``(path, their ids)``."""
    val = json.loads((tiny_data / "val.json").read_text())
    fewer = dict(val, categories=val["categories"][:4])  # the run knows 6
    kept = {c["id"] for c in fewer["categories"]}
    fewer["annotations"] = [a for a in val["annotations"] if a["category_id"] in kept]
    fewer["images"] = [
        {
            **im,
            **{f: [c for c in im.get(f, []) if c in kept] for f in ("neg_category_ids", "not_exhaustive_category_ids")},
        }
        for im in val["images"]
    ]
    gt = tmp_path / "fewer.json"
    gt.write_text(json.dumps(fewer))
    return gt, sorted(c["id"] for c in val["categories"][4:])


def test_predict_on_annotations_of_other_categories_names_the_ids(run, tiny_data, tmp_path, capsys):
    gt, missing = _fewer(tiny_data, tmp_path)
    argv = ["predict", "--run", str(run), "--split", "other", "--gt", str(gt), "--images", str(tiny_data / "images")]
    argv += ["--max-images", "3", "--no-progress"]
    assert main(argv) == 2
    one_line(
        capsys.readouterr().err,
        f"{gt}: categories: 2 of the detector's categories are not in it (ids {missing[0]}, {missing[1]})",
        "pass --allow-category-subset",
    )
    assert not (run / "predictions" / "other-first3").exists()
    assert main([*argv, "--allow-category-subset"]) == 0  # asked for: the subset is evaluated
    assert (run / "predictions" / "other-first3" / "orig" / "metrics_bbox.json").exists()
    out = capsys.readouterr()
    assert "the 4 of the detector's 6 categories" in out.out and "hotcoco" not in out.err  # no raw warning
    results = json.loads((run / "predictions" / "other-first3" / "orig" / "results.json").read_text())
    assert results and not {r["category_id"] for r in results} & set(missing)  # theirs left out
    # the analyses read what predict was asked for: the subset, from made_by.json
    assert main(["analyze", "errors", "--run", str(run), "--split", "other-first3", "--gt", str(gt)]) == 0
    val = json.loads((tiny_data / "val.json").read_text())
    more = dict(val, categories=[*val["categories"], {"id": 999, "name": "new", "frequency": "r"}])
    gt.write_text(json.dumps(more))
    assert main(argv) == 2
    one_line(capsys.readouterr().err, "1 of its categories are not the detector's (ids 999)")


def test_analyses_refuse_other_categories_than_the_predictions_had(run, tiny_data, tmp_path, capsys):
    """Predictions made on the full val, read by an analysis against annotations of fewer
    categories: one line, the analysis file is not written."""
    gt, missing = _fewer(tiny_data, tmp_path)
    assert main(["predict", "--run", str(run), "--max-images", "3", "--no-progress"]) == 0
    capsys.readouterr()
    for tool in ("errors", "confusion"):
        assert main(["analyze", tool, "--run", str(run), "--split", "val-first3", "--gt", str(gt)]) == 2
        one_line(
            capsys.readouterr().err, f"{gt}: categories: 2 of the detector's", "predict with --allow-category-subset"
        )
        assert not (run / "analysis" / tool).exists()
    assert main(["compare", "--run", str(run), "--split", "val-first3", "--gt", str(gt), "--heads", "orig,orig"]) == 2
    one_line(capsys.readouterr().err, f"(ids {missing[0]}, {missing[1]})")
    assert main(["analyze", "errors", "--run", str(run), "--split", "val-first3"]) == 0  # the run's own val
