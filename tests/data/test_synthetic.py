"""The synthetic long-tail set: files, LVIS fields, the long tail, masks, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from simcal.data.annotations import validate_dataset
from simcal.data.stats import count_instances, frequency_of
from simcal.data.synthetic import (
    DEFAULT_CLASSES,
    DEFAULT_TRAIN_IMAGES,
    DEFAULT_VAL_IMAGES,
    MAX_OBJECTS,
    SPLITS,
    VAL_FLOOR,
    category_names,
    generate_synthetic,
    plan_balanced_counts,
    plan_counts,
    plan_val_counts,
)

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = {"classes": 16, "train_images": 150, "val_images": 100, "size": 64, "seed": 0}


def _load(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / f"{split}.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth") / "set"
    summary = generate_synthetic(out, progress=False, **SMALL)
    return out, summary


@pytest.fixture(scope="module")
def data(small: tuple[Path, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {split: _load(small[0], split) for split in SPLITS}


def _ranking(counts: list[int]) -> list[int]:
    """Class indices from most to least frequent (ties by index)."""
    return sorted(range(len(counts)), key=lambda k: (-counts[k], k))


def _per_class(dataset: dict[str, Any]) -> list[int]:
    counts = count_instances(dataset)
    return [counts[k + 1][0] for k in range(len(dataset["categories"]))]


# ---------------------------------------------------------------------------------------------
# files and format


def test_files_exist_and_validate(small, data):
    out, summary = small
    for split in SPLITS:
        dataset = data[split]
        validate_dataset(dataset, out / f"{split}.json")
        assert summary["splits"][split]["json"] == str(out / f"{split}.json")
        assert summary["splits"][split]["images"] == len(dataset["images"])
        assert summary["splits"][split]["instances"] == len(dataset["annotations"])
        assert len({img["id"] for img in dataset["images"]}) == len(dataset["images"])
        assert len({a["id"] for a in dataset["annotations"]}) == len(dataset["annotations"])
        for img in dataset["images"][:5] + dataset["images"][-5:]:
            assert img["file_name"].startswith(f"{split}/") and img["file_name"].endswith(".png")
            with Image.open(out / "images" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (64, 64)
                assert im.mode == "RGB" and im.format == "PNG"
        files = sorted(p.name for p in (out / "images" / split).iterdir())
        assert files == sorted(Path(img["file_name"]).name for img in dataset["images"])
    assert len(data["train"]["images"]) == SMALL["train_images"]
    assert len(data["val"]["images"]) == len(data["val_balanced"]["images"]) == SMALL["val_images"]
    assert summary["images_dir"] == str(out / "images")


def test_objects_per_image_between_1_and_max(data):
    for dataset in data.values():
        per_image = {img["id"]: 0 for img in dataset["images"]}
        for ann in dataset["annotations"]:
            per_image[ann["image_id"]] += 1
        assert 1 <= min(per_image.values()) and max(per_image.values()) <= MAX_OBJECTS


def test_categories_carry_train_counts_and_frequency(small, data):
    _, summary = small
    train_counts = count_instances(data["train"])
    cats = data["train"]["categories"]
    assert [c["id"] for c in cats] == list(range(1, SMALL["classes"] + 1))
    assert [c["name"] for c in cats] == category_names(SMALL["classes"])
    assert len({c["name"] for c in cats}) == len(cats)
    for cat in cats:
        assert (cat["instance_count"], cat["image_count"]) == train_counts[cat["id"]]
        assert cat["frequency"] == frequency_of(cat["image_count"])
        assert cat["synonyms"] == [] and cat["def"] == ""
    # val jsons carry the TRAIN statistics (LVIS convention)
    assert data["val"]["categories"] == cats == data["val_balanced"]["categories"]
    groups = [c["frequency"] for c in cats]
    assert summary["frequency"] == {g: groups.count(g) for g in "rcf"}
    inst = [c["instance_count"] for c in cats]
    assert summary["train_instances_per_class"] == {"min": min(inst), "max": max(inst)}


def test_category_names_readable_and_unique():
    names = category_names(80)
    assert names[:3] == ["hue00_square", "hue00_circle", "hue00_triangle"]
    assert names[-1] == "hue09_cross" and len(set(names)) == 80


def test_neg_category_ids_are_exactly_the_absent_categories(data):
    for dataset in data.values():
        all_ids = {c["id"] for c in dataset["categories"]}
        present: dict[int, set[int]] = {img["id"]: set() for img in dataset["images"]}
        for ann in dataset["annotations"]:
            present[ann["image_id"]].add(ann["category_id"])
        for img in dataset["images"]:
            assert img["neg_category_ids"] == sorted(all_ids - present[img["id"]])
            assert img["not_exhaustive_category_ids"] == []


# ---------------------------------------------------------------------------------------------
# the long tail


def test_train_counts_are_the_plan_and_a_steep_power_law(data):
    counts = _per_class(data["train"])
    plan = plan_counts(SMALL["classes"], SMALL["train_images"], SMALL["seed"])
    assert counts == plan
    ranked = [counts[k] for k in _ranking(plan)]
    assert all(a >= b for a, b in zip(ranked, ranked[1:], strict=False))
    assert min(counts) == 1 and max(counts) / min(counts) >= 100
    assert sum(counts) == round(3.5 * SMALL["train_images"])


def test_val_long_tailed_with_floor_and_val_balanced_even(data):
    train = _per_class(data["train"])
    val = _per_class(data["val"])
    assert min(val) >= VAL_FLOOR
    assert val == plan_val_counts(train, SMALL["val_images"])
    ranked = [val[k] for k in _ranking(train)]
    assert all(a >= b for a, b in zip(ranked, ranked[1:], strict=False))
    assert ranked[0] > VAL_FLOOR  # the head stands above the floor
    balanced = _per_class(data["val_balanced"])
    assert min(balanced) >= VAL_FLOOR and max(balanced) - min(balanced) <= 1


def test_plan_at_defaults_spans_the_lvis_groups():
    counts = plan_counts(DEFAULT_CLASSES, DEFAULT_TRAIN_IMAGES, 0)
    assert len(counts) == DEFAULT_CLASSES
    assert min(counts) <= 2 and max(counts) > 1000
    groups = [frequency_of(n) for n in counts]
    assert all(groups.count(g) >= 10 for g in "rcf"), groups
    assert sum(counts) == round(3.5 * DEFAULT_TRAIN_IMAGES)
    val = plan_val_counts(counts, DEFAULT_VAL_IMAGES)
    assert min(val) >= VAL_FLOOR and sum(val) == round(3.5 * DEFAULT_VAL_IMAGES)
    assert min(plan_balanced_counts(DEFAULT_CLASSES, DEFAULT_VAL_IMAGES)) >= VAL_FLOOR


def test_plan_ranking_follows_seed():
    a, b = plan_counts(80, 3000, 0), plan_counts(80, 3000, 1)
    assert a == plan_counts(80, 3000, 0)
    assert a != b and sorted(a) == sorted(b)


def test_plan_with_more_classes_than_instances_gives_one_each():
    assert plan_counts(10, 2, 0) == [1] * 10


# ---------------------------------------------------------------------------------------------
# masks


def test_masks_agree_with_boxes_areas_and_do_not_overlap(data):
    for dataset in data.values():
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in dataset["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for img in dataset["images"]:
            h, w = img["height"], img["width"]
            cover = np.zeros((h, w), dtype=np.int32)
            for ann in by_image[img["id"]]:
                (poly,) = ann["segmentation"]
                xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
                assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= w and ys.max() <= h
                rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
                mask = mask_utils.decode(rle)
                assert ann["area"] == float(mask.sum()) > 0
                ys_m, xs_m = np.nonzero(mask)
                x0, y0 = xs_m.min(), ys_m.min()
                box = [x0, y0, xs_m.max() + 1 - x0, ys_m.max() + 1 - y0]
                np.testing.assert_allclose(ann["bbox"], box, atol=1.0)
                # and within 2 px of the polygon's own extent (sharp tips may cover no pixel)
                np.testing.assert_allclose(ann["bbox"][:2], [xs.min(), ys.min()], atol=2.0)
                cover += mask
            assert cover.max() <= 1  # objects never overlap: each polygon is its exact mask


def test_pixels_inside_masks_are_painted(small, data):
    out, _ = small
    dataset = data["train"]
    img = dataset["images"][0]
    pixels = np.asarray(Image.open(out / "images" / img["file_name"]), dtype=np.float64)
    for ann in dataset["annotations"]:
        if ann["image_id"] != img["id"]:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 64, 64))
        mask = mask_utils.decode(rle).astype(bool)
        inside = pixels[mask].mean(axis=0)
        ring = pixels[~mask].mean(axis=0)
        # a flat saturated fill plus noise: the inside is more uniform than the whole image
        assert pixels[mask].std(axis=0).mean() < 20
        assert not np.allclose(inside, ring, atol=1.0)


def test_rle_mode_gives_rle_dicts_with_the_same_geometry(tmp_path, small, data):
    out, _ = small
    summary = generate_synthetic(tmp_path / "rle", progress=False, mask_format="rle", **SMALL)
    assert summary["mask_format"] == "rle"
    for split in SPLITS:
        rle_data = _load(tmp_path / "rle", split)
        validate_dataset(rle_data, split)
        assert len(rle_data["annotations"]) == len(data[split]["annotations"])
        for ann, ref in zip(rle_data["annotations"], data[split]["annotations"], strict=True):
            seg = ann["segmentation"]
            assert isinstance(seg, dict) and isinstance(seg["counts"], str)
            assert seg["size"] == [64, 64]
            assert ann["bbox"] == ref["bbox"] and ann["area"] == ref["area"]
            assert float(mask_utils.area(seg)) == ann["area"]
        name = Path(split) / "000001.png"
        rle_png = Path(summary["images_dir"]) / name
        assert rle_png.read_bytes() == (out / "images" / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_bytes_other_seed_other_data(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    generate_synthetic(again, progress=False, **SMALL)
    for split in SPLITS:
        assert (again / f"{split}.json").read_bytes() == (out / f"{split}.json").read_bytes()
        for i in (1, 2, 17, 50, 100):
            name = Path("images") / split / f"{i:06d}.png"
            assert (again / name).read_bytes() == (out / name).read_bytes()

    other = tmp_path / "other"
    generate_synthetic(other, progress=False, **{**SMALL, "seed": 1})
    for split in SPLITS:
        assert (other / f"{split}.json").read_bytes() != (out / f"{split}.json").read_bytes()
        name = Path("images") / split / "000001.png"
        assert (other / name).read_bytes() != (out / name).read_bytes()
    assert _per_class(_load(other, "train")) != _per_class(_load(out, "train"))


# ---------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes": 1}, "classes must be >= 2"),
        ({"classes": 2.5}, "classes must be an integer"),
        ({"classes": True}, "classes must be an integer"),
        ({"train_images": 0}, "train_images must be >= 1"),
        ({"classes": 16, "train_images": 2}, "train_images=2 is too few"),
        ({"val_images": 0}, "val_images must be >= 1"),
        ({"classes": 16, "val_images": 53}, "val_images=53 is too few"),
        ({"size": 31}, "size must be >= 32"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"mask_format": "bitmap"}, "mask_format must be one of polygon, rle"),
    ],
)
def test_invalid_arguments_raise_before_writing(tmp_path, kwargs, match):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path / "bad", progress=False, **args)
    assert not (tmp_path / "bad").exists()


def test_plan_functions_check_their_arguments():
    with pytest.raises(ValueError, match="classes must be >= 2"):
        plan_counts(1, 10)
    with pytest.raises(ValueError, match="val_images=9 is too few"):
        plan_val_counts([5, 1, 1], 9)
    with pytest.raises(ValueError, match="val_images"):
        plan_balanced_counts(80, 100)


# ---------------------------------------------------------------------------------------------
# --like lvis_v1


def test_like_lvis_v1_counts_keep_lvis_order_groups_and_bins():
    """The counts follow LVIS v1's: order kept, one-instance classes keep one, every budget met;
    the classes fall into the scaled bins as LVIS's classes fall into LVIS's bins (exactly at
    10,000 images, within a few classes where rounding merges counts at 3,000), and the scale is
    linear (g = 1) from LVIS's own total up."""
    from simcal.data.synthetic import bin_sizes, like_bins, like_statistics, plan_like_counts

    real = like_statistics("lvis_v1")
    assert len(real) == 1203 and [c["id"] for c in real] == list(range(1, 1204))
    real_n = np.array([c["instance_count"] for c in real])
    real_bins = bin_sizes(real_n, [10, 100, 1000])
    assert real_bins == [200, 412, 334, 257]
    for images, slack in ((3000, 50), (10000, 0), (500000, 0)):
        counts, q, g = plan_like_counts("lvis_v1", images)
        n = np.array(counts)
        assert n.sum() == round(3.5 * images) and n.min() == 1
        assert (q == 1.0 and g < 1) if images < 362000 else (g == 1.0 and q > 1)
        order = np.argsort(real_n, kind="stable")
        assert np.all(np.diff(n[order]) >= 0)  # a class with more real instances never has fewer
        assert np.all(n[real_n == 1] == 1) or q > 1
        got = bin_sizes(n, like_bins(q, g))
        assert max(abs(a - b) for a, b in zip(got, real_bins)) <= slack, (images, got)


