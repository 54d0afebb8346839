"""torchrun with 2 gloo processes matches 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from simcal.cli import main
from simcal.io import load_checkpoint
from simcal.run import Run

# Tolerance. The two runs take floating-point sums in a different order (per-process losses, then
# gloo's all-reduce of the gradients): the losses agree to ~1e-7 and, after 2 SGD steps, every
# weight to 1e-5 absolute / 1e-4 relative (measured: max 2e-6). A wrong shard, a double-counted
# loss or a per-process mask-loss normalisation shows up as 1e-3 and more. Longer runs drift
# further apart, as any DDP run does: discrete steps (top-k proposals, NMS) turn last-bit
# differences into different proposals after a few iterations, so the test stops at 2.
RTOL, ATOL = 1e-4, 1e-5


# HTC runs every cascade code path (per-stage losses, heads, sampling) plus its mask heads; the
# cascade's own torchrun calibration is tested below
@pytest.mark.parametrize("roi_heads", ["standard", "htc"])
def test_two_gloo_processes_match_one(tiny_config, tmp_path, roi_heads):
    # GroupNorm: BatchNorm statistics are per process by design; SGD: Adam would magnify noise
    cfg = tiny_config(max_iter=2, batch_size=4, optimizer="sgd", base_lr=0.02, reference_batch_size=4, log_period=1)
    overrides = ["model.norm=gn", f"model.roi_heads={roi_heads}"]
    single = tmp_path / "single"
    assert main(["train", "--config", str(cfg), "--out", str(single), "--no-progress", *overrides]) == 0

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "simcal",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(double),
            "--no-progress",
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    logs = [[json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (single, double)]
    assert [r["iteration"] for r in logs[0]] == [r["iteration"] for r in logs[1]] == [1, 2]
    for r1, r2 in zip(*logs):
        keys = ["loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"]
        if roi_heads != "standard":  # every stage's losses (HTC: its mask heads' too)
            per_stage = ("loss_classifier", "loss_box_reg", *(("loss_mask",) if roi_heads == "htc" else ()))
            keys += [f"{loss}_stage{k}" for loss in per_stage for k in (2, 3)]
        # HTC, iteration 2: its third stage's box loss (boxes regressed twice, then the mask heads'
        # re-sampling) moved 3e-6 relative after one step on weights that differ in the last bits
        # (measured; iteration 1 agrees to 1.4e-7 as every other run here)
        rel = 1e-5 if roi_heads == "htc" and r1["iteration"] > 1 else 1e-6
        for key in keys:
            assert r1[key] == pytest.approx(r2[key], rel=rel), key
    a, b = load_checkpoint(Run(single).model_final)["model"], load_checkpoint(Run(double).model_final)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)
    # training did move the weights: this is not a comparison of two untouched initialisations.
    # Every trained weight tensor moved by much more than the tolerance (the same initialisation:
    # the seed of the run, as train seeds it)
    from simcal.config import load_config
    from simcal.engine.runtime import seed_everything
    from simcal.modeling.detector import build_detector

    seed_everything(0)
    fresh = build_detector(load_config(cfg, overrides).model, num_classes=6).state_dict()
    weights = [k for k in a if a[k].is_floating_point() and k.endswith(("weight", "bias"))]
    moved = [k for k in weights if (fresh[k] - a[k]).abs().max() > 10 * ATOL]
    assert len(weights) > 50 and len(moved) >= 0.9 * len(weights), sorted(set(weights) - set(moved))


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "simcal", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_predict_under_torchrun_equals_one_process(trained_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m simcal predict --run-dir R` (the form that gets past
    torchrun's own parser): the images are sharded, rank 0 merges the parts in image order and
    evaluates once; the results files and metrics equal one process's, for capped and per-class
    top-k predictions, and no part file is left."""
    from tests.conftest import copy_run

    one, two = copy_run(trained_run, tmp_path / "one"), copy_run(trained_run, tmp_path / "two")
    flags = ["--head", "orig,norcal", "--batch-size", "1", "--no-progress"]
    for extra in ([], ["--topk-per-class", "7"]):
        assert main(["predict", "--run", str(one), *flags, *extra]) == 0
        p = _torchrun("predict", "--run-dir", str(two), *flags, *extra)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("detections on 20 images") == 2  # rank 0 alone reports (and evaluates)
        split = "val-topk7" if extra else "val"
        for head in ("orig", "norcal_1"):
            a, b = (r / "predictions" / split / head for r in (one, two))
            assert (a / "results.json").read_text() == (b / "results.json").read_text()
            for m in sorted(a.glob("metrics_*.json")):
                ma, mb = json.loads(m.read_text()), json.loads((b / m.name).read_text())
                assert ma.pop("model")["sha256"] == mb.pop("model")["sha256"]  # the same detector, in two runs
                assert ma == mb, m.name
            assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())


