"""An imported detectron2 LVIS model at its own scale on this machine: 1,230 classes, R50-FPN, 800 px.

Builds detectron2's LVIS v0.5 Mask R-CNN R50-FPN checkpoint by the weight rule of the reference
fixture (``tests/fixtures/detectron2/make_weights.py``; or takes ``--checkpoint``), then times each
command as a user runs it, each in its own process, with that process's peak memory:

  - reading the checkpoint alone (the pickle) and ``simcal import`` (read, convert, check, hash,
    write the run): their ratio is what the conversion adds to loading the file;
  - ``simcal calibrate`` for ``--steps`` steps of the paper's batch (16 classes, one image each) at
    the reference test size (800 px short side; images are the fixture's two PNGs, repeated);
  - ``simcal predict --head orig,cal,dual`` on ``--images`` images, one process and (``--torchrun``)
    two processes under torchrun, whose results must be the same.

    python benchmarks/import_scale.py [--steps 3 --images 8 --torchrun]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "detectron2"
MODEL = "lvis05_mask_rcnn_R_50_FPN_1x"

#: run a command, then print the peak resident memory (MiB) of its process tree's largest process
_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_MIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)"
)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """``(seconds, peak MiB)`` of ``cmd`` in a fresh process (its children included)."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    peak = float(next(line for line in out.stdout.splitlines() if line.startswith("PEAK_MIB")).split()[1])
    return seconds, peak


def dataset(path: Path, images: int) -> Path:
    """An LVIS-style json of ``images`` entries (the fixture's two PNGs in turn) and LVIS v0.5's
    1,230 category ids, three boxes per image of assorted classes."""
    pngs = [("shapes_480x640.png", 480, 640), ("shapes_427x555.png", 427, 555)]
    ims, anns = [], []
    for i in range(images):
        name, h, w = pngs[i % 2]
        ims.append({"id": i + 1, "file_name": name, "height": h, "width": w, "neg_category_ids": []})
        ims[-1]["not_exhaustive_category_ids"] = []
        for j, (x, y, bw, bh) in enumerate([(40, 50, 120, 90), (300, 200, 100, 150), (10, 300, 150, 100)]):
            cat = 1 + (7 * i + 401 * j) % 1230
            seg = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, bw, bh]})
            anns[-1].update(area=bw * bh, iscrowd=0, segmentation=seg)
    cats = [{"id": c, "name": f"class {c}", "frequency": "r"} for c in range(1, 1231)]
    path.write_text(json.dumps({"images": ims, "annotations": anns, "categories": cats}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a detectron2 LVIS checkpoint (default: built by the rule)")
    ap.add_argument("--steps", type=int, default=3, help="calibration steps (default %(default)s)")
    ap.add_argument("--images", type=int, default=8, help="images to predict (default %(default)s)")
    ap.add_argument("--torchrun", action="store_true", help="also predict with 2 processes under torchrun")
    args = ap.parse_args()
    simcal = [sys.executable, "-m", "simcal"]
    with tempfile.TemporaryDirectory(prefix="simcal-import-scale-") as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            spec = importlib.util.spec_from_file_location("make_weights", FIXTURE / "make_weights.py")
            mw = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mw)
            ckpt = tmp / f"{MODEL}_seed0.pkl"
            keys = json.loads((FIXTURE / "keys" / f"{MODEL}.json").read_text())
            with open(ckpt, "wb") as f:
                pickle.dump({"model": mw.make_weights(keys, 0)}, f, protocol=4)
        gt = dataset(tmp / "lvis.json", args.images)
        images = str(FIXTURE / "images")
        rows = []
        read_s, read_mib = timed(
            [sys.executable, "-c", f"import pickle; pickle.load(open({str(ckpt)!r}, 'rb'), encoding='latin1')"]
        )
        rows.append(("read the .pkl (pickle.load)", read_s, read_mib, ""))
        run = tmp / "run"
        data = [f"data.{k}={v}" for k, v in (("train_json", gt), ("train_images", images))]
        data += [f"data.{k}={v}" for k, v in (("val_json", gt), ("val_images", images))]
        cfg = str(FIXTURE / "configs" / f"{MODEL}.yaml")
        s, mib = timed(
            [*simcal, "import", "--from", "detectron2", str(ckpt), "--out", str(run), "--framework-config", cfg, *data]
        )
        rows.append(("simcal import", s, mib, f"{s / read_s:.2f} x reading the file"))
        steps = ["--steps", str(args.steps), "--no-progress", "calibration.checkpoint_period=1000000"]
        s, mib = timed([*simcal, "calibrate", "--run", str(run), *steps])
        rows.append((f"simcal calibrate, {args.steps} steps of 16 images", s, mib, f"{s / args.steps:.1f} s per step"))
        predict = ["predict", "--head", "orig,cal,dual", "--no-progress", "--no-eval", "--batch-size", "2"]
        s1, mib = timed([*simcal, predict[0], "--run", str(run), *predict[1:]])
        rows.append(
            (f"simcal predict orig,cal,dual, {args.images} images", s1, mib, f"{s1 / args.images:.1f} s per image")
        )
        if args.torchrun:
            # a run's numbers depend on its thread count (float rounding; the RPN's near-ties), not on
            # the number of processes: torchrun's 2 processes of 1 thread against 1 process of 1 thread
            shutil.rmtree(run / "predictions")
            s1, _ = timed([*simcal, predict[0], "--run", str(run), *predict[1:]], env={"OMP_NUM_THREADS": "1"})
            rows.append((f"  the same, 1 thread, {args.images} images", s1, 0.0, f"{s1 / args.images:.1f} s per image"))
            one = (run / "predictions" / "val").rename(tmp / "one_process")
            torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
            cmd = [torchrun, "--nproc_per_node", "2", "-m", "simcal", predict[0], "--run-dir", str(run), *predict[1:]]
            s2, mib2 = timed(cmd, env={"OMP_NUM_THREADS": "1"})
            two = run / "predictions" / "val"
            same = all(
                json.loads((one / h / "results.json").read_text()) == json.loads((two / h / "results.json").read_text())
                for h in ("orig", "cal", "dual")
                if (one / h).exists()
            )
            rows.append(
                (
                    f"torchrun 2 x 1 thread, {args.images} images",
                    s2,
                    mib2,
                    f"{s1 / s2:.2f}x 1 thread; same results: {same}",
                )
            )
    print(f"\n{MODEL} (1,230 classes), 800 px, {os.cpu_count()} CPUs; seconds include starting Python")
    print(f"{'stage':<48} {'s':>8} {'peak MiB':>9}  ratio")
    for name, s, mib, ratio in rows:
        print(f"{name:<48} {s:>8.1f} {mib:>9.0f}  {ratio}")


if __name__ == "__main__":
    main()
