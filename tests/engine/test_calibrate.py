"""SimCal calibration: frozen detector, bi-level object-level batches, resume, cache, dual-head predict."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from simcal.cli import main
from simcal.data.annotations import load_dataset
from simcal.data.dataset import DetectionDataset
from simcal.data.samplers import BiLevelSampler
from simcal.data.stats import class_instance_counts
from simcal.engine import calibrate as cal_mod
from simcal.engine.calibrate import calibrate
from simcal.engine.calibration_batches import calibration_batches
from simcal.engine.checkpoint import load_model
from simcal.engine.feature_cache import FrozenDetector
from simcal.modeling.calibration import load_head
from simcal.modeling.scoring import HeadSpec, build_scorers
from simcal.run import Run
from tests.conftest import check_ap_of_classes

torch.set_num_threads(1)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_detector_is_byte_identical_after_calibration(run, monkeypatch):
    captured = {}
    real = cal_mod.load_model

    def capture(*a, **kw):
        model, lm, cfg = real(*a, **kw)
        captured["model"] = model
        captured["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, lm, cfg

    during = []
    real_batch = cal_mod.calibration_batches

    def frozen_during(frozen, *a, **kw):  # the state of the detector while the head trains
        model = frozen.model
        during.append((model.training, any(p.requires_grad for p in model.parameters())))
        return real_batch(frozen, *a, **kw)

    monkeypatch.setattr(cal_mod, "load_model", capture)
    monkeypatch.setattr(cal_mod, "calibration_batches", frozen_during)
    file_hash = _sha(Run(run).model_final)
    head_path = calibrate(run, progress=False)
    after = captured["model"].state_dict()
    assert after.keys() == captured["before"].keys()
    for k, v in captured["before"].items():
        assert torch.equal(v, after[k]), k
    assert _sha(Run(run).model_final) == file_hash
    assert during == [(False, False)] * 6  # eval mode, no gradient, at every step
    head, meta = load_head(head_path, captured["model"].roi_heads)
    assert meta["kind"] == "3fc_ft" and meta["step"] == 6
    # the head did train: it moved away from the original classifier it was copied from
    orig = captured["model"].roi_heads.box_predictor.cls_score.weight
    assert not torch.equal(head.cls_score.weight, orig)
    log = [json.loads(line) for line in (head_path.parent / "calibration_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(r["fg"] == r["bg"] for r in log)


def test_bilevel_batch_keeps_only_the_sampled_class_and_one_to_one_background(run):
    model, label_map, cfg = load_model(run)
    model.eval()
    train = load_dataset(cfg.data.train_json)
    ds = DetectionDataset(train, cfg.data.train_images, label_map=label_map, with_masks=False)
    frozen = FrozenDetector(model, ds, cache_mb=100, device=torch.device("cpu"))
    draws = BiLevelSampler(train, classes_per_batch=6, seed=0).batch(0)
    batch = calibration_batches(frozen, draws, [False] * 6, list(range(6)), label_map, bg_seed=1, box_feats=True)[0]
    labels, slot = batch.labels, batch.slot
    fg = labels > 0
    assert fg.sum() > 0
    assert (labels == 0).sum() == fg.sum()  # 1:1 background
    assert batch.pooled.shape[0] == labels.shape[0] == batch.box_feats.shape[0] == slot.shape[0]
    # each image keeps foreground RoIs of its own sampled class only
    wanted = torch.tensor([label_map.to_label(c) for _, c in draws])
    assert torch.equal(labels[fg], wanted[slot[fg]])
    # the sampler did draw foreground RoIs of other classes in those images: exactly those were dropped
    roi_heads = frozen.model.roi_heads
    dropped = 0
    for i, (item, want) in enumerate(zip(frozen.fetch([(index, False) for index, _ in draws]), wanted.tolist())):
        _, props, gt_boxes, gt_labels, _ = item
        _, sampled, fg_idx, _ = roi_heads.sample_rois(props, gt_boxes, gt_labels, seed=i)
        assert int(((slot == i) & fg).sum()) == int((sampled[fg_idx] == want).sum())
        dropped += int((sampled[fg_idx] != want).sum())
    assert dropped > 0, "no sampled image yields RoIs of another class: the test checks nothing"
    # the frozen part was computed once per (image, flip) and is served from the cache afterwards
    misses = frozen.misses
    calibration_batches(frozen, draws, [False] * 6, list(range(6)), label_map, bg_seed=1)
    assert frozen.misses == misses and frozen.hits >= 6


def test_a_process_share_of_a_batch_is_its_slots_of_the_one_process_batch(run, monkeypatch):
    """What torchrun's processes compute, in one process: with the slots split (the per-slot
    counts summed over the parts, as the all-reduce does), the parts together are the whole
    batch RoI for RoI, each part knows the batch's totals, and a part without slots is empty."""
    model, label_map, cfg = load_model(run)
    model.eval()
    train = load_dataset(cfg.data.train_json)
    ds = DetectionDataset(train, cfg.data.train_images, label_map=label_map, with_masks=False)
    frozen = FrozenDetector(model, ds, cache_mb=100, device=torch.device("cpu"))
    draws = BiLevelSampler(train, classes_per_batch=6, seed=0).batch(0)
    args = (frozen, draws, [False, True] * 3, list(range(6)), label_map, 1)
    counts = {}
    real = cal_mod.dist_utils.all_reduce_sum
    monkeypatch.setattr(cal_mod.dist_utils, "all_reduce_sum", lambda t: counts.setdefault("all", real(t)))
    whole = calibration_batches(*args, box_feats=True)[0]  # the first call records the whole batch's counts
    assert whole.total == whole.labels.numel() and whole.fg == whole.bg > 0
    parts = [calibration_batches(*args, box_feats=True, mine=m)[0] for m in ([0, 3, 4], [1, 2, 5], [])]
    for part in parts:
        assert (part.total, part.fg, part.bg) == (whole.total, whole.fg, whole.bg)
    assert parts[2].labels.numel() == 0 and parts[2].pooled.shape[1:] == whole.pooled.shape[1:]
    assert parts[2].box_feats.shape == (0, whole.box_feats.shape[1])
    for i in range(6):
        part = parts[0] if i in (0, 3, 4) else parts[1]
        a, b = whole.slot == i, part.slot == i
        assert torch.equal(whole.labels[a], part.labels[b]) and torch.equal(whole.boxes[a], part.boxes[b])
        torch.testing.assert_close(whole.pooled[a], part.pooled[b])


