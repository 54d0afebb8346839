"""Bad inputs end in one line: images under worker loaders, runs whose files do not fit, numeric flags."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from simcal import cli
from simcal.cli import main
from tests.conftest import REPO, copy_run, tiny_lvis
from tests.reliability.conftest import one_line, snapshot, temporaries, write_config

torch.set_num_threads(1)


def _break(image: Path, kind: str) -> None:
    if kind == "missing":
        image.unlink()
    elif kind == "corrupt":
        image.write_bytes(b"this is not a png")
    elif kind == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    else:  # "wrong size": a readable image whose size is not the json's
        Image.new("RGB", (40, 30)).save(image)


EXPECTED = {
    "missing": "cannot read image: no such file",
    "corrupt": "cannot read image: cannot identify image file",
    "truncated": "cannot read image",
    "wrong size": "image is 40x30 (width x height) but the json says 64x64",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_bad_training_image_read_by_a_loader_worker_is_its_own_one_line_error(kind, data_copy, tmp_path, capsys):
    """The loader runs one worker process (data.num_workers: 1): the error raised there reaches the
    user as the dataset's InputError (file, field, what is wrong), not as the worker's traceback."""
    train = json.loads((data_copy / "train.json").read_text())
    for info in train["images"]:
        _break(data_copy / "images" / info["file_name"], kind)
    cfg = write_config(tmp_path / "cfg.yaml", data_copy)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err, EXPECTED[kind], "images[id=")
    path = line.split(": ")[2]  # simcal: error: FILE: FIELD: message
    assert path.startswith(str(data_copy / "images" / "train")) and path.endswith(".png")
    assert not (run / "model_final.pth").exists() and not (run / "checkpoint_last.pth").exists()
    assert not temporaries(run)


def test_a_bad_val_image_in_predict_workers_and_through_the_console_script(trained_run, data_copy, tmp_path):
    """predict reads with a worker too; through the installed ``python -m simcal`` there is no traceback."""
    val = json.loads((data_copy / "val.json").read_text())
    for info in val["images"]:
        _break(data_copy / "images" / info["file_name"], "corrupt")
    run = copy_run(trained_run, tmp_path / "run")
    argv = ["predict", "--run", str(run), "--gt", str(data_copy / "val.json"), "--images", str(data_copy / "images")]
    proc = subprocess.run(
        [sys.executable, "-m", "simcal", *argv, "--split", "broken", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SIMCAL_DEBUG": ""},
    )
    assert proc.returncode == 2
    one_line(proc.stderr, "cannot identify image file", str(data_copy / "images"), "images[id=")
    assert not list((run / "predictions").rglob("results.json")) and not temporaries(run)


def _edit_label_map(run: Path, edit) -> None:
    path = run / "label_map.json"
    lm = json.loads(path.read_text())
    edit(lm["categories"])
    path.write_text(json.dumps(lm))


def test_a_label_map_that_does_not_fit_the_weights_or_the_annotations(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    _edit_label_map(run, lambda cats: cats.pop())  # one class fewer than the weights classify
    for argv in (["predict", "--run", str(run)], ["calibrate", "--run", str(run)]):
        assert main([*argv, "--no-progress"]) == 2
        one_line(
            capsys.readouterr().err,
            f"{run / 'model_final.pth'}: roi_heads.box_predictor.cls_score.weight: the weights classify 7 outputs",
            f"label map (from {run / 'label_map.json'}) 6",
        )
    run2 = copy_run(trained_run, tmp_path / "run2")
    _edit_label_map(run2, lambda cats: cats[-1].update(id=99))  # an id the training annotations lack
    assert main(["predict", "--run", str(run2), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "train.json: categories: no category with id 99", "label_map.json")
    assert main(["calibrate", "--run", str(run2), "--no-progress"]) == 2  # the images are read first there
    one_line(capsys.readouterr().err, "train.json: annotations[0].category_id: category id 6 is not", "label_map.json")
    assert not (run / "predictions").exists() and not (run2 / "calibration").exists()


def test_weights_that_are_not_the_runs(trained_run, tmp_path, capsys):
    """--checkpoint on a calibrated head, a bare state dict, a yaml file; a resume checkpoint of
    another architecture: each names the file and what it is."""
    run = copy_run(trained_run, tmp_path / "run")
    head = tmp_path / "head.pth"
    torch.save({"format": "simcal.calibrated_head", "version": 1, "meta": {}, "state_dict": {}}, head)
    bare = tmp_path / "bare.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bare)
    cases = {
        head: "format: a calibrated head, not detector weights: name its calibration with --calibration",
        bare: "model: not simcal detector weights",
        run / "config.yaml": "(checkpoint): cannot read",
        tmp_path / "none.pth": "(file): no such checkpoint",
    }
    for path, message in cases.items():
        assert main(["predict", "--run", str(run), "--checkpoint", str(path), "--no-progress"]) == 2
        one_line(capsys.readouterr().err, f"{path}: {message}")
    state = torch.load(run / "checkpoint_last.pth", weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if "mask_predictor" not in k}
    torch.save(state, run / "checkpoint_last.pth")
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    one_line(err, "checkpoint_last.pth: model: 4 tensors missing and 0 unexpected", "another architecture")


# ---------------------------------------------------------------------------- every numeric flag
NUMERIC = {cli._number, cli._probability, cli._open_unit, cli._numbers}


def _is_numeric(kind: object) -> bool:
    """A checked number type: one of NUMERIC, or a bounded integer of ``cli._int_at_least``."""
    return kind in NUMERIC or getattr(kind, "__qualname__", "").startswith("_int_at_least.")


def _numeric_flags() -> list[tuple[str, str, str | None]]:
    return [
        (c.name, o.flags[0], o.alias)
        for c in cli.COMMANDS
        for o in c.options
        if _is_numeric(o.kwargs.get("type")) and o.flags[0].startswith("--")
    ]


def test_every_numeric_flag_has_a_checked_type():
    """A flag typed plain ``int`` or ``float`` would take -1 or nan unchecked: none is."""
    flags = {(c, f) for c, f, _ in _numeric_flags()}
    assert {("calibrate", "--lr"), ("predict", "--T"), ("report", "--gallery"), ("analyze", "--T")} <= flags
    assert len(flags) >= 20
    plain = [(c.name, o.flags[0]) for c in cli.COMMANDS for o in c.options if o.kwargs.get("type") in (int, float)]
    assert not plain
    for bound in ("0", "1"):  # a confidence level is open at both ends (the engine refuses 0 and 1)
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\)"):
            cli._open_unit(bound)


@pytest.mark.parametrize("value", ["-1", "abc", "nan"])
def test_negative_and_non_numeric_values_of_every_numeric_flag_are_refused(trained_run, value, capsys):
    """No numeric flag of any command accepts -1, a word or nan: argparse refuses what its type
    refuses (its usage block, then one error line naming the flag); a value argparse lets through
    (a negative --lr) is an override of the config and fails its range check in one line."""
    run = str(trained_run)
    needs = {
        "synth": ["--out", "/nonexistent/out"],
        "evaluate": ["--gt", "g.json", "--results", "r.json"],
        "coco-lt": ["--coco", "c.json", "--out", "o.json"],
        "train": ["--out", run],
        "calibrate": ["--run", run],
        "predict": ["--run", run],
        "analyze": ["sweep-T", "--run", run],
        "compare": ["--run", run],
        "report": ["--run", run],
        "demo": [],
    }
    checked = 0
    for command, flag, alias in _numeric_flags():
        argv = [command, *needs[command], flag, value]
        try:
            cli.build_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
            err = capsys.readouterr().err
            assert f"error: argument {flag}" in err.strip().splitlines()[-1] and "Traceback" not in err
            checked += 1
            continue
        # only config aliases may pass argparse (a finite number): the config's check refuses it
        assert alias is not None and value == "-1", (command, flag, value)
        assert main(argv) == 2
        one_line(capsys.readouterr().err, f"(command line): {alias}: must be")
        checked += 1
    assert checked == len(_numeric_flags())


def test_debug_shows_the_traceback_behind_a_one_line_error(tmp_path, monkeypatch, capsys):
    from simcal.errors import InputError

    missing = ["predict", "--run", str(tmp_path / "none")]
    assert main(missing) == 2
    one_line(capsys.readouterr().err, "not a simcal run directory")
    with pytest.raises(InputError, match="not a simcal run directory"):
        main(["--debug", *missing])
    monkeypatch.setenv("SIMCAL_DEBUG", "1")
    with pytest.raises(InputError):
        main(missing)
    monkeypatch.setenv("SIMCAL_DEBUG", "0")
    assert main(missing) == 2


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user-caused errors become one line: a bug (here a ZeroDivisionError) is raised as is."""

    def buggy(args: argparse.Namespace) -> int:
        return 1 // 0

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_handler(parser(), "stats", buggy))
    with pytest.raises(ZeroDivisionError):
        main(["stats", "x.json"])


