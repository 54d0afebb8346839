"""Samplers: repeat factors by hand, rounding statistics, exact resume, bi-level balance."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from simcal.data.samplers import (
    BatchStream,
    BiLevelSampler,
    RepeatFactorSampler,
    TrainingSampler,
    repeat_factors,
)


def _dataset(image_cats: list[list[int]], crowd: dict[int, list[int]] | None = None) -> dict:
    """Images 0..n-1 (ids 100+i); image i gets one annotation per entry of image_cats[i]."""
    images = [{"id": 100 + i, "width": 10, "height": 10} for i in range(len(image_cats))]
    anns = []
    for i, cats in enumerate(image_cats):
        anns += [{"id": len(anns) + 1, "image_id": 100 + i, "category_id": c, "iscrowd": 0} for c in cats]
    for i, cats in (crowd or {}).items():
        anns += [{"id": len(anns) + 1, "image_id": 100 + i, "category_id": c, "iscrowd": 1} for c in cats]
    cat_ids = sorted({c for cats in image_cats for c in cats} | {c for v in (crowd or {}).values() for c in v})
    return {"images": images, "annotations": anns, "categories": [{"id": c} for c in cat_ids]}


# 6 images: f_1 = 1/6, f_2 = 3/6, f_3 = 2/6, f_4 = 1/6 (cat 1 twice in image 0 counts once)
SIX = [[1, 1, 2], [2], [2, 3], [], [3], [4]]


def test_repeat_factors_by_hand():
    data = _dataset(SIX)
    data["annotations"].append({"id": 99, "image_id": 999, "category_id": 2})  # unknown image
    # t = 0.375: r1 = sqrt(0.375 * 6) = sqrt(2.25) = 1.5; r2 = sqrt(0.375 * 2) = sqrt(0.75) -> 1;
    # r3 = sqrt(0.375 * 3) = sqrt(1.125) = 1.0606601717798212; r4 = 1.5
    r = repeat_factors(data, t=0.375)
    assert r.shape == (6,) and r.dtype == np.float64
    assert r.tolist() == pytest.approx([1.5, 1.0, 1.0606601717798212, 1.0, 1.0606601717798212, 1.5])
    # t = 1: r1 = sqrt(6), r2 = sqrt(2), r3 = sqrt(3), r4 = sqrt(6); image = max over its classes
    s2, s3, s6 = 1.4142135623730951, 1.7320508075688772, 2.449489742783178
    assert repeat_factors(data, t=1.0).tolist() == pytest.approx([s6, s2, s3, 1.0, s3, s6])
    # the default t = 0.001 repeats nothing here; t = 0 neither
    assert repeat_factors(data).tolist() == [1.0] * 6
    assert repeat_factors(data, t=0.0).tolist() == [1.0] * 6
    with pytest.raises(ValueError):
        repeat_factors(data, t=-1.0)


def test_training_sampler_permutations_deterministic_and_epoch_dependent():
    s = TrainingSampler(50, seed=3)
    e0, e1 = s.epoch_indices(0), s.epoch_indices(1)
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != e1
    assert TrainingSampler(50, seed=3).epoch_indices(0) == e0
    assert TrainingSampler(50, seed=4).epoch_indices(0) != e0
    assert s.epoch_length(7) == 50
    assert TrainingSampler(5, shuffle=False).epoch_indices(4) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        TrainingSampler(0)


FACTORS = [1.0, 1.5, 2.25, 3.0, 1.1]


def test_stochastic_rounding_statistics():
    s = RepeatFactorSampler(FACTORS, seed=0)
    epochs = 2000
    counts = np.zeros((epochs, len(FACTORS)), dtype=np.int64)
    for e in range(epochs):
        idx = s.epoch_indices(e)
        counts[e] = np.bincount(idx, minlength=len(FACTORS))
        assert len(idx) == s.epoch_length(e) == counts[e].sum()
        assert counts[e].tolist() == s.repeat_counts(e).tolist()
    # each image appears floor(r) or ceil(r) times in every epoch
    lo, hi = np.floor(FACTORS), np.ceil(FACTORS)
    assert ((counts == lo) | (counts == hi)).all()
    # E[len] = sum(r) = 8.85; per-epoch variance sum f(1-f) = 0.5275, so the std of the mean over
    # 2000 epochs is 0.016: tolerance 0.08 (5 sigma). Per image the std of the mean is <= 0.011.
    assert counts.sum(1).mean() == pytest.approx(sum(FACTORS), abs=0.08)
    assert counts.mean(0).tolist() == pytest.approx(FACTORS, abs=0.06)
    # lengths vary from epoch to epoch
    assert len(set(counts.sum(1).tolist())) > 1


def test_ceil_rounding_exact_counts():
    s = RepeatFactorSampler(FACTORS, seed=0, rounding="ceil")
    for e in range(5):
        assert Counter(s.epoch_indices(e)) == {0: 1, 1: 2, 2: 3, 3: 3, 4: 2}
        assert s.epoch_length(e) == 11
    assert s.epoch_indices(0) != s.epoch_indices(1)  # shuffled per epoch


def test_repeat_factor_sampler_determinism_and_errors():
    a, b = RepeatFactorSampler(FACTORS, seed=1), RepeatFactorSampler(FACTORS, seed=1)
    assert [a.epoch_indices(e) for e in (5, 0, 3)] == [b.epoch_indices(e) for e in (5, 0, 3)]
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert a.epoch_indices(0) != RepeatFactorSampler(FACTORS, seed=2).epoch_indices(0)
    with pytest.raises(ValueError, match="stochastic, ceil"):
        RepeatFactorSampler(FACTORS, rounding="round")
    with pytest.raises(ValueError):
        RepeatFactorSampler([1.0, float("nan")])
    with pytest.raises(ValueError):
        RepeatFactorSampler([1.0], seed=-1)


def _stream_of(sampler, n_epochs: int) -> list[int]:
    return [i for e in range(n_epochs) for i in sampler.epoch_indices(e)]


@pytest.mark.parametrize(
    "sampler, batch",
    [
        (TrainingSampler(5, seed=0), 3),  # batches straddle epochs
        (TrainingSampler(3, seed=1), 7),  # a batch spans three epochs
        (RepeatFactorSampler(FACTORS, seed=2), 4),  # epochs of varying length
        (RepeatFactorSampler(FACTORS, seed=2, rounding="ceil"), 6),
    ],
)
def test_batch_stream_is_the_cut_concatenation(sampler, batch):
    flat = _stream_of(sampler, 60)
    stream = BatchStream(sampler, batch)
    iters = len(flat) // batch - 1
    for it in range(iters):
        assert stream.global_batch(it) == flat[it * batch : (it + 1) * batch]
    # random access (backwards, fresh stream) equals sequential
    fresh = BatchStream(sampler, batch)
    for it in reversed(range(0, iters, 7)):
        assert fresh.global_batch(it) == flat[it * batch : (it + 1) * batch]


def test_batch_stream_epoch_of():
    stream = BatchStream(TrainingSampler(5), 3)
    # positions 0, 3, 6, 9, 12: epochs 0, 0, 1, 1, 2
    assert [stream.epoch_of(i) for i in range(5)] == [0, 0, 1, 1, 2]
    rfs = RepeatFactorSampler(FACTORS, seed=0)
    stream = BatchStream(rfs, 4)
    starts = np.cumsum([0] + [rfs.epoch_length(e) for e in range(100)])
    for it in range(150):
        assert stream.epoch_of(it) == int(np.searchsorted(starts, it * 4, side="right") - 1)


def test_batch_stream_resume_far_iteration_first():
    for sampler in (TrainingSampler(1000, seed=5), RepeatFactorSampler(np.linspace(1, 3, 500), seed=5)):
        stream = BatchStream(sampler, 16)
        batch = stream.global_batch(10_000)  # asked first, as on resume
        flat: list[int] = []
        epoch = 0
        while len(flat) < 160_032:
            flat += sampler.epoch_indices(epoch)
            epoch += 1
        assert batch == flat[160_000:160_016]
        assert stream.global_batch(10_001) == flat[160_016:160_032]
        assert stream.global_batch(9_999) == flat[159_984:160_000]


def test_batch_stream_shards():
    stream = BatchStream(TrainingSampler(10, seed=0), 8)
    for it in range(20):
        batch = stream.global_batch(it)
        for world in (1, 2, 4, 8):
            shards = [stream.shard(it, r, world) for r in range(world)]
            assert all(len(s) == 8 // world for s in shards)
            assert sorted(sum(shards, [])) == sorted(batch)  # union (as a multiset) is the batch
            for r in range(world):  # disjoint: each batch position goes to exactly one rank
                assert shards[r] == batch[r::world]
        if (it * 8) // 10 == (it * 8 + 7) // 10:  # inside one epoch: distinct images per rank
            halves = [set(stream.shard(it, r, 2)) for r in range(2)]
            assert not halves[0] & halves[1]
    with pytest.raises(ValueError, match="divisible"):
        stream.shard(0, 0, 3)
    with pytest.raises(ValueError):
        stream.shard(0, 2, 2)
    with pytest.raises(ValueError):
        BatchStream(TrainingSampler(10), 0)


# ---------------------------------------------------------------------------------------------
# BiLevelSampler


def _skewed() -> dict:
    """Class 1 in 1000 images, class 2 in 100, class 3 in 10, class 4 in 1; class 5 crowd only."""
    image_cats = [[1, 1, 1] for _ in range(1000)]
    for i in range(100):
        image_cats[i * 10 + 1].append(2)
    for i in range(10):
        image_cats[i * 97 + 3].append(3)
    image_cats.append([4])  # image 1000
    image_cats.append([])  # image 1001: no annotation
    data = _dataset(image_cats, crowd={5: [5], 1001: [5]})
    data["categories"].append({"id": 6})  # no annotation at all
    return data


def test_bilevel_classes_uniform_despite_skew_and_images_contain_their_class():
    data = _skewed()
    s = BiLevelSampler(data, classes_per_batch=16, seed=0)
    assert s.category_ids == [1, 2, 3, 4] and s.num_classes == 4
    owner = {img["id"]: i for i, img in enumerate(data["images"])}
    contains = {(owner[a["image_id"]], a["category_id"]) for a in data["annotations"] if not a["iscrowd"]}
    steps = 4000
    cls_count: Counter = Counter()
    img3: Counter = Counter()
    for step in range(steps):
        batch = s.batch(step)
        assert len(batch) == 16
        for img, cat in batch:
            assert (img, cat) in contains  # the image holds a (non-crowd) instance of the class
            cls_count[cat] += 1
            if cat == 3:
                img3[img] += 1
    # classes 5 (crowd only) and 6 (no annotation) never drawn
    assert set(cls_count) == {1, 2, 3, 4}
    # 64000 draws, 16000 expected per class; chi-square with 3 dof: 99.9 % quantile 16.3
    expected = steps * 16 / 4
    chi2 = sum((cls_count[c] - expected) ** 2 / expected for c in (1, 2, 3, 4))
    assert chi2 < 20, cls_count
    assert max(abs(cls_count[c] - expected) for c in (1, 2, 3, 4)) < 0.04 * expected
    # within class 3 each of its 10 images is drawn, about 1600 times each (std 38)
    assert len(img3) == 10 and all(abs(v - cls_count[3] / 10) < 250 for v in img3.values())


def test_bilevel_deterministic_any_step_first_and_shards():
    data = _skewed()
    a = BiLevelSampler(data, classes_per_batch=6, seed=7)
    b = BiLevelSampler(data, classes_per_batch=6, seed=7)
    assert a.batch(12345) == b.batch(12345)
    seq = [a.batch(i) for i in range(5)]
    assert [b.batch(i) for i in reversed(range(5))] == seq[::-1]
    assert seq[0] != seq[1]
    assert BiLevelSampler(data, classes_per_batch=6, seed=8).batch(0) != seq[0]
    assert all(isinstance(i, int) and isinstance(c, int) for i, c in seq[0])
    for world in (1, 2, 3, 4):
        shards = [a.shard(3, r, world) for r in range(world)]
        assert sorted(sum(shards, [])) == sorted(seq[3])
        assert all(shards[r] == seq[3][r::world] for r in range(world))
    with pytest.raises(ValueError):
        a.shard(0, 4, 4)


def test_bilevel_errors():
    with pytest.raises(ValueError, match="no category"):
        BiLevelSampler(_dataset([[], []], crowd={0: [1]}))
    with pytest.raises(ValueError):
        BiLevelSampler(_dataset([[1]]), classes_per_batch=0)
