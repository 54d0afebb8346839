"""A tiny synthetic dataset and a tiny training config shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def data_section(data: Path) -> dict:
    """The ``data`` config section pointing at a ``simcal synth`` folder (no loader workers)."""
    return {
        "train_json": str(data / "train.json"),
        "train_images": str(data / "images"),
        "val_json": str(data / "val.json"),
        "val_images": str(data / "images"),
        "num_workers": 0,
    }


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from simcal.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(out, classes=6, train_images=24, val_images=20, size=64, seed=0, progress=False)
    return out


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """Write a config (synthetic_cpu preset shrunk to 64 px, 6 iterations) and return its path."""

    def make(**train_overrides) -> Path:
        cfg = {
            "_base_": str(REPO / "configs" / "synthetic_cpu.yaml"),
            "data": data_section(tiny_data),
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
        path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_data):
    import yaml

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
    return tmp / "run"