def _with_handler(parser: argparse.ArgumentParser, name: str, handler) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices[name].set_defaults(func=handler)
    return parser


def test_more_bad_inputs_found_by_trying(trained_run, tmp_path, capsys):
    """Cases found while trying the commands as a new user: each one line, naming the file."""
    run = copy_run(trained_run, tmp_path / "run")
    assert main(["predict", "--run", str(run), "--head", "cal", "--calibration", "nope"]) == 2
    one_line(capsys.readouterr().err, "(calibration): no finished calibration 'nope'; there is none")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((run / "model_final.pth").read_bytes()[:100_000])
    assert main(["predict", "--run", str(run), "--checkpoint", str(cut)]) == 2
    one_line(capsys.readouterr().err, f"{cut}: (checkpoint): cannot read (truncated, or not a torch checkpoint)")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(tiny_lvis()))
    (tmp_path / "results.json").write_text("[]")
    folder = tmp_path / "folder"
    folder.mkdir()
    for flag in ("--out", "--per-class"):
        argv = ["evaluate", "--gt", str(gt), "--results", str(tmp_path / "results.json"), "--iou", "bbox"]
        assert main([*argv, flag, str(folder)]) == 2
        one_line(capsys.readouterr().err, f"{folder}: (file system): is a directory, a file was expected")
    assert main(["predict", "--run", str(run), "--gt", str(gt), "--images", str(tmp_path)]) == 2  # under "val"
    one_line(capsys.readouterr().err, "is not the run's val annotations", "--split NAME")
    # a log line cut short (the disk filled mid-line) is dropped on resume, not a traceback
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"iteration": 3, "lo')
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    for line in (run / "train_log.jsonl").read_text().splitlines():
        json.loads(line)


