"""``simcal import --from detectron2`` against detectron2 itself: the fixture in
``tests/fixtures/detectron2`` (a copy of ``shared/reference/detectron2``, used as it is) holds
what detectron2 computed, stage by stage, for two models whose weights its ``make_weights.py``
regenerates. The weights are built by that rule, imported through the CLI, and every stage of
simcal's detector is compared with detectron2's within the fixture README's tolerances.

Stages are checked one at a time, each on detectron2's own input where the fixture has it (the
box head on detectron2's proposals, each cascade stage on its input boxes, the mask head on the
final boxes), so that a stage's error is its own; the final instances come from simcal's
whole pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simcal.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "detectron2"
LVIS, CASCADE = "lvis05_mask_rcnn_R_50_FPN_1x", "coco_cascade_mask_rcnn_R_50_FPN_3x"
IMAGES = ("shapes_480x640", "shapes_427x555")
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
LEVELS = ("p2", "p3", "p4", "p5", "p6")


def _make_weights_module():
    spec = importlib.util.spec_from_file_location("d2_make_weights", FIXTURE / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_d2_checkpoint(model: str, path: Path, edit=None) -> Path:
    """The fixture's detectron2 model-zoo pickle of ``model`` by its weight rule (seed 0)."""
    mw = _make_weights_module()
    keys = json.loads((FIXTURE / "keys" / f"{model}.json").read_text())
    weights = mw.make_weights(keys, 0)
    if edit is not None:
        weights = edit(weights)
    with open(path, "wb") as f:
        pickle.dump(
            {"model": weights, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f, protocol=4
        )
    return path


def categories_json(path: Path, category_ids: list[int], annotated: bool = True) -> Path:
    """The two fixture images as an LVIS-style json with ``category_ids``; a few boxes of a few
    classes, so that calibration has something to sample."""
    images = [
        {"id": 1, "file_name": "shapes_480x640.png", "height": 480, "width": 640},
        {"id": 2, "file_name": "shapes_427x555.png", "height": 427, "width": 555},
    ]
    for im in images:
        im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    anns = []
    boxes = [
        (1, 0, [40, 50, 120, 90]),
        (1, 5, [300, 200, 100, 150]),
        (2, 0, [200, 100, 80, 80]),
        (2, -1, [10, 300, 150, 100]),
    ]
    for k, (img, c, (x, y, w, h)) in enumerate(boxes if annotated else []):
        anns.append(
            {
                "id": k + 1,
                "image_id": img,
                "category_id": category_ids[c],
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            }
        )
    cats = [{"id": i, "name": f"class {i}", "frequency": "r"} for i in category_ids]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def import_run(tmp: Path, model: str, checkpoint: Path, *overrides: str) -> Path:
    ids = list(range(1, 1231)) if model == LVIS else COCO_IDS
    gt = categories_json(tmp / f"{model}.json", ids)
    out = tmp / f"run_{model}"
    images = str(FIXTURE / "images")
    argv = ["import", "--from", "detectron2", str(checkpoint), "--out", str(out)]
    argv += ["--framework-config", str(FIXTURE / "configs" / f"{model}.yaml")]
    argv += [f"data.train_json={gt}", f"data.train_images={images}", f"data.val_json={gt}", f"data.val_images={images}"]
    assert main([*argv, *overrides]) == 0
    return out


@pytest.fixture(scope="module")
def d2_checkpoints(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("d2_weights")
    return {m: write_d2_checkpoint(m, tmp / f"{m}_seed0.pkl") for m in (LVIS, CASCADE)}


@pytest.fixture(scope="module")
def imported(d2_checkpoints, tmp_path_factory) -> dict[str, tuple]:
    """Each fixture model imported through the CLI and loaded as every command loads a run."""
    from simcal.engine.checkpoint import load_model

    tmp = tmp_path_factory.mktemp("d2_runs")
    out = {}
    for m, ckpt in d2_checkpoints.items():
        run = import_run(tmp, m, ckpt)
        model, label_map, _ = load_model(run)
        out[m] = (run, model, label_map)
    return out


def _image(name: str) -> torch.Tensor:
    """The PNG as simcal's dataset reads it: RGB floats k / 255."""
    array = np.array(Image.open(FIXTURE / "images" / f"{name}.png").convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255)


def _close(ours: torch.Tensor, ref: np.ndarray, atol: float, what: str) -> None:
    ours_np = ours.detach().double().numpy()
    assert ours_np.shape == ref.shape, what
    worst = float(np.abs(ours_np - ref).max()) if ref.size else 0.0
    assert worst <= atol, f"{what}: {worst:.3g} > {atol:.3g}"


def _swaps(order: list[int]) -> int:
    """Pairs out of order (inversions) in ``order``."""
    return sum(a > b for i, a in enumerate(order) for b in order[i + 1 : i + 50])


@pytest.fixture(autouse=True)
def _two_threads():
    """The reference was computed with 2 threads: the float rounding of the convolutions, and so
    the near-ties of the RPN, depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _d2_order(scores: torch.Tensor) -> torch.Tensor:
    """simcal's scores ``(R, C+1)`` (background first) in detectron2's column order (background last)."""
    return torch.cat([scores[:, 1:], scores[:, :1]], 1)


@pytest.mark.slow
@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("model_name", [LVIS, CASCADE])
def test_every_stage_matches_detectron2(imported, model_name, image):
    from simcal.modeling.conventions import rescale_detections
    from simcal.modeling.detector import paste_masks
    from simcal.modeling.roi_heads import original_scores, selected_mask_logits

    run, model, label_map = imported[model_name]
    ref = np.load(FIXTURE / "ref" / f"{model_name}__{image}.npz")
    shared = np.load(FIXTURE / "ref" / f"shared__{image}.npz")
    img = _image(image)
    rh = model.roi_heads
    with torch.no_grad():
        # input: detectron2's rounded resize of the uint8 image, BGR, its mean and std, padded to 32
        batch, _ = model.transform([img])
        assert tuple(batch.image_sizes[0]) == tuple(ref["image_size"])
        assert tuple(batch.tensors.shape) == tuple(ref["input_shape"])
        y, x = ref["input_crop_yx"]
        _close(batch.tensors[0, :, y : y + 32, x : x + 32], ref["input_crop"], 1.5e-4, "input crop")
        _close(batch.tensors[0].double().sum((1, 2)), ref["input_sum_c"], 1e-2, "input channel sums")

        # FPN levels: 1e-5 of the level's largest value
        feats = model.backbone(batch.tensors)
        levels = list(feats.values())
        for lv, f in zip(LEVELS, levels):
            assert tuple(f.shape) == tuple(ref[f"{lv}_shape"]), lv
            scale = float(np.abs(shared[lv]).max()) if lv in shared.files else float(f.abs().max())
            if f"{lv}_crop" in shared.files:
                cy, cx = shared[f"{lv}_crop_yx"]
                _close(f[0, :, cy : cy + 16, cx : cx + 16], shared[f"{lv}_crop"], 1e-5 * scale, f"{lv} crop")
            if lv in shared.files:
                _close(f, shared[lv], 1e-5 * scale, f"{lv} in full")
            sums = ref[f"{lv}_sum_c"]
            _close(f[0].double().sum((1, 2)), sums, 1e-6 * float(np.abs(sums).max()) + 1e-3, f"{lv} channel sums")

        # anchors: identical (counts, the first 50 of each level)
        anchors = model.rpn.anchor_generator(batch, levels)[0]
        counts = [f.shape[-2] * f.shape[-1] * 3 for f in levels]
        assert counts == ref["anchors_count"].tolist()
        for lv, a in zip(LEVELS, anchors.split(counts)):
            assert torch.equal(a[:50], torch.from_numpy(ref[f"anchors_{lv}"])), lv

        # RPN head outputs on the levels stored in full: 5e-5
        logits, deltas = model.rpn.head(levels)
        stored = [lv for lv in LEVELS if f"rpn_head_logits_{lv}" in shared.files]
        assert stored
        for lv, lg, dl in zip(LEVELS, logits, deltas):
            if lv in stored:
                _close(lg, shared[f"rpn_head_logits_{lv}"], 5e-5, f"RPN logits {lv}")
                _close(dl, shared[f"rpn_head_deltas_{lv}"], 5e-5, f"RPN deltas {lv}")

        # proposals: the same set within 1e-2 px, in detectron2's order but for swaps of near-tied
        # logits (about 20 of the 1000 gaps are under 1e-5)
        props = model.rpn(batch, feats)[0][0]
        ref_props = torch.from_numpy(ref["rpn_boxes"])
        assert props.shape == ref_props.shape
        # (with 2 threads, as the reference was run, all 1000 on this project's CPU; another CPU's
        # rounding may resolve a near-tie at a level's top-1000 cut or in NMS otherwise: with 1
        # thread here 998 of 1000 match)
        distance, match = torch.cdist(ref_props, props, p=float("inf")).min(1)
        found = match[distance < 1e-2].tolist()
        assert len(found) >= 995 and len(set(found)) == len(found) and _swaps(found) <= 5, len(found)

        # RoIAlign: the level of each of the first 100 proposals, the pooled features
        first = ref_props[:100]
        assert rh.box_roi_pool.levels(first).tolist() == ref["box_level"].tolist()
        pooled = rh.box_roi_pool(feats, [first], batch.image_sizes)
        index = shared["box_pooled_index"]
        _close(pooled[index], shared["box_pooled"], 1e-5 * float(np.abs(shared["box_pooled"]).max()), "pooled")

        # the box head(s) on detectron2's proposals: probabilities and deltas 1e-5, boxes 1e-2 px
        if model_name == LVIS:
            rb = rh.roi_batch(feats, [first], batch.image_sizes)
            _close(_d2_order(rb.scores), ref["box_probs"], 1e-5, "box probabilities")
            _close(rb.deltas[:, 4:], ref["box_deltas"], 1e-5, "box deltas")
            assert bool((rb.deltas[:, :4] == 0).all())  # the background's (added) regressor
        else:
            probs = []
            for k in range(3):
                boxes_in = torch.from_numpy(ref[f"stage{k + 1}_boxes_in"])
                _, _, lg, dl = rh.stage_forward(k, feats, [boxes_in], batch.image_sizes)
                probs.append(torch.softmax(lg, -1))
                _close(_d2_order(probs[-1]), ref[f"stage{k + 1}_probs"], 1e-5, f"stage {k + 1} probabilities")
                _close(dl, ref[f"stage{k + 1}_deltas"], 1e-5, f"stage {k + 1} deltas")
                decoded = rh.stage_coders[k].decode(dl, [boxes_in]).reshape(-1, 4)
                _close(decoded, ref[f"stage{k + 1}_boxes"], 1e-2, f"stage {k + 1} boxes")
                if k < 2:  # the next stage's input: this stage's boxes clipped
                    nxt = rh.refine(k, dl, [boxes_in], batch.image_sizes)[0]
                    _close(nxt, ref[f"stage{k + 2}_boxes_in"], 1e-2, f"stage {k + 2} input")
            mean = rh.box_predictor.scores(torch.stack(probs).mean(0).log())
            _close(_d2_order(mean), ref["cascade_mean_probs"], 1e-5, "cascade mean probabilities")

        # the final instances from detectron2's proposals: same classes in the same order, boxes
        # within 1e-3 px, scores within 1e-5
        size = tuple(img.shape[-2:])
        dets = rh.detect(feats, [ref_props], batch.image_sizes, {"orig": original_scores}, with_masks=False)
        dets = rescale_detections(dets["orig"][0], batch.image_sizes[0], size, model.transform.clip_to_original)
        ids = label_map.category_ids
        expected_ids = [ids[int(k)] for k in ref["det_classes"]]  # detectron2 class k is category ids[k]
        assert [label_map.to_category(int(c)) for c in dets["labels"]] == expected_ids
        _close(dets["boxes"], ref["det_boxes"], 1e-3, "final boxes")
        _close(dets["scores"], ref["det_scores"], 1e-5, "final scores")

        # ... and end to end from the image: each of detectron2's detections found among simcal's
        # (same class, box within 1e-3 px, score within 1e-5), in the same order. With the
        # reference's 2 threads on this project's CPU all of them, at the same positions; another
        # CPU's rounding may resolve a near-tie of the RPN otherwise (1 thread here: 2 of the 1000
        # proposals differ, and 1 of 300 LVIS detections and 3 of 100 cascade ones), so 5 % may be missing
        out = rh.detect(feats, [props], batch.image_sizes, {"orig": original_scores})["orig"][0]  # = model.detect
        out = rescale_detections(out, batch.image_sizes[0], size, model.transform.clip_to_original)
        out["masks"] = paste_masks(out["masks"][:, 0], out["boxes"], *size)
        ours = [label_map.to_category(int(c)) for c in out["labels"]]
        found = []
        for cat, box, score in zip(expected_ids, torch.from_numpy(ref["det_boxes"]), ref["det_scores"]):
            hit = [
                j
                for j in range(len(ours))
                if ours[j] == cat
                and float((out["boxes"][j] - box).abs().max()) <= 1e-3
                and abs(float(out["scores"][j]) - float(score)) <= 1e-5
            ]
            found += hit[:1]
        assert len(found) >= 0.95 * len(expected_ids) and found == sorted(found), (len(found), len(expected_ids))

        # mask logits on detectron2's final boxes (1e-5 relative), pasted masks (0.1 % of pixels)
        boxes_in = torch.from_numpy(ref["det_boxes_input"][:20])
        labels = torch.from_numpy(ref["det_classes"][:20]) + 1
        x = rh.mask_roi_pool(feats, [boxes_in], batch.image_sizes)
        mask_logits = selected_mask_logits(rh.mask_predictor, rh.mask_head(x), labels)
        _close(mask_logits, ref["mask_logits"], 1e-5 * float(np.abs(ref["mask_logits"]).max()), "mask logits")
        shape = ref["mask_shape"]
        bits = np.unpackbits(ref["mask_bits"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        ours = out["masks"][: shape[0]].numpy()
        differ = (ours != bits).reshape(shape[0], -1).sum(1)
        assert (differ <= 1e-3 * bits[0].size).all(), differ.tolist()


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("model_name", [LVIS, CASCADE])
def test_import_calibrate_predict_report_from_the_cli(d2_checkpoints, tmp_path, capsys, model_name):
    """The imported detectors go through every later command as runs simcal trained (smaller
    images and fewer detections than the reference settings, to keep the CPU time small)."""
    run = import_run(tmp_path, model_name, d2_checkpoints[model_name], "model.min_size=320", "model.max_size=533")
    printed = capsys.readouterr().out
    assert "model.stride_in_1x1 = True" in printed and "MODEL.RESNETS.STRIDE_IN_1X1" in printed
    provenance = json.loads((run / "import.json").read_text())
    assert provenance["framework"] == "detectron2" and len(provenance["sha256"]) == 64
    assert provenance["num_classes"] == (1230 if model_name == LVIS else 80)
    steps = ["--steps", "2", "calibration.classes_per_batch=4"]
    assert main(["calibrate", "--run", str(run), *steps, "--no-progress"]) == 0
    heads = "orig,cal,dual"
    predict = ["predict", "--run", str(run), "--head", heads, "--no-progress", "model.detections_per_img=20"]
    assert main(predict) == 0
    assert main(["report", "--run", str(run), "--gallery", "1"]) == 0
    if model_name == LVIS:  # the analyses and the comparison read imported runs as trained ones
        assert main(["analyze", "recall", "--run", str(run), "--no-progress"]) == 0
        assert main(["compare", "--run", str(run), "--heads", "orig,dual", "--bootstrap", "20"]) == 0
        assert (run / "analysis" / "recall.json").exists() and (run / "analysis" / "compare.json").exists()
    for head in heads.split(","):
        results = json.loads((run / "predictions" / "val" / head / "results.json").read_text())
        per_image = [sum(r["image_id"] == i for r in results) for i in (1, 2)]
        assert all(0 < n <= 20 for n in per_image), per_image  # the cascade's threshold 0.05 leaves fewer
        assert (run / "predictions" / "val" / head / "metrics_segm.json").exists()
    assert "dual" in (run / "report" / "index.html").read_text()


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def lvis_weights(d2_checkpoints) -> dict[str, np.ndarray]:
    with open(d2_checkpoints[LVIS], "rb") as f:
        return pickle.load(f)["model"]


class _Exploit:  # a pickle that would run a command when loaded
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def _pickle(path: Path, obj) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def _edited(weights, drop=(), add=None, change=None):
    w = {k: v for k, v in weights.items() if k not in drop}
    w.update(add or {})
    for k, fn in (change or {}).items():
        w[k] = fn(w[k])
    return {"model": w}


def _nan(a):
    a = a.copy()
    a.flat[7] = np.nan
    return a


BAD_CHECKPOINTS = {
    "an unknown key": (
        lambda w: _edited(w, add={"roi_heads.attention.weight": np.zeros((2, 2), np.float32)}),
        "roi_heads.attention.weight: a key of no detectron2 R-CNN layout known to simcal",
    ),
    "a missing tensor": (
        lambda w: _edited(w, drop={"roi_heads.mask_head.deconv.weight"}),
        "roi_heads.mask_head.deconv.weight: missing",
    ),
    "an extra tensor": (
        lambda w: _edited(w, add={"roi_heads.box_head.1.fc1.weight": w["roi_heads.box_head.fc1.weight"]}),
        "roi_heads.box_head.1.fc1.weight: a tensor the architecture has no place for",
    ),
    "a shape that contradicts the others": (
        lambda w: _edited(w, change={"roi_heads.box_predictor.bbox_pred.weight": lambda a: a[:-4]}),
        "roi_heads.box_predictor.bbox_pred.weight: shape [4916, 1024] contradicts the other tensors",
    ),
    "a fc shape that contradicts the others": (
        lambda w: _edited(w, change={"roi_heads.box_head.fc2.weight": lambda a: a[:-1]}),
        "roi_heads.box_head.fc2.weight: shape [1023, 1024]",
    ),
    "non-finite weights": (
        lambda w: _edited(w, change={"backbone.fpn_output3.weight": _nan}),
        "backbone.fpn_output3.weight: 1 of 589824 values are not finite",
    ),
    "a pickle that is not a dict": (lambda w: [1, 2, 3], "(checkpoint): holds a list, not a dict of weights"),
    "a pickle that runs code": (
        lambda w: {"model": _Exploit()},
        "(checkpoint): refused: the pickle names posix.system; only arrays",
    ),
    "another layout": (
        lambda w: {"model": {"backbone.res2.0.conv1.weight": np.zeros((1,), np.float32)}},
        "backbone.res2.0.conv1.weight: not a detectron2 ResNet-FPN R-CNN checkpoint (no backbone.bottom_up.res2)",
    ),
    "deformable convolutions": (
        lambda w: _edited(
            w, add={"backbone.bottom_up.res3.0.conv2_offset.weight": np.zeros((18, 128, 3, 3), np.float32)}
        ),
        "backbone.bottom_up.res3.0.conv2_offset.weight: deformable convolutions (DEFORM_ON_PER_STAGE) are not",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_one_line_and_nothing_is_written(lvis_weights, tmp_path, capsys, case):
    make, message = BAD_CHECKPOINTS[case]
    ckpt = _pickle(tmp_path / "bad.pkl", make(lvis_weights))
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    out = tmp_path / "run"
    code = main(["import", "--from", "detectron2", str(ckpt), "--out", str(out), f"data.train_json={gt}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"simcal: error: {ckpt}: {message}" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_bad_settings_are_one_line(lvis_weights, d2_checkpoints, tmp_path, capsys):
    ckpt = d2_checkpoints[LVIS]
    gt80 = categories_json(tmp_path / "coco.json", COCO_IDS)
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    base = ["import", "--from", "detectron2", str(ckpt), "--out"]

    def error(*argv: str) -> str:
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err.strip()

    # the json's class count against the checkpoint's, naming both and the file
    assert error(str(tmp_path / "a"), f"data.train_json={gt80}") == (
        f"simcal: error: {gt80}: categories: 80 categories, but the checkpoint {ckpt} classifies 1230 classes "
        "(data.train_json: the json its classes come from)"
    )
    assert "data.train_json: needed to map the checkpoint's classes" in error(str(tmp_path / "b"))
    # settings of the config file that simcal cannot compute as detectron2 does
    zoo = str(FIXTURE / "configs" / f"{LVIS}.yaml")
    deform = {"_BASE_": zoo, "MODEL": {"RESNETS": {"DEFORM_ON_PER_STAGE": [False, True, True, True]}}}
    cfg = yaml_file(tmp_path / "deform.yaml", deform)
    err = error(str(tmp_path / "c"), "--framework-config", str(cfg), f"data.train_json={gt}")
    assert f"{cfg}: MODEL.RESNETS.DEFORM_ON_PER_STAGE: [False, True, True, True]: deformable convolutions" in err
    cfg = yaml_file(tmp_path / "classes.yaml", {"_BASE_": "base.yaml"})
    yaml_file(tmp_path / "base.yaml", {"_BASE_": zoo, "MODEL": {"ROI_HEADS": {"NUM_CLASSES": 1203}}})
    err = error(str(tmp_path / "d"), "--framework-config", str(cfg), f"data.train_json={gt}")
    assert f"{cfg}: MODEL.ROI_HEADS.NUM_CLASSES: 1203 classes, but {ckpt} classifies 1230" in err  # _BASE_ read
    # an --out that holds something
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "--out: already holds files" in error(str(tmp_path / "taken"), f"data.train_json={gt}")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    assert main(["import", "--from", "detectron2", str(truncated), "--out", str(tmp_path / "e")]) == 2
    assert f"simcal: error: {truncated}: (checkpoint): cannot read as a checkpoint" in capsys.readouterr().err
    for name in "abcde":
        assert not (tmp_path / name).exists()


def yaml_file(path: Path, obj) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(obj))
    return path


def test_a_training_checkpoint_gives_its_weights_and_says_so(lvis_weights, tmp_path, capsys):
    """detectron2's own checkpoints of a run (``torch.save``: model, optimizer, scheduler, iteration)."""
    state = {k: torch.from_numpy(v) for k, v in lvis_weights.items()}
    ckpt = tmp_path / "model_0004999.pth"
    torch.save(
        {"model": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "iteration": 4999}, ckpt
    )
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    out = tmp_path / "run"
    assert main(["import", "--from", "detectron2", str(ckpt), "--out", str(out), f"data.train_json={gt}"]) == 0
    printed = capsys.readouterr().out
    assert (
        "note: a training checkpoint at iteration 4999 (iteration, optimizer, scheduler beside the weights)" in printed
    )
    assert "no --framework-config: the detectron2 model zoo's settings are assumed" in printed
    saved = torch.load(out / "model_final.pth", weights_only=False)["model"]
    rows = torch.from_numpy(lvis_weights["roi_heads.box_predictor.cls_score.weight"])
    assert torch.equal(saved["roi_heads.box_predictor.cls_score.weight"], torch.cat([rows[-1:], rows[:-1]]))
    assert "MODEL.ROI_HEADS.SCORE_THRESH_TEST (detectron2 model zoo default)" in printed


def test_sigmoid_classifier_and_a_class_agnostic_box_regressor_beside_class_specific_masks(lvis_weights, tmp_path):
    """detectron2's ``USE_SIGMOID_CE`` (federated-loss models: C+1 rows, the last never scored) and
    ``CLS_AGNOSTIC_BBOX_REG`` with class-specific masks, against values computed from the
    detectron2 weights directly."""
    from simcal.engine.checkpoint import load_model

    w = dict(lvis_weights)
    w["roi_heads.box_predictor.bbox_pred.weight"] = lvis_weights["roi_heads.box_predictor.bbox_pred.weight"][4:8]
    w["roi_heads.box_predictor.bbox_pred.bias"] = lvis_weights["roi_heads.box_predictor.bbox_pred.bias"][4:8]
    ckpt = _pickle(tmp_path / "sigmoid.pkl", {"model": w})
    zoo = str(FIXTURE / "configs" / f"{LVIS}.yaml")
    over = {"MODEL": {"ROI_BOX_HEAD": {"USE_SIGMOID_CE": True, "CLS_AGNOSTIC_BBOX_REG": True}}}
    cfg = yaml_file(tmp_path / "sigmoid.yaml", {"_BASE_": zoo, **over})
    gt = categories_json(tmp_path / "lvis.json", list(range(1, 1231)))
    out = tmp_path / "run"
    argv = ["import", "--from", "detectron2", str(ckpt), "--out", str(out), "--framework-config", str(cfg)]
    assert main([*argv, f"data.train_json={gt}"]) == 0
    model, _, cfg_run = load_model(out)
    assert cfg_run.model.classifier == "sigmoid" and cfg_run.model.class_agnostic is False
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(5, 1024, generator=g)
    logits, deltas = model.roi_heads.box_predictor(feats)
    scores = model.roi_heads.box_predictor.scores(logits)
    d2_logits = feats @ torch.from_numpy(lvis_weights["roi_heads.box_predictor.cls_score.weight"]).T
    d2_logits += torch.from_numpy(lvis_weights["roi_heads.box_predictor.cls_score.bias"])
    torch.testing.assert_close(scores[:, 1:], torch.sigmoid(d2_logits[:, :1230]))  # label k+1 = detectron2 class k
    agnostic = feats @ torch.from_numpy(w["roi_heads.box_predictor.bbox_pred.weight"]).T
    agnostic += torch.from_numpy(w["roi_heads.box_predictor.bbox_pred.bias"])
    torch.testing.assert_close(deltas.reshape(5, 1231, 4), agnostic[:, None].expand(5, 1231, 4))  # every label's box


def test_the_body_from_block_counts_and_grouped_convs():
    """ResNet depth from the stages' block counts, ResNeXt groups and width from the 3x3 convs."""
    from simcal.modeling.importers.detectron2 import _architecture

    def weights(blocks, conv2_shape):
        w = {"backbone.fpn_lateral2.weight": torch.zeros(1)}
        for s, n in zip(range(2, 6), blocks):
            for b in range(n):
                w[f"backbone.bottom_up.res{s}.{b}.conv1.weight"] = torch.zeros(1)
        w["backbone.bottom_up.res2.0.conv2.weight"] = torch.zeros(conv2_shape)
        w["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(4, 8)
        w["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(12, 8)
        w["roi_heads.mask_head.predictor.weight"] = torch.zeros(3, 8, 1, 1)
        return w

    assert _architecture(weights((3, 4, 6, 3), (64, 64, 3, 3)), "x")["body"] == "resnet50"
    assert _architecture(weights((3, 4, 23, 3), (256, 8, 3, 3)), "x")["body"] == "resnext101_32x8d"
    assert _architecture(weights((3, 8, 36, 3), (64, 64, 3, 3)), "x")["body"] == "resnet152"
    from simcal.errors import InputError

    with pytest.raises(InputError, match=r"ResNet stages of \[3, 4, 5, 3\] blocks"):
        _architecture(weights((3, 4, 5, 3), (64, 64, 3, 3)), "x")
    with pytest.raises(InputError, match="a resnext50_16x4d body: not one torchvision builds"):
        _architecture(weights((3, 4, 6, 3), (64, 4, 3, 3)), "x")
