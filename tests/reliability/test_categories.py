"""Annotations whose categories are not the run's are one line naming the ids (issue 28, point 7),
unless the subset is asked for."""

from __future__ import annotations

import json

from simcal.cli import main
from tests.reliability.conftest import one_line


def test_predict_on_annotations_of_other_categories_names_the_ids(run, tiny_data, tmp_path, capsys):
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
    argv = ["predict", "--run", str(run), "--split", "other", "--gt", str(gt), "--images", str(tiny_data / "images")]
    argv += ["--max-images", "3", "--no-progress"]
    missing = sorted(c["id"] for c in val["categories"][4:])
    assert main(argv) == 2
    one_line(
        capsys.readouterr().err,
        f"{gt}: categories: 2 of the detector's categories are not in it (ids {missing[0]}, {missing[1]})",
        "pass --allow-category-subset",
    )
    assert not (run / "predictions" / "other-first3").exists()
    assert main([*argv, "--allow-category-subset"]) == 0  # asked for: the subset is evaluated
    assert (run / "predictions" / "other-first3" / "orig" / "metrics_bbox.json").exists()
    more = dict(val, categories=[*val["categories"], {"id": 999, "name": "new", "frequency": "r"}])
    gt.write_text(json.dumps(more))
    assert main(argv) == 2
    one_line(capsys.readouterr().err, "1 of its categories are not the detector's (ids 999)")
