from __future__ import annotations

import json

import pytest

from fedpeft.io.atomic import append_jsonl, write_bytes_atomic, write_dir_atomic, write_json_atomic


def test_atomic_file_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "state.json"
    write_json_atomic(target, {"round": 1})
    write_json_atomic(target, {"round": 2})
    assert json.loads(target.read_text()) == {"round": 2}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "ckpt.bin"
    write_bytes_atomic(target, b"old")

    def explode(tmp):
        (tmp / "part").write_bytes(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_dir_atomic(tmp_path / "dir", explode)
    assert not (tmp_path / "dir").exists()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def test_directory_is_replaced_as_a_whole(tmp_path):
    write_dir_atomic(tmp_path / "d", lambda tmp: (tmp / "x").write_text("1"))
    write_dir_atomic(tmp_path / "d", lambda tmp: (tmp / "y").write_text("2"))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["y"]


def test_jsonl_appends_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"round": 0})
    append_jsonl(path, {"round": 1})
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [0, 1]
