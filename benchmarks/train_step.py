"""Training-step cost: simcal's Mask R-CNN (LongTailRoIHeads, the predictor's loss) vs plain torchvision.

Both models have identical weights and parts (the synthetic_cpu preset's small Mask R-CNN, or
R50-FPN with --arch resnet50_fpn); only the RoIHeads class differs. Steps alternate between the
two on the same batch, so load on the machine hits both alike. Prints per-step medians and the
ratio (goal <= 1.05).

    python benchmarks/train_step.py [--steps 20 --batch 8 --size 128 --arch small --loss ce]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torchvision.models.detection.roi_heads import RoIHeads

from simcal.config import load_config
from simcal.modeling.detector import build_detector
from simcal.modeling.losses import build_classification_loss
from simcal.modeling.roi_heads import rebuild_roi_heads

REPO = Path(__file__).resolve().parents[1]


def plain_torchvision(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose roi_heads is torchvision's own RoIHeads with the same parts."""
    plain = copy.deepcopy(model)
    plain.roi_heads = rebuild_roi_heads(plain.roi_heads, RoIHeads)
    return plain


def make_batch(n: int, size: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g))
        k = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(k, 2, generator=g) * size * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        labels = torch.randint(1, num_classes + 1, (k,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def step(model, opt, images, targets) -> float:
    t0 = time.perf_counter()
    losses = model(images, targets)
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--arch", default="small", choices=["small", "resnet50_fpn"])
    ap.add_argument("--loss", default="ce", choices=["ce", "lr", "focal", "cm"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    cfg = load_config(
        REPO / "configs" / "synthetic_cpu.yaml",
        [f"model.arch={args.arch}", f"model.min_size={args.size}", f"model.max_size={args.size}"],
    )
    counts = [max(1, int(1000 / (i + 1) ** 1.5)) for i in range(args.classes)]
    torch.manual_seed(0)
    ours = build_detector(cfg.model, args.classes, cls_loss=build_classification_loss(args.loss, counts)).train()
    plain = plain_torchvision(ours).train()
    images, targets = make_batch(args.batch, args.size, args.classes)
    opts = {
        name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in (("ours", ours), ("plain", plain))
    }
    models = {"ours": ours, "plain": plain}
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for i in range(args.warmup + args.steps):
        order = ("ours", "plain") if i % 2 == 0 else ("plain", "ours")
        for name in order:
            torch.manual_seed(i)  # the same RoI sampling for both
            dt = step(models[name], opts[name], images, targets)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.arch}, loss {args.loss}, batch {args.batch} x {args.size}px, {args.steps} steps each, "
        f"{torch.get_num_threads()} threads"
    )
    print("| model | median s/step | mean s/step |")
    print("|---|---:|---:|")
    for k in ("plain", "ours"):
        print(
            f"| {'torchvision RoIHeads' if k == 'plain' else 'simcal LongTailRoIHeads'} | {med[k]:.3f} | "
            f"{statistics.mean(times[k]):.3f} |"
        )
    print(f"ratio ours / torchvision (median): {med['ours'] / med['plain']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
