"""The run directory's names: head tags built and read in one place (:class:`simcal.run.HeadTag`)."""

from __future__ import annotations

import pytest

from simcal.modeling.scoring import HeadSpec
from simcal.report.leaderboard import commands
from simcal.run import HeadTag


@pytest.mark.parametrize(
    "spec, tag, kind, param",
    [
        (HeadSpec("orig"), "orig", "orig", ""),
        (HeadSpec("cal"), "cal", "cal", ""),
        (HeadSpec("cal", cal="cb_rfs"), "cal@cb_rfs", "cal", ""),
        (HeadSpec("dual"), "dual", "dual", ""),
        (HeadSpec("dual", cal="lr_rfs"), "dual@lr_rfs", "dual", ""),
        (HeadSpec("dual", "avg", 100.0, cal="x"), "dual_avg_T100@x", "dual", "avg_T100"),
        (HeadSpec("norcal", param=0.5, cal="ignored"), "norcal_0.5", "norcal", "0.5"),
        (HeadSpec("logit-adj"), "logit-adj_1", "logit-adj", "1"),
        (HeadSpec("oracle"), "oracle", "oracle", ""),
    ],
)
def test_a_head_spec_formats_its_tag_and_the_tag_parses_back(spec, tag, kind, param):
    assert spec.tag == tag
    parsed = HeadTag.parse(tag)
    assert parsed.format() == str(parsed) == tag
    assert (parsed.kind, parsed.param) == (kind, param)
    assert parsed.calibration == (spec.cal if spec.kind in ("cal", "dual") else "")


def test_the_leaderboard_reads_tags_back_into_their_commands():
    rows = {"orig": "", "dual@cb_rfs": "", "cal@seesaw_dec": "", "norcal_1": ""}
    out = commands(rows, {"cb_rfs": ["calibration.loss=lr"]}, {"seesaw": "seesaw_dec"})
    assert out["dual@cb_rfs"].endswith("simcal predict --run RUN --head dual --calibration cb_rfs")
    assert "calibration.loss=lr" in out["dual@cb_rfs"]
    assert out["cal@seesaw_dec"].endswith("--head cal --calibration seesaw_dec")
    assert out["norcal_1"] == "simcal predict --run RUN --head norcal (inference.param 1)"
