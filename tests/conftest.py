"""Shared fixtures: tiny hand-made COCO/LVIS datasets written to tmp files, and a tiny synthetic
dataset, training config and trained run for the engine and report tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml


def tiny_lvis() -> dict[str, Any]:
    """Two images, three categories, LVIS fields; small enough to reason about by hand."""
    return {
        "images": [
            {
                "id": 1,
                "width": 100,
                "height": 80,
                "file_name": "a.png",
                "neg_category_ids": [3],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 2,
                "width": 100,
                "height": 80,
                "file_name": "b.png",
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [2],
            },
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 20, 20],
                "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]],
                "area": 400,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [50, 40, 30, 20],
                "segmentation": [[50, 40, 80, 40, 80, 60, 50, 60]],
                "area": 600,
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 2,
                "bbox": [5, 5, 40, 40],
                "segmentation": [[5, 5, 45, 5, 45, 45, 5, 45]],
                "area": 1600,
                "iscrowd": 0,
            },
        ],
        "categories": [
            {"id": 1, "name": "one", "frequency": "r", "instance_count": 3, "image_count": 3},
            {"id": 2, "name": "two", "frequency": "c", "instance_count": 50, "image_count": 40},
            {"id": 3, "name": "three", "frequency": "f", "instance_count": 5000, "image_count": 900},
        ],
    }


@pytest.fixture
def write_json(tmp_path: Path):
    """Write an object as json under tmp_path and return the path."""

    def _write(name: str, obj: Any) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
        return path

    return _write


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _sigint_as_a_terminal_gives_it():
    """Started as a script's background job, pytest (and every process it starts) ignores SIGINT;
    the signal tests need it as a terminal delivers it, so the suite runs the same either way."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


def data_section(data: Path) -> dict:
    """The ``data`` config section pointing at a ``simcal synth`` folder (no loader workers)."""
    return {
        "train_json": str(data / "train.json"),
        "train_images": str(data / "images"),
        "val_json": str(data / "val.json"),
        "val_images": str(data / "images"),
        "num_workers": 0,
    }


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time (but the run's lock file, which
    a command refused before it writes anything still takes: :func:`simcal.io.run_lock`)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name != ".simcal.lock"
    }


def _read_only(root: Path, name: str):
    """Yield ``root``; afterwards fail if any test wrote into it (session fixtures are shared)."""
    before = _tree(root)
    yield root
    after = _tree(root)
    changed = sorted(set(before) ^ set(after) | {k for k in before.keys() & after.keys() if before[k] != after[k]})
    assert not changed, f"a test wrote into the session-scoped {name} ({changed[:5]}): copy it with copy_run first"


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of run directory ``src`` at ``dst`` (the one way tests get a run they may change)."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from simcal.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(out, classes=6, train_images=24, val_images=20, size=64, seed=0, progress=False)
    yield from _read_only(out, "tiny_data")


def tiny_config_dict(data: Path, **train_overrides) -> dict:
    """The config of :func:`tiny_config` (synthetic_cpu shrunk to 64 px, 6 iterations) as a dict."""
    cfg = {
        "_base_": str(REPO / "configs" / "synthetic_cpu.yaml"),
        "data": data_section(data),
        "model": {"min_size": 64, "max_size": 64, "box_batch_size_per_image": 32},
        "train": {
            "batch_size": 2,
            "max_iter": 6,
            "steps": [4],
            "warmup_iters": 2,
            "checkpoint_period": 2,
            "log_period": 2,
            "threads": 1,
            **train_overrides,
        },
    }
    budget = cfg["train"]["max_iter"]
    if budget is not None and "steps" not in train_overrides:
        cfg["train"]["steps"] = [s for s in cfg["train"]["steps"] if s < budget]  # inside the schedule
    return cfg


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """Write a config (synthetic_cpu preset shrunk to 64 px, 6 iterations) and return its path."""

    def make(**train_overrides) -> Path:
        path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, **train_overrides)))
        return path

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_data):
    """A tiny trained run, shared by the whole session: read it, or copy it with :func:`copy_run`."""
    from simcal.config import load_config
    from simcal.engine.train import train

    tmp = tmp_path_factory.mktemp("run")
    cfg = {
        "_base_": str(REPO / "configs" / "synthetic_cpu.yaml"),
        "data": data_section(tiny_data),
        "model": {"min_size": 64, "max_size": 64},
        "train": {"batch_size": 2, "max_iter": 3, "warmup_iters": 1, "steps": [], "threads": 1},
        "calibration": {"steps": 6, "classes_per_batch": 4, "checkpoint_period": 3, "log_period": 2},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(tmp / "cfg.yaml"), tmp / "run", progress=False)
    yield from _read_only(tmp / "run", "trained_run")


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the trained run, for a test that calibrates, predicts or analyses it."""
    return copy_run(trained_run, tmp_path / "run")


@pytest.fixture(scope="module")
def calibrated_run(trained_run, tmp_path_factory):
    """A copy of the trained run (one per test module), calibrated with snapshots every 3 steps."""
    from simcal.engine.calibrate import calibrate

    run = copy_run(trained_run, tmp_path_factory.mktemp("cal") / "run")
    calibrate(run, snapshot_every=3, progress=False)
    return run


def check_ap_of_classes(metrics: dict[str, Any]) -> None:
    """A metrics json's AP and APr/c/f are the means of its classes' APs (the classes the engine
    could score), an exact relation that holds whatever the detections were."""
    import math

    rows = [r for r in metrics["per_class"] if r["AP"] is not None]
    assert rows, "no class was scored"
    assert math.isclose(metrics["AP"], sum(r["AP"] for r in rows) / len(rows), rel_tol=1e-9, abs_tol=1e-12)
    for g in "rcf":
        group = [r["AP"] for r in rows if r["frequency"] == g]
        if group:
            assert math.isclose(metrics[f"AP{g}"], sum(group) / len(group), rel_tol=1e-9, abs_tol=1e-12)
        else:
            assert metrics[f"AP{g}"] is None


#: fixtures that train a detector (or copy one trained run per test): a test using one is `slow`
TRAINING_FIXTURES = {"trained_run", "run", "calibrated_run", "tiny_config", "tiny_budget", "data_copy", "cascade_run"}


def pytest_collection_modifyitems(config, items):
    """`make test-fast` (``-m "not slow"``) leaves out the tests that train, import or run a detector
    end to end: those using :data:`TRAINING_FIXTURES`, and those marked ``slow`` by hand (processes
    killed in a loop, torchrun, the official API's parity on large fixtures, the detectron2 stages)."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
