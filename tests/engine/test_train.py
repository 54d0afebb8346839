"""Training: exact resume after a kill, atomic checkpoints, the non-finite stop, the remedies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from simcal import choices
from simcal.cli import main
from simcal.config import load_config
from simcal.engine.train import learning_rate, schedule, train
from simcal.errors import InputError
from simcal.io import load_checkpoint
from simcal.run import Run

FINAL, LAST = "model_final.pth", "checkpoint_last.pth"

torch.set_num_threads(1)


def _weights(path):
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_kill_matches_uninterrupted_run(tiny_config, tmp_path):
    cfg_path = tiny_config(max_iter=8)
    full = tmp_path / "full"
    train(load_config(cfg_path), full, progress=False)

    # kill -9, deterministically: the process kills itself right after its checkpoint of iteration 4
    killed = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import simcal.engine.train as t
        real = t.save_checkpoint
        def save_then_die(path, state):
            real(path, state)
            if state.get("iteration") == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        t.save_checkpoint = save_then_die
        from simcal.cli import main
        sys.exit(main(["train", "--config", {str(cfg_path)!r}, "--out", {str(killed)!r}, "--no-progress"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert load_checkpoint(killed / LAST)["iteration"] == 4
    assert not (killed / FINAL).exists()

    assert main(["train", "--out", str(killed), "--resume", "--no-progress"]) == 0
    _assert_same_weights(_weights(full / FINAL), _weights(killed / FINAL))
    iters = [json.loads(line)["iteration"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert iters == sorted(set(iters)) and iters[-1] == 8


def test_run_directory_and_no_silent_overwrite(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    cfg_path = tiny_config(max_iter=2)
    assert main(["train", "--config", str(cfg_path), "--out", str(run), "--no-progress"]) == 0
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "label_map.json", LAST, FINAL, "train_log.jsonl"}
    assert not list(run.glob(".*.tmp"))  # no temp files left by the atomic writes
    record = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    assert {"iteration", "lr", "loss", "loss_classifier", "loss_mask", "sec_per_iter"} <= set(record)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path), "--out", str(run), "--no-progress"]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch, capsys):
    import simcal.engine.train as train_mod

    real = train_mod.build_classification_loss

    def poisoned(name, counts, **kw):
        loss = real(name, counts, **kw)
        calls = {"n": 0}

        class NaNAfterThree(torch.nn.Module):
            def forward(self, logits, labels):
                calls["n"] += 1
                value = loss(logits, labels)
                return value * float("nan") if calls["n"] > 3 else value

        return NaNAfterThree()

    monkeypatch.setattr(train_mod, "build_classification_loss", poisoned)
    run = tmp_path / "nan"
    rc = main(["train", "--config", str(tiny_config()), "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "non-finite loss at iteration 3 (loss_classifier=nan)" in err and f"{run / LAST}" in err
    assert load_checkpoint(run / LAST)["iteration"] == 2
    assert not (run / FINAL).exists()


@pytest.mark.parametrize(
    "override, ran",
    [
        ("train.loss=lr", "ReweightedCrossEntropy"),
        ("train.loss=focal", "FocalLoss"),
        ("train.loss=cm", "ClassMarginCrossEntropy"),
        ("train.sampler=repeat_factor", "RepeatFactorSampler"),
    ],
)
def test_remedies_train_from_the_cli(tiny_config, tmp_path, monkeypatch, override, ran):
    """The remedy asked for is the one that ran: its loss computed the classifier loss of every
    iteration (and no other loss did), or its sampler drew every image."""
    import simcal.data.samplers as samplers
    import simcal.modeling.losses as losses

    calls: dict[str, int] = {}

    def spy(cls, method):
        real = getattr(cls, method)

        def counted(self, *a, **kw):
            calls[type(self).__name__] = calls.get(type(self).__name__, 0) + 1
            return real(self, *a, **kw)

        monkeypatch.setattr(cls, method, counted)

    for cls in (losses.CrossEntropy, losses.ReweightedCrossEntropy, losses.FocalLoss, losses.ClassMarginCrossEntropy):
        spy(cls, "forward")
    for cls in (samplers.TrainingSampler, samplers.RepeatFactorSampler):
        spy(cls, "epoch_array")
    run = tmp_path / "remedy"
    assert main(["train", "--config", str(tiny_config(max_iter=2)), "--out", str(run), "--no-progress", override]) == 0
    loss_calls = {k: v for k, v in calls.items() if k in vars(losses)}
    sampler_calls = {k: v for k, v in calls.items() if k in vars(samplers)}
    if "loss" in override:
        assert loss_calls == {ran: 2}  # one classifier loss per iteration, all of them the remedy's
        assert set(sampler_calls) == {"TrainingSampler"}
    else:
        assert loss_calls == {"CrossEntropy": 2} and set(sampler_calls) == {ran}
    logged = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    assert all(v == v and abs(v) < 1e6 for k, v in logged.items() if k.startswith("loss"))
    key, value = override.split("=")
    saved = (run / "config.yaml").read_text()
    assert f"{key.split('.')[1]}: {value}" in saved


def test_schedule_and_learning_rate_by_hand(tiny_config):
    cfg = load_config(
        tiny_config(
            max_iter=None,
            epochs=12,
            steps=[8, 11],
            batch_size=4,
            base_lr=0.02,
            reference_batch_size=16,
            warmup_iters=10,
            warmup_factor=0.5,
        )
    )
    max_iter, steps = schedule(cfg, images_per_epoch=100)
    assert max_iter == 300 and steps == [200, 275]  # 25 iterations per epoch
    base = 0.02 * 4 / 16
    assert learning_rate(cfg, 0, steps) == pytest.approx(base * 0.5)
    assert learning_rate(cfg, 5, steps) == pytest.approx(base * 0.75)
    assert learning_rate(cfg, 10, steps) == pytest.approx(base)
    assert learning_rate(cfg, 200, steps) == pytest.approx(base * 0.1)
    assert learning_rate(cfg, 299, steps) == pytest.approx(base * 0.01)


def test_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  loss: hinge\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"simcal: error: {bad}: train.loss: expected one of {', '.join(choices.LOSSES)}, got 'hinge'"
    )
    with pytest.raises(InputError, match="unknown key"):
        load_config(None, ["train.lr=3"])


@pytest.mark.parametrize("key", ["train.momentum", "calibration.weight_decay"])
def test_negative_optimizer_settings_are_refused(key):
    with pytest.raises(InputError, match=f"{key}: must be >= 0, got -0.1"):
        load_config(None, [f"{key}=-0.1"])
    section, field = key.split(".")
    assert getattr(getattr(load_config(None, [f"{key}=0"]), section), field) == 0  # zero is allowed


def test_multi_scale_training_draws_each_images_short_edge_and_resumes_exactly(tiny_config, tmp_path, capsys):
    """`data.train_scales=[lo, hi]`: in training each image's short edge is drawn from [lo, hi]
    (several sizes appear), the long edge at most `data.train_max_size`; a model built for test keeps
    `model.min_size`; an interrupted multi-scale run resumes to the same weights; a bad pair is one line."""
    from simcal.modeling.detector import build_detector, train_scales

    cfg = tiny_config(max_iter=4, checkpoint_period=2, steps=[])
    over = ["data.train_scales=[40, 72]", "data.train_max_size=80"]
    model = build_detector(load_config(cfg, over).model, 6)
    train_scales(model, [40, 72], 80)
    model.transform.train()
    torch.manual_seed(0)
    sizes = set()
    for _ in range(30):
        batch, _ = model.transform([torch.rand(3, 64, 96)])
        h, w = batch.image_sizes[0]
        assert 40 <= min(h, w) <= 72 and max(h, w) <= 80
        sizes.add(min(h, w))
    assert len(sizes) >= 5
    test_model = build_detector(load_config(cfg, over).model, 6).eval()
    batch, _ = test_model.transform([torch.rand(3, 50, 50)])
    assert batch.image_sizes[0] == (64, 64)  # model.min_size / max_size of the tiny config

    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--config", str(cfg), "--out", str(straight), "--no-progress", *over]) == 0
    assert main(["train", "--config", str(cfg), "--out", str(resumed), "--no-progress", *over, "train.max_iter=2"]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "--no-progress", "train.max_iter=4"]) == 0
    a, b = (load_checkpoint(Run(r).model_final)["model"] for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    bad = ["train", "--config", str(cfg), "--out", str(tmp_path / "c"), "--no-progress", "data.train_scales=[80, 40]"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.train_scales" in err
