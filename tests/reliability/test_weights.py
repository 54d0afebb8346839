"""``model.weights`` / ``model.weights_backbone`` are loaded for every architecture or refused in one
line (issue 28, point 5): never ignored silently."""

from __future__ import annotations

import torch
import torchvision

from simcal.cli import main
from tests.reliability.conftest import one_line, write_config


def test_weights_files_are_loaded_or_refused_in_one_line(trained_run, tiny_data, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, max_iter=1)
    (tmp_path / "text.txt").write_text("not weights\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    head = tmp_path / "head.pth"
    torch.save({"format": "simcal.calibrated_head", "state_dict": {"w": torch.zeros(1)}}, head)
    cases = {
        "text.txt": "model.weights: not a weights file torch can read",
        "empty.pth": "model.weights: not a weights file torch can read",
        "tensor.pth": "model.weights: holds Tensor, not weights by name",
        "other.pth": "model.weights: none of its 1 tensors fits this architecture (its first: 'fc.weight'",
        "missing.pth": "model.weights: no such file",
        "head.pth": "model.weights: a calibrated head, not detector weights",
    }
    for i, (name, message) in enumerate(cases.items()):
        out = tmp_path / f"bad{i}"
        assert main(["train", "--config", str(cfg), "--out", str(out), f"model.weights={tmp_path / name}"]) == 2
        one_line(capsys.readouterr().err, f"{tmp_path / name}: {message}")
        assert not (out / "model_final.pth").exists()
    # a simcal run's own weights (the small arch took no model.weights before: it trained from scratch)
    for ckpt in ("model_final.pth",):  # (checkpoint_last.pth holds {"model": ...} too)
        out = tmp_path / "good"
        argv = [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(out),
            f"model.weights={trained_run / ckpt}",
            "--no-progress",
        ]
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert f"model.weights: loaded 158 of 158 tensors from {trained_run / ckpt}" in printed
    # a torchvision ResNet-18 file as the backbone, and what it left as initialised
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "bb"
    argv = ["train", "--config", str(cfg), "--out", str(out), f"model.weights_backbone={tmp_path / 'resnet18.pth'}"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model.weights_backbone: loaded 122 of 122 tensors" in printed
    assert "(0 of the model's stay as initialised; 0 in the file unused)" in printed
    # predict reads the run's own weights, not model.weights again (the file may be gone by now)
    (tmp_path / "resnet18.pth").unlink()
    assert main(["predict", "--run", str(out), "--max-images", "2", "--no-eval", "--no-progress"]) == 0
