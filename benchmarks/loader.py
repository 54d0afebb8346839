"""Data loading at real image sizes: images per second per loader worker, JPEG decode included.

Writes ``--images`` JPEG images of ``--height`` x ``--width`` (800 x 1333, LVIS's training size;
quality 90, textured like photographs rather than flat, which would decode unrealistically fast)
with an LVIS json of a few boxes and polygon masks each, then reads them through simcal's
training data path (``DetectionDataset`` with masks, ``data_loader``) with 0, 1, 2 ... workers,
side by side in one run, and prints images per second, and per worker. Use the per-worker rate
to size ``data.num_workers``: a GPU that trains at N images per second needs about N / rate
workers (plus one). The model is not run: this is the loader alone, timed after its first batch
(worker start-up excluded).

    python benchmarks/loader.py [--images 48 --workers 0,1,2 --batch-size 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simcal.data.annotations import validate_dataset
from simcal.data.dataset import DetectionDataset, data_loader


def make_images(root: Path, n: int, height: int, width: int, seed: int = 0) -> dict:
    """``n`` textured JPEGs under ``root`` and their LVIS json (3 boxes with masks per image)."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        base = rng.uniform(0, 255, size=3)
        waves = sum(
            np.sin(xx * rng.uniform(0.005, 0.05) + yy * rng.uniform(0.005, 0.05) + rng.uniform(0, 6.3))
            for _ in range(4)
        )
        img = base[None, None, :] + 30 * waves[:, :, None] + rng.normal(0, 12, size=(height, width, 3))
        name = f"{i:06d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name, format="JPEG", quality=90)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        for _ in range(3):
            w, h = rng.uniform(50, 300, size=2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [poly],
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1333)
    ap.add_argument("--workers", default="0,1,2", help="worker counts to compare, comma-separated")
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        gt = validate_dataset(make_images(root, args.images, args.height, args.width), "<benchmark>")
        size = sum(p.stat().st_size for p in root.glob("*.jpg")) / args.images / 1024
        print(
            f"{args.images} JPEG images {args.height} x {args.width} ({size:.0f} KB each), "
            f"made in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs"
        )
        ds = DetectionDataset(gt, root, with_masks=True, source="<benchmark>")
        print("| workers | images/s | images/s per worker |")
        print("|---:|---:|---:|")
        for w in (int(v) for v in args.workers.split(",")):
            loader = iter(data_loader(ds, batch_size=args.batch_size, num_workers=w, shuffle=False))
            next(loader)  # worker start-up is not loading
            t0 = time.perf_counter()
            n = sum(len(images) for images, _ in loader)
            rate = n / (time.perf_counter() - t0)
            print(f"| {w} (main process)" if w == 0 else f"| {w}", f"| {rate:.1f} | {rate / max(w, 1):.1f} |")


if __name__ == "__main__":
    main()
