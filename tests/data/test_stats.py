import math

import pytest

from simcal.data.stats import (
    bin_index,
    bin_labels,
    category_stats,
    count_instances,
    frequency_of,
    parse_bins,
    stats_from_fields,
)
from simcal.errors import InputError
from tests.conftest import tiny_lvis


def test_counts_come_from_annotations_not_fields():
    data = tiny_lvis()
    # the json's own fields say 3/50/5000 instances; the annotations say 1/2/0
    assert count_instances(data) == {1: (1, 1), 2: (2, 2), 3: (0, 0)}
    stats = category_stats(data)
    assert [s.instance_count for s in stats] == [1, 2, 0]
    assert [s.image_count for s in stats] == [1, 2, 0]


def test_frequency_groups_method_md_edges():
    assert [frequency_of(n) for n in (0, 1, 9, 10, 100, 101, 5000)] == ["r", "r", "r", "c", "c", "f", "f"]


def test_frequency_field_wins_when_present_else_computed():
    data = tiny_lvis()
    assert [s.frequency for s in category_stats(data)] == ["r", "c", "f"]
    for c in data["categories"]:
        del c["frequency"]
    assert [s.frequency for s in category_stats(data)] == ["r", "r", "r"]


@pytest.mark.parametrize(
    "count, expected", [(0, 0), (9, 0), (10, 1), (99, 1), (100, 2), (999, 2), (1000, 3), (10**6, 3)]
)
def test_lvis_bins_half_open(count, expected):
    assert bin_index(count, parse_bins("lvis")) == expected


def test_bin_presets_and_custom_edges():
    assert parse_bins("coco-lt") == (20, 400, 8000)
    assert parse_bins("5,50") == (5.0, 50.0)
    assert bin_labels((5, 50)) == ["[0, 5)", "[5, 50)", "[50, inf)"]
    assert bin_index(math.inf, (5, 50)) == 2


@pytest.mark.parametrize("spec", ["abc", "10,5", "0,10", "10,10", "", "-1,3"])
def test_bad_bins_raise_input_error(spec):
    with pytest.raises(InputError, match="bins"):
        parse_bins(spec)


def test_stats_from_fields_uses_lvis_train_counts():
    stats = stats_from_fields(tiny_lvis(), "val.json")
    assert [(s.instance_count, s.bin) for s in stats] == [(3, 0), (50, 1), (5000, 3)]


def test_stats_from_fields_missing_count_names_file_and_field():
    data = tiny_lvis()
    del data["categories"][1]["instance_count"]
    with pytest.raises(InputError) as e:
        stats_from_fields(data, "val.json")
    assert "val.json: categories[1].instance_count" in str(e.value)


def test_stats_from_fields_without_frequency_or_image_count_is_an_error_not_rare():
    data = tiny_lvis()
    data["categories"][2].pop("frequency", None)
    data["categories"][2].pop("image_count", None)
    with pytest.raises(InputError) as e:
        stats_from_fields(data, "val.json")
    assert "val.json: categories[2].frequency" in str(e.value)
    # image_count alone is enough: the group is derived from it
    data["categories"][2]["image_count"] = 500
    assert stats_from_fields(data, "val.json")[2].frequency == "f"
