"""Dual-head inference cost: time of ``--head dual`` / ``--head orig`` on the same images.

Runs the same trained run and calibrated head over the same validation images, alternating
orig and dual passes (``--repeats`` times each) so machine load hits both alike, and prints the
median ratio (goal <= 1.03). Results are not written; only the inference is timed.

    python benchmarks/dual_head.py --run runs/demo/run [--images 64 --batch-size 8 --repeats 3]
    python benchmarks/dual_head.py --classes 1203 [--size 512 --images 8 --batch-size 2]

``--classes C`` times a randomly initialised detector of C classes instead of a run (the small
body at ``--size`` px, the LVIS test preset: 1,000 proposals, score threshold 0, NMS 0.5, 300
detections) with a ``3fc_ft`` head copied from it and LVIS v1's training counts for the dual head
when C is 1,203. It also times the class-wise NMS of one image's R x C candidates: ours
(``top_batched_nms``: NMS over the best candidates only) against torchvision's ``batched_nms`` on
all of them, and checks that both keep the same detections.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from simcal.data.annotations import load_dataset
from simcal.data.dataset import DetectionDataset
from simcal.data.stats import class_instance_counts
from simcal.engine.checkpoint import load_calibrated_head, load_model
from simcal.engine.runtime import setup_torch
from simcal.modeling.scoring import build_scorers, parse_heads


def random_model(classes: int, size: int, seed: int = 0):
    """A randomly initialised small detector of ``classes`` classes with the LVIS test preset, a
    ``3fc_ft`` head copied from it and training counts (LVIS v1's at 1,203 classes)."""
    from simcal.config import Config, ModelConfig
    from simcal.data.synthetic import like_statistics
    from simcal.modeling.calibration import build_calibrated_head
    from simcal.modeling.detector import build_detector

    torch.manual_seed(seed)
    mcfg = ModelConfig(arch="small", norm="bn", min_size=size, max_size=size)
    model = build_detector(mcfg, classes).eval()
    cal = build_calibrated_head("3fc_ft", model.roi_heads).eval()
    if classes == 1203:
        counts = torch.tensor([c["instance_count"] for c in like_statistics("lvis_v1")], dtype=torch.float32)
    else:
        counts = torch.randint(1, 2000, (classes,), generator=torch.Generator().manual_seed(seed)).float()
    return model, cal, counts, Config(model=mcfg)


def nms_comparison(model, images: list[torch.Tensor], repeats: int) -> None:
    """Ours (NMS over the best candidates) against torchvision's batched_nms on all R x C."""
    from torchvision.ops import batched_nms
    from torchvision.ops import boxes as box_ops

    from simcal.modeling.roi_heads import original_scores, top_batched_nms

    rh = model.roi_heads
    with torch.no_grad():
        batch, _ = model.transform(images[:1])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        roi = rh.roi_batch(features, proposals, batch.image_sizes)
        scores = original_scores(roi)
        boxes = rh.decode_boxes(roi.deltas, roi.proposals, scores.shape[1])
        boxes = box_ops.clip_boxes_to_image(boxes, batch.image_sizes[0])[:, 1:].reshape(-1, 4)
        labels = torch.arange(scores.shape[1]).view(1, -1).expand_as(scores)[:, 1:].reshape(-1)
        sc = scores[:, 1:].reshape(-1)
        keep = torch.where(sc > rh.score_thresh)[0]
        keep = keep[box_ops.remove_small_boxes(boxes[keep], 1e-2)]
        b, s, lab = boxes[keep], sc[keep], labels[keep]
        k = rh.detections_per_img
        times: dict[str, list[float]] = {"ours": [], "torchvision": []}
        out = {}
        for r in range(repeats):
            for name in ("ours", "torchvision") if r % 2 == 0 else ("torchvision", "ours"):
                t0 = time.perf_counter()
                out[name] = (
                    top_batched_nms(b, s, lab, rh.nms_thresh, k)
                    if name == "ours"
                    else (batched_nms(b, s, lab, rh.nms_thresh)[:k])
                )
                times[name].append(time.perf_counter() - t0)
    same = set(out["ours"].tolist()) == set(out["torchvision"].tolist())
    med = {n: statistics.median(v) for n, v in times.items()}
    print(
        f"class-wise NMS of one image: {s.numel()} candidates ({scores.shape[0]} RoIs x "
        f"{scores.shape[1] - 1} classes), keep {k}: ours {med['ours']:.3f} s, torchvision batched_nms "
        f"{med['torchvision']:.3f} s, speed-up {med['torchvision'] / med['ours']:.1f}x, same detections: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path)
    ap.add_argument("--classes", type=int, help="a randomly initialised detector of this many classes instead")
    ap.add_argument("--size", type=int, default=512, help="--classes: image side in px")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if (args.run is None) == (args.classes is None):
        ap.error("give --run RUN or --classes C")

    if args.classes:
        model, cal, counts, cfg = random_model(args.classes, args.size)
        setup_torch(0)
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, args.size, args.size, generator=g) for _ in range(args.images)]
        nms_comparison(model, images, args.repeats)
    else:
        model, label_map, cfg = load_model(args.run)
        setup_torch(cfg.train.threads)
        train = load_dataset(cfg.data.train_json)
        counts = torch.tensor(class_instance_counts(train, label_map.category_ids), dtype=torch.float32)
        cal = load_calibrated_head(args.run, None, model).eval()
        ds = DetectionDataset(
            load_dataset(cfg.data.val_json), cfg.data.val_images, label_map=label_map, with_masks=False
        )
        images = [ds[i][0] for i in range(min(args.images, len(ds)))]
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    scorers = {
        name: build_scorers(parse_heads([name], cfg.inference.combine, cfg.inference.T, 1.0), {"": cal}, counts)
        for name in ("orig", "dual")
    }
    for s in scorers.values():  # warm-up
        model.detect(batches[0], s)
    times: dict[str, list[float]] = {"orig": [], "dual": []}
    for r in range(args.repeats):
        for name in ("orig", "dual") if r % 2 == 0 else ("dual", "orig"):
            t0 = time.perf_counter()
            for b in batches:
                model.detect(b, scorers[name])
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(images)
    print(f"{n} images, batch {args.batch_size}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    print("| head | median s | s / image |")
    print("|---|---:|---:|")
    for k in ("orig", "dual"):
        print(f"| {k} | {med[k]:.2f} | {med[k] / n:.3f} |")
    goal = 1.05 if args.classes else 1.03
    print(f"ratio dual / orig: {med['dual'] / med['orig']:.3f}  (goal <= {goal})")


if __name__ == "__main__":
    main()