# ---------------------------------------------------------------------------- more bad inputs, tried
def test_a_json_that_is_no_file_or_nested_too_deeply(trained_run, tmp_path, capsys):
    """A folder, a device or a json nested past Python's recursion limit, where a json, a config or
    a checkpoint is read: one line saying what is there (it is not "no such file")."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = {
        deep: "(json): nested too deeply to read",
        folder: "(file): is a directory, a file was expected",
        Path(os.devnull): "(file): not a regular file",
    }
    for path, says in cases.items():
        assert main(["stats", str(path)]) == 2
        one_line(capsys.readouterr().err, f"{path}: {says}")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(tiny_lvis()))
    assert main(["evaluate", "--gt", str(gt), "--results", str(deep), "--iou", "bbox"]) == 2  # streamed
    one_line(capsys.readouterr().err, f"{deep}: (json): nested too deeply to read")
    assert main(["train", "--config", str(folder), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{folder}: (file): is a directory, a file was expected")
    run = copy_run(trained_run, tmp_path / "run")
    assert main(["predict", "--run", str(run), "--checkpoint", str(folder), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{folder}: (file): is a directory, a file was expected")
    assert not (run / "predictions").exists()


def test_an_rle_whose_counts_do_not_fit_its_image_in_a_loader_worker(data_copy, tmp_path, capsys):
    """RLE counts that pycocotools cannot decode (garbage, or more pixels than the image has) raised
    pycocotools' ValueError where the mask is decoded, in a loader worker. The annotations' RLEs are
    now decoded when the json is read, so this is one line naming the annotation before training
    starts; the worker's own guard (the dataset's mask decoding) is checked directly below."""
    path = data_copy / "train.json"
    train = json.loads(path.read_text())
    for i, ann in enumerate(train["annotations"]):
        counts = "garbage!!~~" if i % 2 else [5000, 10]
        ann["segmentation"] = {"size": [64, 64], "counts": counts}
    path.write_text(json.dumps(train))
    cfg = write_config(tmp_path / "cfg.yaml", data_copy)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{path}: annotations[0].segmentation.counts: the run lengths sum to 5010")
    assert not (run / "checkpoint_last.pth").exists() and not temporaries(run)
    # the dataset's guard, for annotations that reach it unvalidated: one error naming the annotation
    from simcal.data.dataset import DetectionDataset, LabelMap
    from simcal.errors import InputError

    ds = DetectionDataset(train, data_copy / "images", label_map=LabelMap.from_dataset(train), source=str(path))
    with pytest.raises(InputError, match=r"annotations\[id=.*\]\.segmentation\.counts: not a valid RLE of image"):
        for i in range(len(ds)):
            ds[i]


def test_a_training_set_with_nothing_to_train_on(data_copy, tmp_path, capsys):
    """No images, no annotations, only crowd regions, only boxes under 1 px (which the dataset
    drops): refused before a run directory is made (an empty image list was a sampler traceback)."""
    path = data_copy / "train.json"
    train = json.loads(path.read_text())

    def no_images(d):
        d["images"], d["annotations"] = [], []

    edits = {
        "images: no images: nothing to train on": no_images,
        "annotations: no annotation outside crowd regions": lambda d: d.update(annotations=[]),
        "annotations: no annotation outside crowd": lambda d: [a.update(iscrowd=1) for a in d["annotations"]],
        "annotations: no annotation outside crowd regions with a box": lambda d: [
            a.update(bbox=[1, 1, 0.5, 3]) for a in d["annotations"]
        ],
    }
    cfg = write_config(tmp_path / "cfg.yaml", data_copy)
    for says, edit in edits.items():
        broken = json.loads(json.dumps(train))
        edit(broken)
        path.write_text(json.dumps(broken))
        assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        one_line(capsys.readouterr().err, f"{path}: {says}")
        assert not (tmp_path / "run").exists()


def test_a_16_bit_greyscale_image_is_read_by_its_high_byte(tmp_path):
    """PIL's convert("RGB") clips a 16-bit greyscale PNG at 255: the image was silently white."""
    from simcal.data.dataset import DetectionDataset

    grey = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    data = tiny_lvis()
    data["images"] = [{**data["images"][0], "width": 40, "height": 30}]
    data["annotations"] = []
    image = DetectionDataset(data, tmp_path).load_image(0)
    expected = torch.from_numpy((grey >> 8).astype(np.float32) / 255.0)
    assert image.shape == (3, 30, 40) and torch.allclose(image, expected.expand(3, -1, -1))


