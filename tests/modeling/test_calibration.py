"""Calibrated heads: initialisation from the trained head, copies, freezing, NCM, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simcal.choices import CALIBRATED_HEADS as HEAD_KINDS
from simcal.errors import InputError
from simcal.modeling.calibration import (
    NCM_SCALE,
    UNSEEN_LOGIT,
    CalibratedHead,
    build_calibrated_head,
    load_head,
    save_head,
)
from simcal.modeling.detector import maskrcnn_small

torch.set_num_threads(1)
C = 5  # foreground classes: logits have C + 1 = 6 columns
C_FPN, D = 128, 256  # maskrcnn_small's fpn_channels and representation_size


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = maskrcnn_small(num_classes=C, min_size=64, max_size=64, rpn_post_nms_top_n_test=20).eval()
    for p in m.parameters():  # as in calibration: the whole detector is frozen
        p.requires_grad_(False)
    return m


def _pooled(r: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(r, C_FPN, 7, 7, generator=g)


def _original_logits(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    rh = model.roi_heads
    return rh.box_predictor(rh.box_head(pooled))[0]


def test_3fc_ft_starts_from_the_trained_classifier_on_real_roi_features(model):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g)]
    with torch.no_grad():
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        pooled, box_feats, logits, _ = model.roi_heads.box_features(features, proposals, image_list.image_sizes)
        head = build_calibrated_head("3fc_ft", model.roi_heads)
        assert pooled.shape[1:] == (C_FPN, 7, 7) and pooled.shape[0] > 0
        assert torch.equal(head(pooled), logits)
        assert torch.equal(head(pooled.flatten(1)), logits)  # flattened input works too
        assert torch.equal(head.representation(pooled), box_feats)
    assert head(pooled).shape == (pooled.shape[0], C + 1)


def test_3fc_ft_holds_copies_trainable_although_the_detector_is_frozen(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = build_calibrated_head("3fc_ft", model.roi_heads)
    detector_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert all(t.data_ptr() not in detector_ptrs for t in head.state_dict().values())
    assert all(p.requires_grad for p in head.parameters())  # deepcopy must not keep the frozen flag

    opt = torch.optim.SGD(head.trainable_parameters(), lr=1.0)
    loss = nn.functional.cross_entropy(head(_pooled()), torch.tensor([0, 1, 2, 3, 4, 5, 0]))
    loss.backward()
    opt.step()
    with torch.no_grad():
        head.fc6.weight.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head.cls_score.weight, model.roi_heads.box_predictor.cls_score.weight)


@pytest.mark.parametrize(
    "kind, shapes",
    [
        ("3fc_rand", {"fc6": (D, C_FPN * 49), "fc7": (D, D), "cls_score": (C + 1, D)}),
        ("2fc_rand", {"fc6": (D, C_FPN * 49), "cls_score": (C + 1, D)}),
    ],
)
def test_random_heads_shapes_seeded_and_different_from_the_original(model, kind, shapes):
    rng_before = torch.get_rng_state()
    head = build_calibrated_head(kind, model.roi_heads, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    assert {name: m.weight.shape for name, m in head.named_children()} == shapes
    pooled = _pooled()
    with torch.no_grad():
        out = head(pooled)
        assert out.shape == (7, C + 1)
        assert not torch.allclose(out, _original_logits(model, pooled))
        assert not torch.equal(head.fc6.weight, model.roi_heads.box_head.fc6.weight)
        same = build_calibrated_head(kind, model.roi_heads, seed=3)
        other = build_calibrated_head(kind, model.roi_heads, seed=4)
        assert torch.equal(same(pooled), out)
        assert not torch.equal(other(pooled), out)
    # torchvision's default Linear init: bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert head.cls_score.bias.abs().max() <= D**-0.5


@pytest.mark.parametrize(
    "kind, layers, trainable",
    [
        ("3fc_ft", "all3", {"fc6", "fc7", "cls_score"}),
        ("3fc_ft", "last2", {"fc7", "cls_score"}),
        ("3fc_ft", "last1", {"cls_score"}),
        ("3fc_rand", "all3", {"fc6", "fc7", "cls_score"}),
        ("3fc_rand", "last2", {"fc7", "cls_score"}),
        ("3fc_rand", "last1", {"cls_score"}),
        ("2fc_rand", "all3", {"fc6", "cls_score"}),
        ("2fc_rand", "last2", {"fc6", "cls_score"}),
        ("2fc_rand", "last1", {"cls_score"}),
        ("ncm", "all3", set()),
    ],
)
def test_layer_freezing(model, kind, layers, trainable):
    head = build_calibrated_head(kind, model.roi_heads, layers=layers)
    sizes = {"fc6": C_FPN * 49 * D + D, "fc7": D * D + D, "cls_score": D * (C + 1) + C + 1}
    params = head.trainable_parameters()
    assert len(params) == 2 * len(trainable)  # weight and bias per trainable layer
    assert sum(p.numel() for p in params) == sum(sizes[n] for n in trainable)
    names = {n.split(".")[0] for n, p in head.named_parameters() if p.requires_grad}
    assert names == trainable
    frozen = {n.split(".")[0] for n, p in head.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in head.named_children()} - trainable


def test_unknown_kind_or_layers(model):
    with pytest.raises(InputError, match="head"):
        build_calibrated_head("4fc", model.roi_heads)
    with pytest.raises(InputError, match="layers"):
        build_calibrated_head("3fc_ft", model.roi_heads, layers="first1")
    with pytest.raises(ValueError, match="source"):
        CalibratedHead("3fc_ft", in_features=10, representation_size=4, num_outputs=3)


def test_ncm_picks_the_nearest_mean_and_unseen_classes_get_the_minimum(model):
    head = build_calibrated_head("ncm", model.roi_heads)
    assert head.trainable_parameters() == []
    # classes 0 (background), 1 and 3 are seen; their means are 4 * e_{10+c}
    means = {c: 4.0 * torch.eye(D)[10 + c] for c in (0, 1, 3)}
    offset = torch.zeros(D)
    offset[100] = 1.0
    feats, labels = [], []
    for c, m in means.items():
        feats += [m + offset, m - offset]  # two samples whose mean is exactly m
        labels += [c, c]
    feats_t, labels_t = torch.stack(feats), torch.tensor(labels)
    head.ncm_accumulate(feats_t[:3], labels_t[:3])  # in two batches
    head.ncm_accumulate(feats_t[3:], labels_t[3:])
    head.ncm_accumulate(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))  # empty batch: no-op
    head.ncm_finalize()
    assert head.ncm_counts.tolist() == [2, 2, 0, 2, 0, 0]
    assert head.ncm_valid.tolist() == [True, True, False, True, False, False]
    for c, m in means.items():
        assert torch.allclose(head.ncm_means[c], m)

    query = torch.stack([means[3] + 0.5 * offset, means[0] + 0.1, means[1] * 0.01])
    logits = head.classify(query)
    assert logits.shape == (3, C + 1)
    assert logits.argmax(1).tolist() == [3, 0, 1]
    assert torch.isfinite(logits).all()
    assert (logits[:, [2, 4, 5]] == UNSEEN_LOGIT).all()
    assert (logits[:, [0, 1, 3]] > UNSEEN_LOGIT).all() and (logits[:, [0, 1, 3]].abs() <= NCM_SCALE + 1e-4).all()
    assert torch.allclose(head.classify(means[1][None])[0, 1], torch.tensor(NCM_SCALE))  # cos = 1

    pooled = _pooled()
    with torch.no_grad():
        assert torch.equal(head.representation(pooled), model.roi_heads.box_head(pooled))  # frozen fc6/fc7 copies
        assert torch.equal(head(pooled), head.classify(head.representation(pooled)))


def test_ncm_errors(model):
    head = build_calibrated_head("ncm", model.roi_heads)
    with pytest.raises(RuntimeError, match="ncm_finalize"):
        head(_pooled())
    with pytest.raises(ValueError, match="0..5"):
        head.ncm_accumulate(torch.zeros(1, D), torch.tensor([6]))
    with pytest.raises(ValueError, match="features"):
        head.ncm_accumulate(torch.zeros(1, D + 1), torch.tensor([1]))
    # an fc kind has no class sums: the loop's hooks leave it as it was
    fc = build_calibrated_head("3fc_ft", model.roi_heads)
    assert not hasattr(fc, "ncm_accumulate") and not fc.needs_box_feats and fc.takes_snapshots
    before = {k: v.clone() for k, v in fc.state_dict().items()}
    fc.observe(None)
    fc.sync(lambda t: t * 0, rank=1, keep_on_rank0=True)
    fc.finalize()
    assert all(torch.equal(before[k], v) for k, v in fc.state_dict().items())


def test_ncm_hooks_sum_over_processes_and_keep_rank0s_checkpoint(model):
    """The loop's hooks on an NCM head: observe adds a batch, sync sums over processes (here a
    reduce that doubles, as two identical processes would), rank 1 keeps nothing after a checkpoint's sync."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.rand(6, D, generator=g), torch.tensor([1, 1, 2, 0, 3, 3])
    heads = [build_calibrated_head("ncm", model.roi_heads) for _ in range(2)]
    for h in heads:
        assert h.needs_box_feats and not h.takes_snapshots and h.trainable_parameters() == []
        h.observe(SimpleNamespace(box_feats=feats, labels=labels))
    heads[0].sync(lambda t: 2 * t, rank=0, keep_on_rank0=True)
    heads[1].sync(lambda t: 2 * t, rank=1, keep_on_rank0=True)
    assert heads[0].ncm_counts.tolist() == [2, 4, 2, 4, 0, 0]
    assert heads[1].ncm_counts.sum() == 0 and heads[1].ncm_sums.abs().sum() == 0
    heads[0].finalize()
    torch.testing.assert_close(heads[0].ncm_means[1], feats[:2].mean(0))
    assert heads[0].ncm_valid.tolist() == [True, True, True, True, False, False]


