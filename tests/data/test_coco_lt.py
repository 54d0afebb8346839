"""Tests for simcal.data.coco_lt on a generated 80-class COCO-format training split."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest

from simcal.data.annotations import validate_dataset
from simcal.data.coco_lt import GROUP_RANGES, PlanEntry, build_coco_lt, coco_lt_plan
from simcal.data.stats import count_instances
from simcal.errors import InputError

#: The 80 COCO category ids (1..90 with ten gaps), as in instances_train2017.json.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]

#: Instance counts by intended rank, ~9000 down to 0. Ranks 20 and 21 tie at 2000 (the tie
#: decides the group), ranks 70 and 71 tie at 30, the last class has no instance at all.
RANK_COUNTS = (
    [9000, 5000, 3000]
    + [2170 - 10 * i for i in range(16)]
    + [2000]
    + [2000]
    + [int(x) for x in np.linspace(1950, 810, 19)]
    + [int(x) for x in np.linspace(790, 90, 20)]
    + [79, 75, 70, 64, 60, 55, 50, 45, 40, 30, 30, 25, 20, 15, 10, 8, 7, 5, 2, 0]
)
TOP_CROWD_RANK = 0  # 0-based rank of a top-20 class with one crowd annotation
TAIL_CROWD_RANK = 45  # 0-based rank of a sub-sampled class with one crowd annotation
N_EMPTY_IMAGES = 3  # images without any annotation in the input


def make_coco() -> dict[str, Any]:
    """A deterministic 80-class COCO train dict, ~87k bbox annotations on ~11k images."""
    rng = np.random.default_rng(1234)
    assert len(RANK_COUNTS) == 80
    cat_ids = [COCO_IDS[i] for i in rng.permutation(80)]  # cat_ids[r] gets RANK_COUNTS[r]
    # The tied pair at ranks 20/21: the smaller id must rank first, whatever the list order.
    if cat_ids[19] > cat_ids[20]:
        cat_ids[19], cat_ids[20] = cat_ids[20], cat_ids[19]
    counts = dict(zip(cat_ids, RANK_COUNTS, strict=True))

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []

    def new_image() -> int:
        image_id = 10 * len(images) + 7
        images.append({"id": image_id, "width": 64, "height": 48, "file_name": f"{image_id}.jpg"})
        return image_id

    def add(cat: int, image_id: int) -> None:
        annotations.append({"id": 0, "image_id": image_id, "category_id": cat})

    # Top 20: all instances shuffled together, 50 per image.
    top = np.repeat(cat_ids[:20], [counts[c] for c in cat_ids[:20]])
    top = top[rng.permutation(top.size)]
    top_images = []
    for start in range(0, top.size, 50):
        image_id = new_image()
        top_images.append(image_id)
        for cat in top[start : start + 50]:
            add(int(cat), image_id)
    # Ranks 21-40: one class per image, 20 per image.
    for cat in cat_ids[20:40]:
        for start in range(0, counts[cat], 20):
            image_id = new_image()
            for _ in range(min(20, counts[cat] - start)):
                add(cat, image_id)
    # Ranks 41-80: every 4th instance joins a top-20 image, the others sit alone in an image.
    for cat in cat_ids[40:]:
        for k in range(counts[cat]):
            add(cat, int(rng.choice(top_images)) if k % 4 == 0 else new_image())
    for _ in range(N_EMPTY_IMAGES):
        new_image()

    for ann_id, idx in enumerate(rng.permutation(len(annotations))):
        ann = annotations[idx]
        ann.update(id=3 * ann_id + 1, bbox=[1.0, 2.0, 5.0, 4.0], area=20.0, iscrowd=0)
    for idx in range(0, len(annotations), 5000):  # a few polygon masks
        annotations[idx]["segmentation"] = [[1.0, 2.0, 6.0, 2.0, 6.0, 6.0, 1.0, 6.0]]
        annotations[idx]["area"] = 20.0
    for rank in (TOP_CROWD_RANK, TAIL_CROWD_RANK):
        ann = next(a for a in annotations if a["category_id"] == cat_ids[rank])
        ann["iscrowd"] = 1

    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    categories = [categories[i] for i in rng.permutation(80)]
    return {
        "info": {"description": "synthetic COCO", "year": 2017},
        "licenses": [{"id": 1, "name": "test", "url": ""}],
        "images": [images[i] for i in rng.permutation(len(images))],
        "annotations": [annotations[i] for i in rng.permutation(len(annotations))],
        "categories": categories,
    }


def ranked_ids(coco: dict[str, Any]) -> list[int]:
    """Category ids by intended rank, recovered from RANK_COUNTS (ties by id)."""
    counts = count_instances(coco)
    return sorted(counts, key=lambda c: (-counts[c][0], c))


@pytest.fixture(scope="module")
def coco() -> dict[str, Any]:
    return make_coco()


@pytest.fixture(scope="module")
def lt(coco: dict[str, Any]) -> dict[str, Any]:
    return build_coco_lt(coco, seed=0)


@pytest.fixture(scope="module")
def plan(coco: dict[str, Any]) -> list[PlanEntry]:
    return coco_lt_plan(coco, seed=0)


def ann_ids_by_cat(dataset: dict[str, Any]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {cat["id"]: set() for cat in dataset["categories"]}
    for ann in dataset["annotations"]:
        out[ann["category_id"]].add(ann["id"])
    return out


def test_fixture_is_a_valid_dataset(coco: dict[str, Any]) -> None:
    counts = count_instances(coco)
    assert sorted((n for n, _ in counts.values()), reverse=True) == RANK_COUNTS
    assert validate_dataset(coco, "<fixture>") is coco


def test_plan_ranks_by_count_with_ties_broken_by_id(coco: dict[str, Any], plan: list[PlanEntry]) -> None:
    counts = count_instances(coco)
    assert [e.rank for e in plan] == list(range(1, 81))
    assert [e.category_id for e in plan] == ranked_ids(coco)
    assert [e.group for e in plan] == [r // 20 for r in range(80)]
    assert [e.instance_count for e in plan] == RANK_COUNTS
    # The 2000-2000 tie straddles the group boundary: the smaller id stays in the top 20,
    # even though the categories list does not put it first.
    r20, r21 = plan[19], plan[20]
    assert r20.instance_count == r21.instance_count == 2000
    assert r20.category_id < r21.category_id
    assert (r20.group, r21.group) == (0, 1)
    # The 30-30 tie inside group 3.
    r70, r71 = plan[69], plan[70]
    assert r70.instance_count == r71.instance_count == 30
    assert r70.category_id < r71.category_id
    for e in plan:
        assert e.instance_count == counts[e.category_id][0]
        if e.group == 0:
            assert (e.drawn, e.target, e.available) == (None, e.instance_count, e.instance_count)
        else:
            lo, hi = GROUP_RANGES[e.group - 1]
            assert e.drawn is not None and lo <= e.drawn < hi
            assert e.target == min(e.drawn, e.available)


def test_top20_classes_unchanged(coco: dict[str, Any], lt: dict[str, Any], plan: list[PlanEntry]) -> None:
    before, after = ann_ids_by_cat(coco), ann_ids_by_cat(lt)
    by_id = {a["id"]: a for a in coco["annotations"]}
    out_by_id = {a["id"]: a for a in lt["annotations"]}
    for e in plan[:20]:
        assert after[e.category_id] == before[e.category_id]
        for ann_id in after[e.category_id]:
            assert out_by_id[ann_id] == by_id[ann_id]


def test_group_counts_within_ranges(coco: dict[str, Any], lt: dict[str, Any], plan: list[PlanEntry]) -> None:
    new_counts = count_instances(lt)
    non_crowd = Counter(a["category_id"] for a in coco["annotations"] if not a["iscrowd"])
    strictly_sampled: Counter[int] = Counter()
    for e in plan[20:]:
        lo, hi = GROUP_RANGES[e.group - 1]
        n = new_counts[e.category_id][0]
        assert e.available == non_crowd[e.category_id]
        assert n == e.target
        assert lo <= n < hi or n == e.available, (e, n)
        if e.available < lo:
            assert n == e.available
        if n < e.available:
            strictly_sampled[e.group] += 1
    # Every group really sub-samples some classes and caps others (the fixture is built so).
    assert set(strictly_sampled) == {1, 2, 3}
    assert any(e.target == e.available and e.drawn != e.available for e in plan[20:])
    assert new_counts[plan[-1].category_id] == (0, 0)


def test_crowd_kept_in_top20_dropped_in_tail(coco: dict[str, Any], lt: dict[str, Any], plan: list[PlanEntry]) -> None:
    top_cat, tail_cat = plan[TOP_CROWD_RANK].category_id, plan[TAIL_CROWD_RANK].category_id
    crowd_in = {a["category_id"]: a["id"] for a in coco["annotations"] if a["iscrowd"]}
    assert set(crowd_in) == {top_cat, tail_cat}
    crowd_out = {a["id"] for a in lt["annotations"] if a["iscrowd"]}
    assert crowd_out == {crowd_in[top_cat]}
    assert plan[TAIL_CROWD_RANK].available == plan[TAIL_CROWD_RANK].instance_count - 1


def test_images_dropped_exactly_when_left_empty(coco: dict[str, Any], lt: dict[str, Any]) -> None:
    used = {a["image_id"] for a in lt["annotations"]}
    out_ids = [img["id"] for img in lt["images"]]
    assert set(out_ids) == used  # no annotation refers to a dropped image, no empty image kept
    assert out_ids == [img["id"] for img in coco["images"] if img["id"] in used]  # order kept
    dropped = {img["id"] for img in coco["images"]} - set(out_ids)
    had_annotations = {a["image_id"] for a in coco["annotations"]}
    assert len(dropped - had_annotations) == N_EMPTY_IMAGES
    assert len(dropped & had_annotations) > 0  # some images were emptied by the sub-sampling
    by_id = {img["id"]: img for img in coco["images"]}
    assert all(img == by_id[img["id"]] for img in lt["images"])


def test_annotations_are_an_ordered_subset(coco: dict[str, Any], lt: dict[str, Any]) -> None:
    kept = {a["id"] for a in lt["annotations"]}
    assert [a for a in coco["annotations"] if a["id"] in kept] == lt["annotations"]
    assert len(lt["annotations"]) < len(coco["annotations"])


def test_metadata_and_categories_preserved(coco: dict[str, Any], lt: dict[str, Any]) -> None:
    assert list(lt) == list(coco)
    assert lt["info"] == coco["info"] and lt["info"] is not coco["info"]
    assert lt["licenses"] == coco["licenses"] and lt["licenses"] is not coco["licenses"]
    assert lt["categories"] == coco["categories"]
    assert lt["categories"] is not coco["categories"]


def test_output_is_a_valid_json_dataset(lt: dict[str, Any]) -> None:
    again = validate_dataset(json.loads(json.dumps(lt)), "<coco-lt>")
    assert again == lt


def test_deterministic_per_seed(coco: dict[str, Any], lt: dict[str, Any], plan: list[PlanEntry]) -> None:
    assert build_coco_lt(coco, seed=0) == lt
    assert coco_lt_plan(coco, seed=0) == plan
    other = build_coco_lt(coco, seed=1)
    assert other != lt
    assert {a["id"] for a in other["annotations"]} != {a["id"] for a in lt["annotations"]}
    assert [e.target for e in coco_lt_plan(coco, seed=1)] != [e.target for e in plan]
    # Top 20 untouched whatever the seed.
    top = {e.category_id for e in plan[:20]}
    assert {a["id"] for a in other["annotations"] if a["category_id"] in top} == {
        a["id"] for a in lt["annotations"] if a["category_id"] in top
    }


def test_input_not_mutated() -> None:
    coco = make_coco()
    snapshot = json.dumps(coco)
    out = build_coco_lt(coco, seed=3)
    assert json.dumps(coco) == snapshot
    out["images"][0]["width"] = 1
    out["annotations"][0]["iscrowd"] = 1
    out["categories"][0]["name"] = "renamed"
    out["info"]["year"] = 1999
    out["licenses"].clear()
    out["images"].clear()
    assert json.dumps(coco) == snapshot


@pytest.mark.parametrize("n_categories", [79, 81, 0])
def test_wrong_number_of_categories(coco: dict[str, Any], n_categories: int) -> None:
    cats = coco["categories"][:n_categories]
    cats += [{"id": 1000 + i, "name": f"extra{i}"} for i in range(n_categories - len(cats))]
    bad = {**coco, "categories": cats}
    for fn in (build_coco_lt, coco_lt_plan):
        with pytest.raises(InputError) as info:
            fn(bad, source="train.json")
        err = info.value
        assert err.source == "train.json" and err.field == "categories"
        assert str(err).startswith("train.json: categories: ")
        assert f"got {n_categories}" in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(coco: dict[str, Any], seed: Any) -> None:
    with pytest.raises(InputError) as info:
        build_coco_lt(coco, seed=seed)
    assert info.value.field == "seed"


@pytest.mark.slow
def test_cli_writes_coco_lt_json(coco: dict[str, Any], lt: dict[str, Any], tmp_path, capsys) -> None:
    import json

    from simcal.cli import main

    src, out = tmp_path / "instances_train2017.json", tmp_path / "coco_lt.json"
    src.write_text(json.dumps(coco))
    assert main(["coco-lt", "--coco", str(src), "--out", str(out), "--seed", "0"]) == 0
    written = json.loads(out.read_text())
    assert [a["id"] for a in written["annotations"]] == [a["id"] for a in lt["annotations"]]
    assert f"{len(lt['images'])} images" in capsys.readouterr().out
    # a file with the wrong number of classes: one line, non-zero exit
    coco79 = {**coco, "categories": coco["categories"][:79]}
    coco79["annotations"] = [
        a for a in coco["annotations"] if a["category_id"] in {c["id"] for c in coco79["categories"]}
    ]
    src.write_text(json.dumps(coco79))
    assert main(["coco-lt", "--coco", str(src), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}: categories: COCO-LT needs exactly 80 categories" in err
    assert not (tmp_path / "x.json").exists()