def test_each_process_takes_its_share_of_the_cores(monkeypatch):
    from simcal.engine.distributed import cpu_share
    from simcal.engine.runtime import setup_torch

    before = torch.get_num_threads()
    try:
        cores = cpu_share()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert cpu_share() == max(1, cores // 2)
        setup_torch(0)  # torch's default would be every core
        assert torch.get_num_threads() == max(1, cores // 2)
        setup_torch(64)
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        setup_torch(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_sharded_analysis_under_torchrun_equals_one_process(calibrated_run, tmp_path):
    """`torchrun ... -m simcal analyze sweep-T|recall --run-dir R`: the detector (RPN) pass is
    sharded, rank 0 evaluates, and the analysis equals one process's."""
    from tests.conftest import copy_run

    one, two = copy_run(calibrated_run, tmp_path / "one"), copy_run(calibrated_run, tmp_path / "two")
    flags = ["--T", "1,100", "--max-images", "8", "--no-progress"]
    assert main(["analyze", "sweep-T", "--run", str(one), *flags]) == 0
    p = _torchrun("analyze", "sweep-T", "--run-dir", str(two), *flags)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("written to") == 1
    a, b = (json.loads((r / "analysis" / "sweep_T.json").read_text()) for r in (one, two))
    assert a == b and len(a["sweep"]) == 2

    # proposal recall: each process's RPN share saved to its part file, rank 0 joins and evaluates
    assert main(["analyze", "recall", "--run", str(one), "--max-images", "9", "--no-progress"]) == 0
    p = _torchrun("analyze", "recall", "--run-dir", str(two), "--max-images", "9", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("proposal AR@100") == 1
    a, b = (json.loads((r / "analysis" / "recall.json").read_text()) for r in (one, two))
    assert a == b and a["num_images"] == 9 and a["AR@1000"] > 0
    assert not list((two / "analysis").glob(".recall.rank*"))


def _head(run, name):
    return load_checkpoint(run / "calibration" / name / "head.pth")["state_dict"]


def _log(run, name):
    return [json.loads(x) for x in (run / "calibration" / name / "calibration_log.jsonl").read_text().splitlines()]


def test_calibrate_under_torchrun_equals_one_process_and_resumes(trained_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m simcal calibrate --run-dir R`: each process takes every
    other slot of a step (the global batch stays classes_per_batch), the 1:1 background choice is
    made over the whole batch, the head's gradients are summed. Same RoI counts per step as one
    process, the same head to float rounding (the gradients are summed in another order: measured
    max difference 7e-9 after 6 steps; a dropped slot, a per-process background choice or a loss
    normalised per process shows up as 1e-3 and more). A run stopped after its step-3 checkpoint
    resumes under torchrun to exactly the uninterrupted head; the NCM head's class sums are summed
    over the processes."""
    from tests.conftest import copy_run

    run = copy_run(trained_run, tmp_path / "run")
    assert main(["calibrate", "--run", str(run), "--name", "one", "--no-progress"]) == 0
    p = _torchrun("calibrate", "--run-dir", str(run), "--name", "two", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("calibrated head:") == 1  # rank 0 alone reports
    one, two = _head(run, "one"), _head(run, "two")
    init = load_checkpoint(Run(run).model_final)["model"]  # 3fc_ft starts from the detector's layers
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6, msg=k)
        source = init["roi_heads.box_head." + k] if k.startswith("fc") else init["roi_heads.box_predictor." + k]
        assert (one[k] - source).abs().max() > 100 * 1e-6, k  # calibration moved every layer
    log1, log2 = _log(run, "one"), _log(run, "two")
    assert [(r["step"], r["fg"], r["bg"]) for r in log1] == [(r["step"], r["fg"], r["bg"]) for r in log2]
    assert all(r["fg"] > 0 for r in log1)
    for r1, r2 in zip(log1, log2):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)

    # stopped after the checkpoint at step 3 (of 6): no head, the log may run past the checkpoint
    cal = run / "calibration" / "two"
    (cal / "head.pth").unlink()
    (cal / "summary.json").unlink()
    assert load_checkpoint(cal / "checkpoint.pth")["step"] == 3
    p = _torchrun("calibrate", "--run-dir", str(run), "--name", "two", "--resume", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = _head(run, "two")
    assert all(torch.equal(resumed[k], two[k]) for k in two)
    assert [r["step"] for r in _log(run, "two")] == [r["step"] for r in log2]

    assert main(["calibrate", "--run", str(run), "--head", "ncm", "--name", "ncm1", "--no-progress"]) == 0
    p = _torchrun("calibrate", "--run-dir", str(run), "--head", "ncm", "--name", "ncm2", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _head(run, "ncm1"), _head(run, "ncm2")
    assert torch.equal(a["ncm_counts"], b["ncm_counts"]) and int(a["ncm_counts"].sum()) > 0
    # the frozen box head runs over each process's RoIs, a batch of another size: float32 rounding
    torch.testing.assert_close(a["ncm_sums"], b["ncm_sums"], rtol=1e-4, atol=1e-5)
    # the NCM checkpoint holds every process's sums so far (rank 0's), and a resume counts none twice
    cal = run / "calibration" / "ncm2"
    (cal / "head.pth").unlink()
    (cal / "summary.json").unlink()
    p = _torchrun("calibrate", "--run-dir", str(run), "--head", "ncm", "--name", "ncm2", "--resume", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    c = _head(run, "ncm2")
    assert torch.equal(b["ncm_counts"], c["ncm_counts"])
    torch.testing.assert_close(b["ncm_sums"], c["ncm_sums"], rtol=1e-12, atol=1e-12)  # float64 sums, other order


def test_calibrating_a_cascade_under_torchrun_equals_one_process(tiny_config, tmp_path):
    """Each stage's 1:1 background choice is made over the whole batch under torchrun too: the
    per-stage RoI counts equal one process's and so do the three stage heads (to float rounding)."""
    cfg = tiny_config(max_iter=2, steps=[], threads=1)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress", "model.roi_heads=cascade"]) == 0
    flags = ["--steps", "4", "--classes-per-batch", "4", "--no-progress"]
    assert main(["calibrate", "--run", str(run), "--name", "one", *flags]) == 0
    p = _torchrun("calibrate", "--run-dir", str(run), "--name", "two", *flags)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = _head(run, "one"), _head(run, "two")
    assert any(k.startswith("heads.2.") for k in one)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6, msg=k)
    log1, log2 = _log(run, "one"), _log(run, "two")
    assert [r["fg_stages"] for r in log1] == [r["fg_stages"] for r in log2]
    assert all(len(r["fg_stages"]) == 3 for r in log1)