@pytest.mark.parametrize("kind, layers", list(zip(HEAD_KINDS, ["last2", "last1", "all3", "all3"])))
def test_save_load_round_trip(model, tmp_path, kind, layers):
    head = build_calibrated_head(kind, model.roi_heads, layers=layers, seed=5)
    g = torch.Generator().manual_seed(2)
    if kind == "ncm":
        feats = torch.rand(30, D, generator=g)
        head.ncm_accumulate(feats, torch.randint(0, 4, (30,), generator=g))
        head.ncm_finalize()
    else:
        with torch.no_grad():  # weights that no fresh build would give
            for p in head.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    path = tmp_path / "head.pth"
    save_head(head, path, {"steps": 12, "note": "x"})
    loaded, meta = load_head(path, model.roi_heads)
    assert isinstance(loaded, CalibratedHead)
    assert (loaded.kind, loaded.layers) == (kind, layers)
    assert meta["steps"] == 12 and meta["kind"] == kind and meta["layers"] == layers
    pooled = _pooled()
    with torch.no_grad():
        assert torch.equal(loaded(pooled), head(pooled))
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in head.parameters()]
    assert set(loaded.state_dict()) == set(head.state_dict())


def test_save_rejects_conflicting_meta(model, tmp_path):
    head = build_calibrated_head("2fc_rand", model.roi_heads)
    with pytest.raises(ValueError, match="kind"):
        save_head(head, tmp_path / "h.pth", {"kind": "3fc_ft"})


