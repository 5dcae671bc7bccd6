"""Every window of an atomic write, crashed for real: a writer process dies at the injection point (``os._exit``,
so none of its cleanup runs) and what it leaves is checked, then settled the way the next start settles it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fedpeft.io.atomic import (
    append_jsonl,
    complete_lines,
    recover_dir,
    recover_dirs_in,
    recover_torn_tail,
    settled_dir,
    write_bytes_atomic,
    write_dir_atomic,
)
from tests.io.crash import CRASH_EXIT, run_crashing


def _contents(path):
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_file_write_crashed_before_its_rename_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "server_state.bin"
    write_bytes_atomic(target, b"old round")
    done = run_crashing(f"""
        from fedpeft.io import atomic
        crash_before(atomic.os, "replace", 1)
        atomic.write_bytes_atomic({str(target)!r}, b"new round, longer than the old one")
    """)
    assert done.returncode == CRASH_EXIT, done.stderr
    assert target.read_bytes() == b"old round"
    write_bytes_atomic(target, b"next")
    assert target.read_bytes() == b"next"


def _crash_dir_write(tmp_path, crash: str):
    """Replace d (holding old=1) with a new copy (new=2), crashing at ``crash``; returns d."""
    target = tmp_path / "adapters" / "round-0004"
    write_dir_atomic(target, lambda tmp: (tmp / "old").write_text("1"))
    done = run_crashing(f"""
        from pathlib import Path
        from fedpeft.io import atomic
        {"" if crash == "in fill" else crash}

        def fill(tmp):
            (tmp / "new").write_text("2")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights").write_text("2")
            if {crash == "in fill"!r}:
                os._exit(CRASH_EXIT)

        atomic.write_dir_atomic(Path({str(target)!r}), fill)
    """)
    assert done.returncode == CRASH_EXIT, done.stderr
    return target


# Each window of the directory swap: (where the writer dies, which copy the directory holds once settled)
WINDOWS = [
    ("in fill", "old"),                                          # the new copy half built under a temp name
    ('crash_before(atomic.os, "rename", 1)', "old"),             # built and fsync'd, not yet marked complete
    ('crash_before(atomic.os, "rename", 2)', "new"),             # complete as .round-0004.new, old still in place
    ('crash_before(atomic.os, "rename", 3)', "new"),             # old moved to .round-0004.old, new not yet in
    ('crash_before(atomic.shutil, "rmtree", 1)', "new"),         # new in place, old copy not yet removed
]


@pytest.mark.parametrize(("crash", "settles_to"), WINDOWS, ids=[w[0] for w in WINDOWS])
def test_a_directory_replacement_crashed_in_any_window_keeps_a_whole_copy(tmp_path, crash, settles_to):
    target = _crash_dir_write(tmp_path, crash)
    parent = target.parent
    old_or_new = settled_dir(target)  # read-only: what a reader (export) sees before anything is repaired
    assert old_or_new is not None, f"neither copy on disk: {sorted(p.name for p in parent.iterdir())}"
    assert _contents(old_or_new) in ({"old": "1"}, {"new": "2", "sub/weights": "2"}), "a whole copy, never a mix"
    assert target.is_dir() or {".round-0004.old", ".round-0004.new"} <= {p.name for p in parent.iterdir()}

    assert recover_dirs_in(parent)  # what the run's next start does: something was left to settle
    assert _contents(target) == ({"old": "1"} if settles_to == "old" else {"new": "2", "sub/weights": "2"})
    assert [p.name for p in parent.iterdir()] == ["round-0004"], "no temp, .new or .old left"
    assert recover_dir(target) is None  # settled: nothing more to do

    write_dir_atomic(target, lambda tmp: (tmp / "third").write_text("3"))  # and the next write works
    assert _contents(target) == {"third": "3"}


def test_a_directory_write_settles_an_interrupted_swap_before_its_own(tmp_path):
    target = _crash_dir_write(tmp_path, 'crash_before(atomic.os, "rename", 3)')
    write_dir_atomic(target, lambda tmp: (tmp / "third").write_text("3"))  # no recover_dir call first
    assert _contents(target) == {"third": "3"}
    assert [p.name for p in target.parent.iterdir()] == ["round-0004"]


def test_a_torn_jsonl_tail_is_moved_aside_not_glued_to_the_next_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"round": 0})
    done = run_crashing(f"""
        import json
        with open({str(path)!r}, "ab") as handle:  # a writer dies halfway through its line
            line = json.dumps({{"round": 1, "global_accuracy": 0.5}}).encode() + b"\\n"
            handle.write(line[:12])
            handle.flush()
            os._exit(CRASH_EXIT)
    """)
    assert done.returncode == CRASH_EXIT, done.stderr
    assert complete_lines(path) == [b'{"round": 0}'], "the partial line is not a line"
    append_jsonl(path, {"round": 1})
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [0, 1]
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"round": 1,\n'
    assert recover_torn_tail(path) == 0


def test_recover_torn_tail_reports_the_bytes_it_moved(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"round": 0}\n{"rou')
    assert recover_torn_tail(path) == 5
    assert path.read_bytes() == b'{"round": 0}\n'
    assert recover_torn_tail(tmp_path / "absent.jsonl") == 0


def test_private_files_are_0600_from_the_start_and_never_overwritten(tmp_path):
    key = tmp_path / "node.key"
    write_bytes_atomic(key, b"secret", mode=0o600, overwrite=False)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_bytes_atomic(key, b"other", mode=0o600, overwrite=False)
    assert key.read_bytes() == b"secret"
    write_bytes_atomic(tmp_path / "ca.pem", b"public", mode=0o644)
    assert stat.S_IMODE((tmp_path / "ca.pem").stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["ca.pem", "node.key"], "no temp file left behind"


def test_pki_keys_go_through_the_atomic_writer(tmp_path, monkeypatch):
    """fedpeft pki writes every key and certificate with write_bytes_atomic (temp, fsync, rename, fsync dir)."""
    from fedpeft.audit import keys
    from fedpeft.deploy import pki

    written = []
    real = pki.write_bytes_atomic

    def spy(path, data, **kwargs):
        written.append((path.name, kwargs.get("mode")))
        real(path, data, **kwargs)

    monkeypatch.setattr(pki, "write_bytes_atomic", spy)
    monkeypatch.setattr(keys, "write_bytes_atomic", spy)
    pki.init_pki(tmp_path / "pki", ["127.0.0.1"])
    pki.add_site(tmp_path / "pki", "site-a", "127.0.0.1:9092")
    names = dict(written)
    for private in ("ca.key", "server.key", "node.key", "audit.key"):
        assert names[private] == 0o600, private
    for public in ("ca.pem", "server.pem", "node.pub", "audit.pub", "site.toml", "policy.toml"):
        assert names[public] == 0o644, public
