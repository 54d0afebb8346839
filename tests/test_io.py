"""The one atomic write: all or nothing, no leftovers, and the mode any new file gets."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from simcal.errors import InputError
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


def test_prediction_folder_names_round_trip_through_parse_split(tmp_path):
    """The run layout names partial and per-class top-k predictions beside the split's; every such
    name reads back as the split it came from (a name that only looks alike stays a plain name)."""
    from simcal.run import PredictionFiles, Split, parse_split

    val = PredictionFiles(tmp_path / "predictions" / "val")
    assert val.partial(50).root.name == "val-first50" and val.topk(10000).root.name == "val-topk10000"
    assert val.partial(50).topk(7).root.name == "val-first50-topk7"
    assert val.partial(50).topk(7).head("orig").metrics("bbox", "pool").name == "metrics_bbox_pool.json"
    assert val.head("orig").metrics("segm").name == "metrics_segm.json"
    for name, split in [
        ("val", Split("val")),
        ("val-first50", Split("val", 50)),
        ("val-topk10000", Split("val", None, 10000)),
        ("val-first50-topk7", Split("val", 50, 7)),
        ("my-topk", Split("my-topk")),
        ("val-first0", Split("val-first0")),
        ("-topk5", Split("-topk5")),
    ]:
        assert parse_split(name) == split, name


@pytest.mark.parametrize("chunk,block", [(1, 1), (7, 3), (1 << 22, 20000)])
def test_iter_json_list_streams_any_layout_and_fails_as_read_json(tmp_path, chunk, block):
    """Items across chunk and block boundaries, one per line, pretty-printed or all on one line,
    numbers cut at a chunk's end; a malformed file gets read_json's own error, also when the
    first blocks were fine; valid JSON that is not a list is refused."""
    from simcal.io import iter_json_list, read_json

    items = [{"a": [1.5, -2e-3], "s": "x]y,z"}, 12345, [], {}, "q", 0.25, None, True]
    for text in (json.dumps(items), json.dumps(items, indent=1), " [\n" + ",\n".join(map(json.dumps, items)) + "\n]\n"):
        path = tmp_path / "list.json"
        path.write_text(text)
        assert list(iter_json_list(path, chunk=chunk)) == items
    for text in ("[]", " [ ] \n"):
        path.write_text(text)
        assert list(iter_json_list(path, chunk=chunk)) == []
    for bad in ('[{"a": 1}, {"a": 2}', '[{"a": 1} {"a": 2}]', "[1, 2] 3", "[1,]", ""):
        path.write_text(bad)
        with pytest.raises(InputError) as streamed:
            list(iter_json_list(path, chunk=chunk))
        with pytest.raises(InputError) as whole:
            read_json(path)
        assert str(streamed.value) == str(whole.value)
    path.write_text('{"images": []}')
    with pytest.raises(InputError, match=r"\(top level\): results must be a list of detections, got dict"):
        list(iter_json_list(path, "results must be a list of detections", chunk=chunk, block=block))


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_iter_json_blocks_reads_lines_a_part_at_a_time_and_any_layout_as_iter_json_list(tmp_path, block):
    """The line layout (a comma at each line end, CRLF too) is decoded a part at a time; any other
    layout, a pretty-printed one whose items span lines, comes out as iter_json_list gives it;
    malformed files fail as read_json; shares of split_json_lines give the items in order."""
    from simcal.io import NotLines, iter_json_blocks, iter_json_list, read_json, split_json_lines

    items = [{"a": [1.5, -2e-3], "s": "x],y,z"}, 12345, [], {}, "q", 0.25, None, True, [1, [2, 3]]] * 3
    layouts = {
        "lines": "[\n" + ",\n".join(map(json.dumps, items)) + "\n]\n",
        "crlf": "[\r\n" + ",\r\n".join(map(json.dumps, items)) + "\r\n]",
        "one line": json.dumps(items),
        "indented": json.dumps(items, indent=1),
        "commas first": "[" + "\n,".join(map(json.dumps, items)) + "]",
    }
    path = tmp_path / "list.json"
    for name, text in layouts.items():
        path.write_text(text)
        blocks = list(iter_json_blocks(path, block=block, items=5))
        assert [x for b in blocks for x in b] == items, name
        if name == "lines" and block == 64:
            assert 1 < len(blocks) < len(items)  # parts of several lines each
    plain = [{"id": i, "v": [i, 0.5]} for i in range(40)]
    tricky = [{"id": i, "s": '}, {\\"', "v": [i, {"w": i}]} for i in range(40)]  # "}, {" in strings, nested
    for dump in (json.dumps, lambda x: json.dumps(x, separators=(",", ":"))):  # json.dump's one line
        path.write_text(dump(plain))
        blocks = list(iter_json_blocks(path, block=block))
        assert [x for b in blocks for x in b] == plain
        if block == 64:
            assert len(blocks) > 1  # cut between objects, not only at line ends
        dicts = tricky
        path.write_text(dump(dicts))
        assert [x for b in iter_json_blocks(path, block=block) for x in b] == dicts
        for parts in (2, 3):
            shares = split_json_lines(path, parts)
            try:
                got = [x for share in shares for b in iter_json_blocks(path, block=block, share=share) for x in b]
            except NotLines:  # a share cut inside a string: the whole file is read instead
                continue
            assert got == dicts
    path.write_text(layouts["lines"])
    for parts in (2, 3):
        shares = split_json_lines(path, parts)
        got = [x for share in shares for b in iter_json_blocks(path, block=block, share=share) for x in b]
        assert got == items and shares[0][0] == 0 and shares[-1][1] == path.stat().st_size
    path.write_text(layouts["indented"])
    shares = split_json_lines(path, 2)  # cut at a comma inside an item: the share does not parse
    with pytest.raises(NotLines):
        [x for share in shares for b in iter_json_blocks(path, block=block, share=share) for x in b]
    for text in ("[]", " [ ] \n", "[\n]\n"):
        path.write_text(text)
        assert [x for b in iter_json_blocks(path, block=block) for x in b] == []
    for bad in ('[{"a": 1},\n{"a": 2}', '[{"a": 1},\n{"a": 2},\n]', "[1,\n2]\n3", "[1,\n,2]", "", "[NaN,\n1]"):
        path.write_text(bad)
        try:
            want = ("ok", read_json(path))
        except InputError as e:
            want = ("error", str(e))
        try:
            got = ("ok", [x for b in iter_json_blocks(path, block=block) for x in b])
        except InputError as e:
            got = ("error", str(e))
        assert got == want or (got[0] == want[0] == "ok" and list(iter_json_list(path)) == got[1]), bad


def test_writes_run_decorates_functions_only():
    """Twice a class inserted between @writes_run and its function took the decorator, and the
    command wrote its run unlocked (caught by test_concurrency); now that is an error at import."""
    from simcal.io import writes_run

    with pytest.raises(TypeError, match="writes_run decorates a function"):

        @writes_run
        class Options:
            pass
