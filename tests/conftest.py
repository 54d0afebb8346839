"""Shared fixtures: tiny hand-made COCO/LVIS datasets written to tmp files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


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
