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
    from simcal.engine.predict import load_model

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


def _d2_order(scores: torch.Tensor) -> torch.Tensor:
    """simcal's scores ``(R, C+1)`` (background first) in detectron2's column order (background last)."""
    return torch.cat([scores[:, 1:], scores[:, :1]], 1)


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("model_name", [LVIS, CASCADE])
def test_every_stage_matches_detectron2(imported, model_name, image):
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

        # proposals: in detectron2's order but for a few swaps of near-tied logits, the same set,
        # coordinates within 1e-2 px
        props = model.rpn(batch, feats)[0][0]
        ref_props = torch.from_numpy(ref["rpn_boxes"])
        assert props.shape == ref_props.shape
        in_order = ((props - ref_props).abs().max(1).values < 1e-2).sum()
        assert in_order >= 990, int(in_order)
        nearest = torch.cdist(ref_props, props, p=float("inf")).min(1).values
        assert float(nearest.max()) < 1e-2

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

        # the final instances, end to end: same classes in the same order, boxes 1e-3 px, scores 1e-5
        out = model.detect([img], {"orig": original_scores})["orig"][0]
        n = len(ref["det_scores"])
        assert out["scores"].shape[0] == n
        classes = [label_map.to_category(int(c)) for c in out["labels"]]
        ids = label_map.category_ids
        assert classes == [ids[int(k)] for k in ref["det_classes"]]  # detectron2 class k is category ids[k]
        _close(out["boxes"], ref["det_boxes"], 1e-3, "final boxes")
        _close(out["scores"], ref["det_scores"], 1e-5, "final scores")

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