def test_slot_owners_are_balanced_sticky_and_complete():
    from simcal.engine.calibration_batches import slot_owners

    g = torch.Generator().manual_seed(0)
    schedule = [[(int(i), False) for i in torch.randint(0, 40, (16,), generator=g)] for _ in range(200)]
    for world in (1, 2, 3, 8):
        table = slot_owners(schedule, world)
        assert [len(t) for t in table] == [16] * 200
        for t in table:
            load = torch.bincount(torch.tensor(t), minlength=world)
            assert load.max() <= -(-16 // world) and int(load.sum()) == 16
        # sticky: an image is computed again by the process that has it cached far more often than
        # by chance (1 / world; measured 0.90, 0.89, 0.73 for 2, 3, 8 processes): the caches serve again
        first, again = {}, []
        for keys, t in zip(schedule, table):
            for (index, _), r in zip(keys, t):
                if index in first:
                    again.append(first[index] == r)
                first.setdefault(index, r)
        assert sum(again) / len(again) > (0.8 if world < 8 else 0.6), world


def test_resume_and_cache_do_not_change_the_head(run, tmp_path, monkeypatch):
    ref = calibrate(run, name="ref", progress=False)
    nocache = calibrate(run, ["calibration.cache_mb=0"], name="nocache", progress=False)

    calls = {"n": 0}
    real = cal_mod.calibration_batches

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(cal_mod, "calibration_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(run, name="resumed", progress=False)
    monkeypatch.setattr(cal_mod, "calibration_batches", real)
    assert not (run / "calibration" / "resumed" / "head.pth").exists()
    resumed = calibrate(run, name="resumed", resume=True, progress=False)

    model, _, _ = load_model(run)
    heads = [load_head(p, model.roi_heads)[0].state_dict() for p in (ref, nocache, resumed)]
    for other in heads[1:]:
        for k in heads[0]:
            assert torch.equal(heads[0][k], other[k]), k


def test_dual_head_takes_calibrated_columns_for_tail_classes_only(run):
    calibrate(run, progress=False)
    model, label_map, cfg = load_model(run)
    model.roi_heads.detections_per_img = 100_000  # no cap: per-class NMS makes classes independent
    cal_head = load_head(Run(run).calibration("3fc_ft").head, model.roi_heads)[0].eval()
    train = load_dataset(cfg.data.train_json)
    counts = torch.tensor(class_instance_counts(train, label_map.category_ids), dtype=torch.float32)
    T = float(torch.median(counts))
    specs = [HeadSpec("orig"), HeadSpec("cal"), HeadSpec("dual", "sel", T)]
    val = load_dataset(cfg.data.val_json)
    ds = DetectionDataset(val, cfg.data.val_images, label_map=label_map, with_masks=False)
    out = model.detect([ds[0][0], ds[1][0]], build_scorers(specs, {"": cal_head}, counts))
    tag = specs[2].tag
    for i in range(2):
        for label in range(1, label_map.num_classes + 1):
            src = "cal" if counts[label - 1] <= T else "orig"
            d, s = out[tag][i], out[src][i]
            a, b = d["labels"] == label, s["labels"] == label
            torch.testing.assert_close(d["scores"][a], s["scores"][b])
            torch.testing.assert_close(d["boxes"][a], s["boxes"][b])


def test_calibrate_and_predict_heads_from_the_cli(run, capsys, monkeypatch):
    assert main(["calibrate", "--run", str(run), "--no-progress"]) == 0
    assert main(["calibrate", "--run", str(run), "--no-progress"]) == 2  # no silent overwrite
    assert "already done" in capsys.readouterr().err
    # flags and section.key=value overrides together, loss keyword arguments included: they are used
    import simcal.modeling.losses as losses

    gammas = []
    real_forward = losses.FocalLoss.forward
    monkeypatch.setattr(
        losses.FocalLoss, "forward", lambda self, *a: gammas.append(self.gamma) or real_forward(self, *a)
    )
    argv = ["calibrate", "--run", str(run), "--loss", "focal", "--sampler", "random", "--steps", "2"]
    assert main([*argv, "calibration.loss_kwargs={gamma: 2}", "--no-progress"]) == 0
    assert gammas == [2.0, 2.0]
    summary = json.loads((run / "calibration" / "3fc_ft_focal_gamma2_random" / "summary.json").read_text())
    assert summary["calibration"]["loss_kwargs"] == {"gamma": 2} and summary["steps"] == 2
    assert main(["calibrate", "--run", str(run), "--head", "ncm", "--steps", "3", "--no-progress"]) == 0

    import simcal.engine.predict as pred

    passes = {"n": 0}
    real = pred.load_model

    def counting(*a, **kw):
        model, lm, cfg = real(*a, **kw)
        model.backbone.register_forward_hook(lambda *_: passes.__setitem__("n", passes["n"] + 1))
        return model, lm, cfg

    monkeypatch.setattr(pred, "load_model", counting)
    argv = [
        "predict",
        "--run",
        str(run),
        "--head",
        "orig,cal,dual,norcal",
        "--max-images",
        "6",
        "--batch-size",
        "3",
        "--calibration",
        "3fc_ft",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert passes["n"] == 2  # 6 images in batches of 3, all four heads from the same pass
    for tag in ("orig", "cal", "dual", "norcal_1"):
        m = json.loads((run / "predictions" / "val-first6" / tag / "metrics_segm.json").read_text())
        assert m["num_images"] == 6 and len(m["per_class"]) == 6
        check_ap_of_classes(m)
    # another calibrated head goes beside the default's results, not over them
    before = (run / "predictions" / "val-first6" / "cal" / "results.json").read_bytes()
    other = "3fc_ft_focal_gamma2_random"
    assert main([*argv[:4], "cal,dual", *argv[5:9], "--calibration", other, "--no-progress"]) == 0
    assert (run / "predictions" / "val-first6" / "cal" / "results.json").read_bytes() == before
    for tag in (f"cal@{other}", f"dual@{other}"):
        assert len(json.loads((run / "predictions" / "val-first6" / tag / "results.json").read_text())) > 0
    # every file the run holds (weights, checkpoints, heads, results, metrics, logs) has the mode
    # the umask gives a new file, and no temporary file is left
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model_final.pth", "head.pth", "results.json", "metrics_segm.json"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    assert not [p for p in files if p.name.endswith(".tmp")]
    with pytest.raises(SystemExit) as stop:  # the flag's choices come from simcal.choices
        main(["predict", "--run", str(run), "--head", "dual", "--combine", "bogus", "--no-progress"])
    assert stop.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), "--head", "dual", "inference.combine=bogus", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "simcal: error: (command line): inference.combine: expected one of sel, avg, cal-only, orig, "
        "sel-thr, sel-scale, sel-norm, det, got 'bogus'\n"
    )


def test_heads_share_the_mask_head_work(run):
    calibrate(run, progress=False)
    model, label_map, cfg = load_model(run)
    cal_head = load_head(Run(run).calibration("3fc_ft").head, model.roi_heads)[0].eval()
    counts = torch.tensor(class_instance_counts(load_dataset(cfg.data.train_json), label_map.category_ids))
    val = load_dataset(cfg.data.val_json)
    ds = DetectionDataset(val, cfg.data.val_images, label_map=label_map, with_masks=False)
    rows = []
    model.roi_heads.mask_head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    specs = [HeadSpec("orig"), HeadSpec("dual", "sel", -1.0)]  # T = -1: dual keeps exactly orig's detections
    out = model.detect([ds[0][0]], build_scorers(specs, {"": cal_head}, counts.float()))
    a, b = out["orig"][0], out[specs[1].tag][0]
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"])
    assert rows == [a["labels"].numel()]  # one mask-head pass over the union, not one per head


@pytest.mark.parametrize("miss_batch", [16, 1])
def test_frozen_outputs_do_not_depend_on_the_other_images_fetched(run, miss_batch):
    """An (image, flip)'s features and proposals are the same bits whether it missed the cache
    alone or with 1, 2 or 7 other images: batched misses keep calibration exactly reproducible."""
    model, label_map, cfg = load_model(run)
    model.eval()
    ds = DetectionDataset(
        load_dataset(cfg.data.train_json), cfg.data.train_images, label_map=label_map, with_masks=False
    )

    def fetch(keys):
        frozen = FrozenDetector(model, ds, cache_mb=0, device=torch.device("cpu"), miss_batch=miss_batch)
        return frozen.fetch(keys)[keys.index((3, True))]

    alone = fetch([(3, True)])
    for keys in (
        [(0, False), (3, True)],
        [(0, False), (3, True), (5, False)],
        [(3, True)] + [(i, i % 2 == 0) for i in range(7)],
    ):
        together = fetch(keys)
        for k in alone[0]:
            assert torch.equal(alone[0][k], together[0][k]), (keys, k)
        assert torch.equal(alone[1], together[1])


def _frozen(run, cache_mb, schedule=None):
    model, label_map, cfg = load_model(run)
    model.eval()
    ds = DetectionDataset(
        load_dataset(cfg.data.train_json), cfg.data.train_images, label_map=label_map, with_masks=False
    )
    return FrozenDetector(model, ds, cache_mb=cache_mb, device=torch.device("cpu"), schedule=schedule)


def _belady_misses(schedule, capacity):
    """Misses of the optimal offline cache holding ``capacity`` items (reference by brute force:
    evict, or skip storing, whichever item is next used farthest away)."""
    held, misses = set(), 0

    def next_use(k, step):
        later = [s for s in range(step + 1, len(schedule)) if k in schedule[s]]
        return later[0] if later else float("inf")

    for step, keys in enumerate(schedule):

        def nxt(k, step=step):
            return next_use(k, step)

        for k in dict.fromkeys(keys):
            if k in held:
                continue
            misses += 1
            if nxt(k) == float("inf"):
                continue
            if len(held) >= capacity:
                far = max(held, key=nxt)
                if nxt(far) <= nxt(k):
                    continue
                held.remove(far)
            held.add(k)
        held = {k for k in held if nxt(k) != float("inf")}
    return misses


def test_planned_cache_is_optimal_for_its_memory_and_exact(run):
    """With the schedule known, the cache keeps an output only until its last use and evicts the
    one needed farthest ahead: its misses equal Belady's optimum; outputs equal uncached ones."""
    schedule = [
        [(0, False), (1, False)],
        [(2, False), (0, False)],
        [(1, False), (3, True)],
        [(2, False), (0, False)],
        [(3, True), (1, False)],
        [(4, False), (0, False)],
    ]
    plain = _frozen(run, cache_mb=0)
    reference = {k: plain.fetch([k])[0] for keys in schedule for k in keys}
    sizes = [plain._size(item) for item in reference.values()]
    one = max(sizes)
    assert 4 * min(sizes) > 3 * one  # proposal counts differ a little: the limit still fits exactly `capacity`
    for capacity in (1, 2, 3):
        frozen = _frozen(run, cache_mb=1, schedule=schedule)
        frozen.limit = capacity * one  # room for exactly `capacity` outputs
        for step, keys in enumerate(schedule):
            out = frozen.fetch(keys, step=step)
            for k, item in zip(keys, out):
                for level in item[0]:
                    assert torch.equal(item[0][level], reference[k][0][level])
                assert torch.equal(item[1], reference[k][1])
            assert frozen.cache_bytes <= frozen.limit
            # nothing is kept past its last use
            assert all(frozen.next_use(k, step) != float("inf") for k in frozen.cache)
        assert frozen.misses == _belady_misses(schedule, capacity), capacity
    # with room for everything, each (image, flip) is computed once
    frozen = _frozen(run, cache_mb=100, schedule=schedule)
    for step, keys in enumerate(schedule):
        frozen.fetch(keys, step=step)
    assert frozen.misses == len({k for keys in schedule for k in keys}) and not frozen.cache


def test_more_processes_than_slots_is_one_line(run, monkeypatch, capsys):
    monkeypatch.setattr(cal_mod.dist_utils, "world_size", lambda: 5)  # the trained run: 4 classes per step
    assert main(["calibrate", "--run", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "calibration.classes_per_batch" in err and "at most 4 processes" in err
    assert not (run / "calibration" / "3fc_ft" / "head.pth").exists()


def test_a_long_calibrations_schedule_is_generated_a_window_ahead(tiny_data):
    """The whole schedule of 10^6 steps was built up front (10 KB a step: 10 GB); now a window."""
    from simcal.config import CalibrationConfig
    from simcal.data.annotations import load_dataset
    from simcal.engine.calibration_batches import CalibrationSchedule, slot_owners

    train = load_dataset(tiny_data / "train.json")
    c = CalibrationConfig(steps=10**6, classes_per_batch=4)
    sched = CalibrationSchedule(c, train, len(train["images"]), world=2, rank=1, window=16)
    steps = [sched.step(s) for s in range(40)]
    assert len(sched._ahead) <= 16 and sched._next == 40 + 15
    # the same draws, flips and slots as the whole schedule's first steps
    whole = CalibrationSchedule(CalibrationConfig(steps=40, classes_per_batch=4), train, len(train["images"]), 2, 1)
    assert [whole.step(s) for s in range(40)] == steps
    keys = [[(d[0], f) for d, f in zip(draws, flips)] for draws, flips, _ in steps]
    table = slot_owners(keys, 2)
    assert [[p for p, r in enumerate(t) if r == 1] for t in table] == [mine for _, _, mine in steps]
