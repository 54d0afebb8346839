"""Category id <-> contiguous label map: background is label 0, categories are ``1..C``.

Torch-free: the run directory stores it (``label_map.json``) and the report reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from simcal.errors import InputError
from simcal.io import read_json, write_json

LABEL_MAP_FORMAT = "simcal-label-map"
LABEL_MAP_VERSION = 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class LabelMap:
    """Category id <-> contiguous label map: background is 0, categories are ``1..C``.

    Labels follow increasing category id, so the same category set always gives the same map
    whatever the order of ``categories`` in the json.
    """

    def __init__(self, category_ids: Sequence[int], names: Sequence[str] | None = None) -> None:
        """Build the map from category ids (any order) and optional names in the same order.

        Raises:
            ValueError: duplicate or non-integer ids, or ``names`` of a different length.
        """
        ids = list(category_ids)
        if not all(_is_int(c) for c in ids):
            raise ValueError(f"category ids must be integers, got {ids[:10]}")
        if names is None:
            names = [str(c) for c in ids]
        names = list(names)
        if len(names) != len(ids):
            raise ValueError(f"{len(ids)} category ids but {len(names)} names")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate category ids")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self._ids: list[int] = [ids[i] for i in order]
        self._names: list[str] = [str(names[i]) for i in order]
        self._label_of: dict[int, int] = {c: i + 1 for i, c in enumerate(self._ids)}

    @classmethod
    def from_dataset(cls, dataset: dict[str, Any]) -> LabelMap:
        """The map of every category in ``dataset["categories"]`` (not only the annotated ones)."""
        cats = dataset["categories"]
        return cls([c["id"] for c in cats], [c.get("name", str(c["id"])) for c in cats])

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes (the model has ``C + 1`` outputs with background)."""
        return len(self._ids)

    @property
    def category_ids(self) -> list[int]:
        """Category ids in label order: ``category_ids[label - 1]`` is the id of ``label``."""
        return list(self._ids)

    @property
    def names(self) -> list[str]:
        """Category names in label order."""
        return list(self._names)

    def __contains__(self, cat_id: object) -> bool:
        return cat_id in self._label_of

    def to_label(self, cat_id: int) -> int:
        """Contiguous label (``1..C``) of a category id; ``KeyError`` for an unknown id."""
        try:
            return self._label_of[cat_id]
        except KeyError:
            raise KeyError(f"category id {cat_id!r} is not in the label map") from None

    def to_category(self, label: int) -> int:
        """Category id of a label ``1..C``; ``KeyError`` for background (0) or out of range."""
        label = int(label)
        if not 1 <= label <= len(self._ids):
            raise KeyError(f"label {label} is not a foreground label 1..{len(self._ids)}")
        return self._ids[label - 1]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written by :meth:`save`."""
        return {
            "format": LABEL_MAP_FORMAT,
            "version": LABEL_MAP_VERSION,
            "background": 0,
            "categories": [
                {"label": i + 1, "id": c, "name": n}
                for i, (c, n) in enumerate(zip(self._ids, self._names, strict=True))
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the map (ids, labels and names) as JSON, atomically."""
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LabelMap:
        """Read a map written by :meth:`save`; :class:`InputError` on a malformed file."""
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != LABEL_MAP_FORMAT:
            raise InputError(path, "format", f"not a simcal label map (expected {LABEL_MAP_FORMAT!r})")
        if data.get("version") != LABEL_MAP_VERSION:
            raise InputError(path, "version", f"unsupported version {data.get('version')!r}")
        cats = data.get("categories")
        if not isinstance(cats, list):
            raise InputError(path, "categories", "expected a list")
        ids: list[int] = []
        names: list[str] = []
        for i, cat in enumerate(cats):
            field = f"categories[{i}]"
            if not isinstance(cat, dict):
                raise InputError(path, field, "expected an object")
            if not _is_int(cat.get("id")):
                raise InputError(path, f"{field}.id", f"expected an integer, got {cat.get('id')!r}")
            if not isinstance(cat.get("name"), str):
                raise InputError(path, f"{field}.name", "expected a string")
            if cat.get("label") != i + 1:
                raise InputError(path, f"{field}.label", f"expected {i + 1}, got {cat.get('label')!r}")
            if ids and cat["id"] <= ids[-1]:
                raise InputError(path, f"{field}.id", "category ids must be strictly increasing")
            ids.append(cat["id"])
            names.append(cat["name"])
        return cls(ids, names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        return self._ids == other._ids and self._names == other._names

    def __hash__(self) -> int:
        return hash((tuple(self._ids), tuple(self._names)))

    def __repr__(self) -> str:
        return f"LabelMap(num_classes={self.num_classes})"