def test_malformed_head_files_raise_input_error_naming_the_file(model, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="garbage.pth"):
        load_head(garbage, model.roi_heads)

    with pytest.raises(InputError, match="missing.pth"):
        load_head(tmp_path / "missing.pth", model.roi_heads)

    other = tmp_path / "other.pth"
    torch.save({"model": {}}, other)
    with pytest.raises(InputError, match="other.pth.*format"):
        load_head(other, model.roi_heads)

    good = tmp_path / "good.pth"
    save_head(build_calibrated_head("3fc_rand", model.roi_heads), good, {})
    state = torch.load(good, weights_only=False)
    state["meta"]["kind"] = "5fc"
    bad_kind = tmp_path / "bad_kind.pth"
    torch.save(state, bad_kind)
    with pytest.raises(InputError, match="bad_kind.pth.*kind"):
        load_head(bad_kind, model.roi_heads)

    state = torch.load(good, weights_only=False)
    del state["state_dict"]["fc7.weight"]
    truncated = tmp_path / "truncated.pth"
    torch.save(state, truncated)
    with pytest.raises(InputError, match="truncated.pth.*state_dict"):
        load_head(truncated, model.roi_heads)

    # the right file for another detector (3 classes instead of 5)
    small = maskrcnn_small(num_classes=3, min_size=64, max_size=64)
    with pytest.raises(InputError, match="good.pth.*num_outputs"):
        load_head(good, small.roi_heads)