def test_a_config_that_is_not_utf8_or_gives_a_key_twice(trained_run, tmp_path, capsys):
    """A second ``train:`` section silently replaced the first (PyYAML keeps the last key); a
    config that is not text was a UnicodeDecodeError traceback, in --config and in a run."""
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"_base_: {REPO / 'configs' / 'synthetic_cpu.yaml'}\ntrain:\n  max_iter: 3\ntrain:\n  steps: []\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    cases = {twice: "(yaml): key 'train' given twice in one mapping", binary: "(yaml): not UTF-8 text"}
    for path, says in cases.items():
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        one_line(capsys.readouterr().err, f"{path}: {says}")
    assert not (tmp_path / "out").exists()
    run = copy_run(trained_run, tmp_path / "run")
    (run / "config.yaml").write_bytes(b"\xff\xfe")
    assert main(["predict", "--run", str(run), "--no-progress"]) == 2
    one_line(capsys.readouterr().err, f"{run / 'config.yaml'}: (yaml): not UTF-8 text")


def test_calibration_and_split_names_stay_inside_the_run(trained_run, tiny_data, tmp_path, capsys):
    """--name ../../x wrote a calibration outside the run, --name . into RUN/calibration itself,
    --split ../../x predictions outside the run: a name is one plain folder name."""
    run = copy_run(trained_run, tmp_path / "a" / "run")
    before = snapshot(run)
    for name in ("../../evil", ".", "a/b", ".."):
        assert main(["calibrate", "--run", str(run), "--name", name, "--no-progress"]) == 2
        one_line(capsys.readouterr().err, f"--name: calibration: {name!r} is not a plain folder name")
    gt = ["--gt", str(tiny_data / "val.json"), "--images", str(tiny_data / "images")]
    assert main(["predict", "--run", str(run), "--split", "../../evil", *gt, "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "--split: split: '../../evil' is not a plain folder name")
    assert main(["analyze", "dynamics", "--run", str(run), "--calibration", "../x", "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "--calibration: calibration: '../x' is not a plain folder name")
    assert snapshot(run) == before and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["run"]


def test_an_rle_whose_size_is_not_its_images(tmp_path, capsys):
    """pycocotools compares masks of different sizes without a word (AP silently wrong): the
    ground truth's and the results' RLE sizes are checked against the image's."""
    from pycocotools import mask as mask_utils

    small = mask_utils.encode(np.asfortranarray(np.ones((40, 50), dtype=np.uint8)))
    rle = {"size": [40, 50], "counts": small["counts"].decode("ascii")}
    gt = tiny_lvis()
    gt["annotations"][0]["segmentation"] = rle
    bad_gt, good_gt = tmp_path / "bad_gt.json", tmp_path / "gt.json"
    bad_gt.write_text(json.dumps(gt))
    good_gt.write_text(json.dumps(tiny_lvis()))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": rle}]))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["evaluate", "--gt", str(bad_gt), "--results", str(empty), "--iou", "segm"]) == 2
    says = "RLE size [40, 50] differs from its image's [height, width] [80, 100]"
    one_line(capsys.readouterr().err, f"{bad_gt}: annotations[0].segmentation.size: {says}")
    assert main(["evaluate", "--gt", str(good_gt), "--results", str(results), "--iou", "segm"]) == 2
    one_line(capsys.readouterr().err, f"{results}: [0].segmentation.size: {says}")
    # the ground truth's RLE counts are decoded: garbage of the right size, or run lengths that do
    # not add up to its pixels, would have been scored silently
    for counts, says in (("garbage!!~~", "not a valid compressed RLE of 80x100 pixels"), ([10, 20], "sum to 30")):
        gt = tiny_lvis()
        gt["annotations"][0]["segmentation"] = {"size": [80, 100], "counts": counts}
        bad_gt.write_text(json.dumps(gt))
        assert main(["evaluate", "--gt", str(bad_gt), "--results", str(empty), "--iou", "segm"]) == 2
        err = capsys.readouterr().err
        one_line(err, f"{bad_gt}: annotations[0].segmentation.counts: ")
        assert says in err


def test_report_on_damaged_run_files(calibrated_run, data_copy, tmp_path, capsys):
    """A log line cut short (the disk filled) or an empty log is dropped as resume drops it; a
    damaged results file or an unreadable gallery image is one line naming it (all were tracebacks)."""
    run = copy_run(calibrated_run, tmp_path / "run")
    argv = ["predict", "--run", str(run), "--head", "orig,cal,dual", "--max-images", "2", "--no-progress"]
    assert main(argv) == 0
    report = ["report", "--run", str(run), "--split", "val-first2", "--gallery", "2"]
    with open(run / "calibration" / "3fc_ft" / "calibration_log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"iteration": 4, "lo')
    assert main(report) == 0
    (run / "train_log.jsonl").write_text("")
    assert main(report) == 0
    capsys.readouterr()
    dual = run / "predictions" / "val-first2" / "dual" / "results.json"
    kept = dual.read_text()
    dual.write_text('[{"image_id": 1')
    assert main(report) == 2
    one_line(capsys.readouterr().err, f"{dual}: (json): invalid JSON")
    dual.write_text(kept)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["val_images"] = str(data_copy / "images")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for image in (data_copy / "images" / "val").iterdir():
        image.write_bytes(b"not a png")
    assert main(report) == 2
    err = capsys.readouterr().err
    one_line(err, str(data_copy / "images" / "val"), ".file_name: cannot read image: cannot identify")


def test_synth_does_not_replace_a_dataset(tmp_path, capsys):
    """synth into a folder holding a dataset replaced its json and images in place (a run trained
    on them silently got other data): refused, nothing changed."""
    argv = ["synth", "--out", str(tmp_path / "set"), "--classes", "3", "--train-images", "10", "--val-images", "10"]
    assert main([*argv, "--size", "64"]) == 0
    before = snapshot(tmp_path / "set")
    capsys.readouterr()
    assert main([*argv, "--size", "96", "--seed", "1"]) == 2
    one_line(capsys.readouterr().err, f"{tmp_path / 'set'}: train.json: already holds a dataset: choose another --out")
    assert snapshot(tmp_path / "set") == before


@pytest.mark.parametrize("value", ["false", "no", "OFF"])
def test_debug_variable_values_that_mean_off(value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIMCAL_DEBUG", value)
    assert main(["predict", "--run", str(tmp_path / "none")]) == 2
    one_line(capsys.readouterr().err, "not a simcal run directory")


def test_an_override_under_a_value_of_the_config_file_is_the_command_lines(tiny_data, tmp_path, capsys):
    """``train.max_iter.x=3`` replaces the file's max_iter by a mapping: the error was blamed on the file."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "train.max_iter.x=3"]) == 2
    line = one_line(capsys.readouterr().err, "simcal: error: (command line): train.max_iter: expected an integer")
    assert str(cfg) not in line and not (tmp_path / "run").exists()
