"""The directory lock: one holder at a time, named when it refuses another, and freed when its holder dies."""

from __future__ import annotations

import pytest

from fedpeft.io.lock import LockHeld, acquire, held_here, locked, release
from tests.io.crash import hold_in_subprocess


def test_another_process_is_refused_with_the_holders_pid_until_it_dies(tmp_path):
    lock = tmp_path / "run" / "run.lock"
    holder = hold_in_subprocess(lock)
    try:
        with pytest.raises(LockHeld) as info:
            acquire(lock)
        assert f"PID {holder.pid}" in info.value.holder
        assert not held_here(lock)
    finally:
        holder.kill()  # no cleanup runs: the kernel drops the flock with the process
        holder.wait()
    with locked(lock):
        assert held_here(lock)
        assert "PID" in lock.read_text()
    assert not held_here(lock)


def test_a_hold_is_shared_only_when_asked_for(tmp_path):
    lock = tmp_path / "run.lock"
    acquire(lock)
    try:
        with pytest.raises(LockHeld, match="this process"):
            acquire(lock)
        acquire(lock, reentrant=True)  # the ServerApp inside `fedpeft simulate`
        release(lock)
        assert held_here(lock), "the first hold is still there"
    finally:
        release(lock)
    assert not held_here(lock)


def test_a_waiting_acquire_gets_the_lock_once_its_holder_exits(tmp_path):
    """A restarted coordinator's ServerApp waits for the one that is still shutting down."""
    import threading

    lock = tmp_path / "run.lock"
    holder = hold_in_subprocess(lock)
    threading.Timer(0.5, holder.kill).start()
    try:
        with locked(lock, wait=20):
            assert held_here(lock)
    finally:
        holder.kill()
        holder.wait()


def test_the_holder_is_named_without_the_options_of_its_command_line(monkeypatch):
    from fedpeft.io.lock import holder_description

    monkeypatch.setattr("sys.argv", ["/venv/bin/flwr-serverapp", "--token", "s3cret"])  # as Flower starts it
    described = holder_description()
    assert "flwr-serverapp" in described and "s3cret" not in described and "--token" not in described
    monkeypatch.setattr("sys.argv", ["/venv/bin/fedpeft", "simulate", "--name", "x"])
    assert "(fedpeft simulate)" in holder_description()
