"""The one atomic write: all or nothing, no leftovers, and the mode any new file gets."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from simcal.io import atomic_open, load_checkpoint, rewrite_lines, save_checkpoint, write_json


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_open_keeps_the_old_file_on_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write('{"a": 2')
            raise RuntimeError("crash mid-way")
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]
    with pytest.raises(ValueError, match="whole files"):
        with atomic_open(path, "a"):
            pass


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_writer_gives_the_mode_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "m.json", {})
        save_checkpoint(tmp_path / "c.pth", {"x": torch.zeros(2)})
        with atomic_open(tmp_path / "b.bin", "wb") as f:
            f.write(b"\x00")
        (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
        rewrite_lines(tmp_path / "log.jsonl", lambda line: '"step": 1' in line)
        expected = _umask_mode()
        assert expected == 0o666 & ~umask
        for name in ("m.json", "c.pth", "b.bin", "log.jsonl"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    finally:
        os.umask(old)
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n'
    assert torch.equal(load_checkpoint(tmp_path / "c.pth")["x"], torch.zeros(2))


def test_a_checkpoint_that_cannot_be_read_is_one_clear_error(tmp_path):
    from simcal.errors import InputError

    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"bad.pth: \(checkpoint\): cannot read"):
        load_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"none.pth: \(file\): no such checkpoint"):
        load_checkpoint(tmp_path / "none.pth")