def test_1203_classes_look_different_shape_hue_pattern():
    from simcal.data.synthetic import PATTERNS, SHAPES, _pattern_mask, class_look

    looks = [class_look(k, len(PATTERNS)) for k in range(1203)]
    assert len(set(looks)) == 1203 and max(h for _, h, _ in looks) == 15  # 8 shapes x 16 hues x 10 patterns
    assert len(set(category_names(1203, len(PATTERNS)))) == 1203
    assert category_names(9, len(PATTERNS))[8] == "hue00_square_hstripes"
    assert [class_look(k) for k in range(9)] == [(k % 8, k // 8, 0) for k in range(9)]  # one pattern: as before
    disc = np.hypot(*np.mgrid[0:48, 0:48] - 23.5) < 20  # one object, 20 px radius
    shades = {p: _pattern_mask(p, disc, np.array([24.0, 24.0]), 20.0, 0.0) for p in PATTERNS}
    assert not shades["solid"].any() and all(shades[p].any() for p in PATTERNS[1:])
    for a in PATTERNS:  # every two patterns shade at least a tenth of the object differently
        for b in PATTERNS:
            assert a == b or (shades[a] ^ shades[b]).sum() > 0.1 * disc.sum(), (a, b)
    assert len(SHAPES) == 8


@pytest.mark.slow
def test_a_tiny_lvis_like_set_is_generated_with_lvis_groups(tmp_path):
    summary = generate_synthetic(
        tmp_path / "like", like="lvis_v1", train_images=250, val_images=210, val_floor=1, size=32, progress=False
    )
    train = _load(tmp_path / "like", "train")
    assert len(train["categories"]) == 1203 and summary["frequency"] == {"r": 337, "c": 461, "f": 405}
    assert train["categories"][0]["def"] == "stands for lvis_v1 category 1 aerosol_can"
    assert train["info"]["like"] == "lvis_v1" and len(train["info"]["bins"]) == 3
    assert _per_class(train) == [c["instance_count"] for c in train["categories"]]
    assert min(_per_class(_load(tmp_path / "like", "val"))) >= 1
    with pytest.raises(ValueError, match="like=lvis_v1 has 1203 classes"):
        generate_synthetic(tmp_path / "no", like="lvis_v1", classes=5, progress=False)
    with pytest.raises(ValueError, match="val_images=100 is too few for classes=1203"):
        generate_synthetic(tmp_path / "no", like="lvis_v1", train_images=250, val_images=100, val_floor=1)


def test_jpg_images_are_written_and_load_like_the_png_ones(tmp_path):
    """`--image-format jpg`: the same set (same json but for the file names) as JPEGs that the
    training data path reads; the pixels differ from the PNGs only by JPEG's loss."""
    from simcal import choices
    from simcal.data.dataset import DetectionDataset
    from simcal.data.synthetic import _IMAGE_FORMATS

    assert tuple(_IMAGE_FORMATS) == choices.IMAGE_FORMATS
    kw = dict(classes=8, train_images=12, val_images=30, size=64, seed=1, progress=False)
    generate_synthetic(tmp_path / "png", **kw)
    generate_synthetic(tmp_path / "jpg", image_format="jpg", **kw)
    a, b = _load(tmp_path / "png", "train"), _load(tmp_path / "jpg", "train")
    assert all(im["file_name"].endswith(".jpg") for im in b["images"])
    for im in b["images"]:
        im["file_name"] = im["file_name"].replace(".jpg", ".png")
    assert a == b
    png, jpg = (DetectionDataset(_load(tmp_path / f, "train"), tmp_path / f / "images") for f in ("png", "jpg"))
    (x, tx), (y, ty) = png[0], jpg[0]
    assert torch_equal_targets(tx, ty) and x.shape == y.shape and 0 < (x - y).abs().mean() < 0.05
    with pytest.raises(ValueError, match="image_format must be one of png, jpg"):
        generate_synthetic(tmp_path / "bad", image_format="gif", **kw)


def torch_equal_targets(a: dict, b: dict) -> bool:
    return all((a[k] == b[k]).all() for k in ("boxes", "labels"))


@pytest.mark.slow
def test_a_like_set_declares_its_scaled_bins(tmp_path):
    from simcal.data.stats import BIN_PRESETS, declared_bins

    generate_synthetic(
        tmp_path / "like", like="lvis_v1", train_images=1000, val_images=210, val_floor=1, size=32, progress=False
    )
    train = _load(tmp_path / "like", "train")
    edges = declared_bins(train)
    assert edges == tuple(train["info"]["bins"]) and edges[0] < 10 and len(edges) == 3
    assert declared_bins(_load(tmp_path / "like", "val")) == edges
    for info in ({}, {"bins": "lvis"}, {"bins": [3, 2]}, {"bins": [0, 5]}, {"bins": [True, 4]}):
        assert declared_bins({"info": info}) == BIN_PRESETS["lvis"]
    assert declared_bins(None) == BIN_PRESETS["lvis"]
    from simcal import api

    val, train_path = tmp_path / "like" / "val.json", tmp_path / "like" / "train.json"
    assert api.evaluate(val, [], iou="bbox", train=train_path).to_json()["bin_edges"] == list(edges)
    assert api.evaluate(val, [], iou="bbox", train=train_path, bins="lvis").to_json()["bin_edges"] == [10, 100, 1000]
