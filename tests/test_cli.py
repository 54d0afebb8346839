"""The command table: flags that set config values are aliases of overrides, each command takes
the overrides it should, and out-of-range flags stop at argparse."""

from __future__ import annotations

import pytest

import simcal.engine.calibrate as engine_calibrate
from simcal.cli import COMMANDS, build_parser, main
from simcal.config import load_config


def test_the_parser_is_the_table():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001 - argparse's own API
    assert list(sub) == [c.name for c in COMMANDS]
    for c in COMMANDS:
        assert sub[c.name].get_default("func") is c.handler
        assert any(a.dest == "overrides" for a in sub[c.name]._actions) == (c.overrides is not None)
    assert [c.name for c in COMMANDS if c.overrides is not None] == ["train", "calibrate", "predict"]


def test_calibrate_flags_are_aliases_of_overrides(trained_run, monkeypatch):
    seen = []
    monkeypatch.setattr(engine_calibrate, "calibrate", lambda run, overrides, **kw: seen.append(overrides) or "x")
    flags = ["--steps", "5", "--loss", "focal", "--lr", "1e-05", "--head", "2fc_rand", "--seed", "3"]
    assert main(["calibrate", "--run", str(trained_run), *flags]) == 0
    extra = ["calibration.loss=focal", "calibration.loss_kwargs={gamma: 2}", "calibration.decay=[0.5, 0.9]"]
    assert main(["calibrate", "--run", str(trained_run), "--steps", "5", *extra]) == 0
    by_flags, by_keys = seen
    assert by_flags == [
        'calibration.head="2fc_rand"',
        "calibration.steps=5",
        'calibration.loss="focal"',
        "calibration.lr=1e-05",
        "calibration.seed=3",
    ]
    c = load_config(None, by_flags).calibration
    assert (c.steps, c.loss, c.lr, c.head, c.seed) == (5, "focal", 1e-05, "2fc_rand", 3)
    c = load_config(None, by_keys).calibration
    assert c.steps == 5 and c.loss_kwargs == {"gamma": 2} and c.decay == [0.5, 0.9]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "train.max_iter=3"], "(command line): train.max_iter: cannot be overridden here"),
        (["calibrate", "--steps", "3", "calibration.steps=4"], "calibration.steps: given twice, as 3 and 4"),
        (["calibrate", "calibration.decay=[3, 7]"], "calibration.decay: must be fractions of calibration.steps"),
        (["calibrate", "calibration.loss_kwargs={gamma: 2}"], "loss 'ce' takes no 'gamma'"),
        (["predict", "calibration.steps=3"], "(command line): calibration.steps: cannot be overridden here"),
        (
            ["predict", "--head", "dual", "--T", "-5"],
            "(command line): inference.T: must be >= 0 (training instances), got -5.0",
        ),
        (["predict", "model.arch=small"], "model.arch: cannot be overridden here"),
    ],
)
def test_scoped_and_checked_overrides_are_one_line(trained_run, capsys, argv, message):
    assert main([argv[0], "--run", str(trained_run), *argv[1:], "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("simcal: error: ") and message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "sweep-T", "--run", "r", "--T", "abc"], "expected comma-separated numbers"),
        (["report", "--run", "r", "--gallery", "-1"], "expected an integer >= 0"),
        (["report", "--run", "r", "--score", "1.5"], "expected a number in [0, 1]"),
        (["calibrate", "--run", "r", "--snapshot-every", "-2"], "expected an integer >= 0"),
        (["predict", "--run", "r", "--T", "nan"], "expected a finite number"),
        (["synth", "--out", "d", "--seed", "-1"], "expected an integer >= 0"),
        (["synth", "--out", "d", "--train-images", "1000000000000"], "expected an integer <= 10000000"),
        (["synth", "--out", "d", "--seed", "4294967296"], "expected an integer <= 4294967295"),
        (["calibrate", "--run", "r", "--steps", "1000000000000"], "expected an integer <= 1000000"),
        (["calibrate", "--run", "r", "--seed", "18446744073709551616"], "expected an integer <= 4294967295"),
        (["demo", "--seed", "4294967296"], "expected an integer <= 4294967295"),
        (["predict", "--run", "r", "--batch-size", "1000000000"], "expected an integer <= 65536"),
    ],
)
def test_out_of_range_flags_stop_at_argparse(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_train_resume_refuses_settings_that_differ_from_the_run(trained_run, tmp_path, capsys):
    """A resumed run keeps its settings: a different override or config is an error, not ignored."""
    assert main(["train", "--out", str(trained_run), "--resume", "train.base_lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simcal: error: (command line): train.base_lr: differs from the resumed run")
    assert "train.base_lr 0.5 (run: 0.001)" in err
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  max_iter: 7\n  steps: []\n")
    assert main(["train", "--config", str(other), "--out", str(trained_run), "--resume"]) == 2
    assert f"simcal: error: {other}: " in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "train.seed=1"]) == 2
    assert "not a simcal run directory (no config.yaml)" in capsys.readouterr().err
