"""Inference: mask pasting, RLE, streamed atomic results, and the end-to-end predict -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from simcal.cli import main
from simcal.data.annotations import load_dataset
from simcal.data.results import validate_results
from simcal.engine import predict as predict_mod
from simcal.engine.predict import infer_batch
from simcal.engine.results import encode_rle, results_file
from simcal.modeling.detector import paste_masks
from simcal.modeling.scoring import build_scorer

torch.set_num_threads(1)


def test_paste_masks_fills_the_box():
    masks = torch.ones(2, 28, 28)
    boxes = torch.tensor([[10.0, 5.0, 30.0, 20.0], [0.0, 0.0, 50.0, 40.0]])
    out = paste_masks(masks, boxes, 40, 50)
    assert out.shape == (2, 40, 50) and out.dtype == torch.bool
    expected = torch.zeros(40, 50, dtype=torch.bool)
    expected[5:20, 10:30] = True
    assert torch.equal(out[0], expected)
    assert out[1].all()
    # a mask that is on only in its left half lands on the left half of the box
    half = torch.zeros(1, 28, 28)
    half[:, :, :14] = 1
    out = paste_masks(half, boxes[:1], 40, 50)
    assert out[0, 5:20, 10:20].all() and not out[0, :, 20:].any()


def test_encode_rle_round_trip():
    m = torch.zeros(2, 7, 9, dtype=torch.bool)
    m[0, 1:4, 2:6] = True
    m[1, 5:, :3] = True
    rles = encode_rle(m)
    assert all(isinstance(r["counts"], str) for r in rles)
    back = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(back.transpose(2, 0, 1).astype(bool), m.numpy())


def test_results_file_is_atomic(tmp_path):
    path = tmp_path / "res.json"
    with pytest.raises(RuntimeError):
        with results_file(path) as w:
            w.write({"a": 1})
            raise RuntimeError("crash mid-way")
    assert not path.exists() and not list(tmp_path.iterdir())
    with results_file(path) as w:
        pass
    assert json.loads(path.read_text()) == []
    with results_file(path) as w:
        w.write({"a": 1})
        w.write({"b": 2})
    assert json.loads(path.read_text()) == [{"a": 1}, {"b": 2}]


def test_infer_batch_matches_torchvisions_own_roi_heads(trained_run, tiny_data):
    """predict's detections are torchvision's: a plain ``torchvision...RoIHeads`` built from the run's
    own modules (its postprocess, its mask inference, its paste) on the same proposals."""
    from torchvision.models.detection.roi_heads import RoIHeads

    from simcal.data.dataset import DetectionDataset

    model, label_map, _ = predict_mod.load_model(trained_run)
    ours_heads = model.roi_heads
    tv = RoIHeads(
        ours_heads.box_roi_pool, ours_heads.box_head, ours_heads.box_predictor,
        0.5, 0.5, 512, 0.25, None,  # training-only settings
        ours_heads.score_thresh, ours_heads.nms_thresh, ours_heads.detections_per_img,
        ours_heads.mask_roi_pool, ours_heads.mask_head, ours_heads.mask_predictor,
    ).eval()  # fmt: skip
    tv.box_coder = ours_heads.box_coder
    ds = DetectionDataset(load_dataset(tiny_data / "val.json"), tiny_data / "images", label_map=label_map)
    images = [ds[0][0], ds[1][0]]
    with torch.no_grad():
        ours = infer_batch(model, images)
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        detections, _ = tv(features, proposals, batch.image_sizes)
        ref = model.transform.postprocess(
            [dict(d) for d in detections], batch.image_sizes, [im.shape[-2:] for im in images]
        )
        raw = ours_heads.detect(features, proposals, batch.image_sizes, {"orig": build_scorer("orig")})["orig"]
    found = 0
    for a, b, r, d, im in zip(ours, ref, raw, detections, images):
        found += a["boxes"].shape[0]
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])
        # the mask head's 28 x 28 probabilities of each detection are torchvision's maskrcnn_inference's
        torch.testing.assert_close(r["masks"], d["masks"])
        # and predict's masks are our paste of them (compared with torchvision's paste in the next test)
        assert torch.equal(a["masks"], paste_masks(r["masks"][:, 0], a["boxes"], *im.shape[-2:]))
    assert found > 0


def test_paste_masks_agrees_with_torchvision_paste():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    masks = torch.zeros(3, 28, 28)
    masks[0, 7:21, 7:21] = 1
    masks[1, :, :10] = 1
    masks[2, 3:25, 12:16] = 1
    boxes = torch.tensor([[10.0, 12.0, 70.0, 52.0], [0.0, 0.0, 33.0, 90.0], [40.0, 5.0, 99.0, 64.0]])
    ours = paste_masks(masks, boxes, 90, 100)
    ref = paste_masks_in_image(masks[:, None], boxes, (90, 100))[:, 0] >= 0.5
    for a, b in zip(ours, ref):
        iou = (a & b).sum() / (a | b).sum()
        assert iou > 0.9  # bilinear sampling vs torchvision's resize-and-paste differ at the borders


def test_predict_cli_writes_results_and_metrics(run, tiny_data, tmp_path, monkeypatch, capsys):
    calls = {"backbone": 0}
    real_load = predict_mod.load_model

    def counting_load(*a, **kw):
        model, lm, cfg = real_load(*a, **kw)
        model.backbone.register_forward_hook(lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1))
        return model, lm, cfg

    monkeypatch.setattr(predict_mod, "load_model", counting_load)
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--split",
                "val",
                "--batch-size",
                "4",
                "--max-images",
                "10",
                "--no-progress",
            ]
        )
        == 0
    )
    assert calls["backbone"] == 3  # 10 images in batches of 4: one pass each, boxes and masks together
    out = run / "predictions" / "val-first10" / "orig"  # the first 10 images: beside val's, never over them
    assert not (run / "predictions" / "val").exists()
    results = json.loads((out / "results.json").read_text())
    gt = load_dataset(tiny_data / "val.json")
    validate_results(results, gt, "bbox")
    validate_results(results, gt, "segm")
    assert len(results) > 0 and {r["image_id"] for r in results} <= {im["id"] for im in gt["images"][:10]}
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 100  # the synthetic_cpu preset's detections per image
    # predict's own evaluation is `simcal evaluate` of its results on those 10 images
    first10 = {**gt, "images": gt["images"][:10]}
    kept = {im["id"] for im in first10["images"]}
    first10["annotations"] = [a for a in gt["annotations"] if a["image_id"] in kept]
    (tmp_path / "first10.json").write_text(json.dumps(first10))
    for iou in ("bbox", "segm"):
        metrics = json.loads((out / f"metrics_{iou}.json").read_text())
        assert metrics["num_images"] == 10 and len(metrics["per_class"]) == 6
        again = tmp_path / f"again_{iou}.json"
        argv = ["evaluate", "--gt", str(tmp_path / "first10.json"), "--results", str(out / "results.json")]
        assert main([*argv, "--iou", iou, "--train", str(tiny_data / "train.json"), "--out", str(again)]) == 0
        assert metrics["AP"] == pytest.approx(json.loads(again.read_text())["AP"], abs=1e-12)
    printed = capsys.readouterr().out
    assert "bbox AP" in printed and "segm AP" in printed


def _by_class(results: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in results:
        out.setdefault(r["category_id"], []).append(r)
    return out


def _key(r: dict) -> tuple:
    """A detection by image, class, box and score (its mask is the mask head's on that box and class)."""
    return r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"]


def test_topk_results_keeps_the_k_best_of_each_class_and_raises_its_floor(tmp_path):
    """Batches streamed through TopKResults: the file holds exactly each class's k best, in the
    order they came; the floor is the k-th best so far (and -inf until a class has k)."""
    rng = np.random.default_rng(0)
    top = predict_mod.TopKResults(tmp_path / "orig" / "results.json", num_classes=3, k=4)
    everything = []
    for batch in range(5):
        labels = torch.from_numpy(rng.integers(1, 3, size=7))  # classes 1 and 2 only; class 3 never seen
        records = [{"image_id": batch, "category_id": int(c) * 10, "score": float(rng.random())} for c in labels]
        everything += records
        top.add(labels, records)
        for c in (1, 2):
            scores = sorted((r["score"] for r in everything if r["category_id"] == c * 10), reverse=True)
            assert top.floor[c] == (scores[3] if len(scores) >= 4 else -np.inf)
    assert top.floor[3] == -np.inf and top.seen == 35
    top.finish()
    kept = json.loads((tmp_path / "orig" / "results.json").read_text())
    expected = [
        r for r in everything if r in sorted(_by_class(everything)[r["category_id"]], key=lambda d: -d["score"])[:4]
    ]
    assert kept == expected  # image order, exactly the top 4 of each class
    assert list((tmp_path / "orig").iterdir()) == [tmp_path / "orig" / "results.json"]  # the spool is gone


def test_predict_topk_per_class_equals_the_uncapped_detections_cut_per_class(run, tiny_data, monkeypatch):
    """--topk-per-class K gives what no per-image cap followed by the K best of each class gives,
    though its running threshold drops candidates before NMS; its metrics are AP-fixed and AP-pool
    with K per class, as `simcal evaluate` computes them from the file."""
    from simcal import api
    from simcal.evaluation.lvis_eval import evaluate, resolve_category_stats
    from simcal.evaluation.protocols import cap_per_class

    made = {}

    class Recorded(predict_mod.TopKResults):
        def __init__(self, path, *a, **kw):
            super().__init__(path, *a, **kw)
            made[path.parent.name] = self

    monkeypatch.setattr(predict_mod, "TopKResults", Recorded)
    k = 25
    heads = ["orig", "norcal"]
    api.predict(run, heads=heads, topk_per_class=k, progress=False)
    # every detection, no per-image cap: its boxes and scores only (masks of thousands of detections
    # would take most of the test's time; the top-k file's masks are evaluated below)
    uncapped = ["model.detections_per_img=1000000"]
    options = predict_mod.PredictOptions(ious=("bbox",), evaluate_results=False, progress=False, verbose=False)
    predict_mod.predict(run, heads=heads, split="val", overrides=uncapped, options=options)
    gt = load_dataset(tiny_data / "val.json")
    stats = resolve_category_stats(gt, str(tiny_data / "val.json"), load_dataset(tiny_data / "train.json"), "train")
    tags = sorted(p.name for p in (run / "predictions" / f"val-topk{k}").iterdir())
    assert tags == ["norcal_1", "orig"]
    for head in tags:
        top_dir = run / "predictions" / f"val-topk{k}" / head
        got = json.loads((top_dir / "results.json").read_text())
        every = json.loads((run / "predictions" / "val" / head / "results.json").read_text())
        per_image = _by_class([{**r, "category_id": r["image_id"]} for r in every])
        assert max(len(v) for v in per_image.values()) > 100  # the preset's per-image cap is really off
        assert made[head].seen < len(every) / 2  # the running floor dropped most candidates before NMS
        want = cap_per_class(every, k)
        got_c, want_c = _by_class(got), _by_class(want)
        assert got_c.keys() == want_c.keys() and all(len(v) == k for v in got_c.values())
        for c in want_c:  # the same scores; the same detections above the k-th (ties there may differ)
            assert sorted(r["score"] for r in got_c[c]) == sorted(r["score"] for r in want_c[c])
            kth = min(r["score"] for r in want_c[c])
            assert {_key(r) for r in got_c[c] if r["score"] > kth} == {_key(r) for r in want_c[c] if r["score"] > kth}
        for iou in ("bbox", "segm"):
            for protocol in ("fixed", "pool"):
                written = json.loads((top_dir / f"metrics_{iou}_{protocol}.json").read_text())
                again = evaluate(gt, got, iou, stats, protocol=protocol, dets_per_class=k).to_json()
                assert written["protocol"] == protocol and written["dets_per_class"] == k
                assert {m: written[m] for m in ("AP", "APr", "APc", "APf")} == {
                    m: again[m] for m in ("AP", "APr", "APc", "APf")
                }
            assert not (top_dir / f"metrics_{iou}.json").exists()  # the per-image-capped protocol is not theirs


def test_topk_split_names_are_refused_as_splits(run, capsys):
    assert main(["predict", "--run", str(run), "--split", "val-topk50", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "simcal: error: --split: split: val-topk50 names predictions on the 50 best detections per class: "
        "pass --split val --topk-per-class 50"
    )
