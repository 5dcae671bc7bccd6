"""A run directory holds one run: a second run is kept out (with the holder's PID), a resume is refused before
anything is written when the directory's files cannot be continued, and a crash's leftovers are repaired at start.

The refusals go through the real entry points (`fedpeft simulate`, ``simulate()``, the ServerApp's
``open_run_dir``); they all stop before Ray starts, so no federation is run here (tests/simulations/test_resume.py
runs one that resumes over a torn metrics line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.cli import build_parser, simulate_config
from fedpeft.cli import main as cli_main
from fedpeft.errors import ConfigError, FederationError
from fedpeft.io.atomic import append_jsonl, write_bytes_atomic, write_dir_atomic, write_json_atomic
from fedpeft.runs.checkpoint import LATEST_POINTER, latest_adapter, round_dir
from fedpeft.runs.export import export_run
from fedpeft.runs.run_dir import (
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    check_resume,
    claim_run_dir,
    last_logged_round,
    logged_rounds,
    open_run_dir,
)
from fedpeft.runs.state import STATE_FILE, ServerState, save_server_state
from fedpeft.simulations.engine import simulate
from tests.io.crash import CRASH_EXIT, hold_in_subprocess, run_crashing

ARGS = ["simulate", "--no-privacy", "--name", "trial", "--set", "federation.rounds=2"]


def _config(tmp_path, *extra):
    return simulate_config(build_parser().parse_args([*ARGS, "--out", str(tmp_path), *extra]))


def _completed_run(cfg, rounds=(0, 1, 2), state_round=2) -> Path:
    """A run directory as a run that completed ``state_round`` leaves it (tiny stand-in tensors)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    write_json_atomic(run_dir / CONFIG_FILE, cfg.to_nested())
    for r in rounds:
        append_jsonl(run_dir / METRICS_FILE, {"round": r, "global_accuracy": 0.5})
    if state_round is not None:
        save_server_state(run_dir, ServerState(completed_round=state_round, global_state={"w": torch.ones(2)},
                                               last_record={"round": state_round}, config=cfg.to_flat()))
    for r in range(1, (state_round or 0) + 1):
        write_dir_atomic(round_dir(run_dir, r), lambda tmp, r=r: (tmp / "adapter_model.safetensors").write_text(f"{r}"))
        write_bytes_atomic(run_dir / "adapters" / LATEST_POINTER, f"round-{r:04d}\n".encode())
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file but the lock file, which a refused claim may have created (it holds nothing of the run)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


# -- one run per directory ---------------------------------------------------------------------------------------

def test_runs_started_together_under_one_name_get_one_directory_each(tmp_path):
    cfg = _config(tmp_path)
    holder = hold_in_subprocess(tmp_path / "trial" / LOCK_FILE)  # another `fedpeft simulate --name trial` starting
    try:
        with claim_run_dir(cfg, resume=False) as second, claim_run_dir(cfg, resume=False) as third:
            assert (second.run.name, third.run.name) == ("trial-2", "trial-3")
    finally:
        holder.kill()
        holder.wait()
    with claim_run_dir(cfg, resume=False) as later:  # the first run died before writing anything: its name is free
        assert later.run.name == "trial"
    _completed_run(cfg)
    with claim_run_dir(cfg, resume=False) as after_a_run:
        assert after_a_run.run.name == "trial-2"


def test_resuming_a_directory_in_use_is_refused_with_the_holders_pid(tmp_path, capsys):
    cfg = _config(tmp_path)
    run_dir = _completed_run(cfg)
    before = _snapshot(run_dir)
    holder = hold_in_subprocess(run_dir / LOCK_FILE)
    try:
        assert cli_main([*ARGS, "--out", str(tmp_path), "--resume"]) == 2
        message = capsys.readouterr().err
        assert f"run directory {run_dir}" in message and f"PID {holder.pid}" in message
        assert "--name" in message, "the fix"
        with pytest.raises(FederationError, match=f"PID {holder.pid}"), open_run_dir(cfg, wait=0.5):  # the ServerApp
            pass
    finally:
        holder.kill()
        holder.wait()
    assert _snapshot(run_dir) == before


# -- a resume is refused before anything is written -----------------------------------------------------------------

def test_resume_without_the_server_state_is_refused_and_writes_nothing(tmp_path):
    cfg = _config(tmp_path)
    run_dir = _completed_run(cfg)
    (run_dir / STATE_FILE).unlink()
    before = _snapshot(run_dir)
    with pytest.raises(FederationError) as info:
        simulate(cfg, resume=True)
    message = str(info.value)
    assert f"{run_dir / STATE_FILE} is missing" in message and "restart at round 0" in message
    assert "without --resume" in message
    # the ServerApp (`fedpeft server` restarts it on the same directory) refuses it too
    with pytest.raises(FederationError, match="logs rounds 0-2, but .*server_state.safetensors is missing"), \
            open_run_dir(cfg):
        pass
    assert _snapshot(run_dir) == before
    with pytest.raises(FederationError, match="no run directory"):
        simulate(_config(tmp_path, "--name", "never-ran"), resume=True)


def test_a_refused_resume_leaves_the_run_config_for_export(tmp_path):
    cfg = _config(tmp_path)
    run_dir = _completed_run(cfg)
    before = _snapshot(run_dir)
    other = _config(tmp_path, "--set", "federation.aggregation=fedadam")
    with pytest.raises(ConfigError, match="federation.aggregation: 'fedavg' -> 'fedadam'"):
        simulate(other, resume=True)
    with pytest.raises(ConfigError, match="different run config"), open_run_dir(other):
        pass
    assert _snapshot(run_dir) == before  # run_config.json is still the run's: export --merge reads it
    assert json.loads((run_dir / CONFIG_FILE).read_text())["federation"]["aggregation"] == "fedavg"


@pytest.mark.parametrize(("rounds", "state_round", "refusal"), [
    ((0, 1, 2, 3), 1, r"holds completed round 1, but .*metrics.jsonl already logs round 3: the state is older"),
    ((0, 1), 3, r"holds completed round 3, but .*metrics.jsonl ends at round 1: the lines of rounds 2-2 are missing"),
    ((0, 1, 0, 2, 1, 2), 2, r"metrics.jsonl line 3 logs round 0 where round 2 was due .*more than one run"),
], ids=["state-older-than-log", "log-lines-missing", "two-runs-interleaved"])
def test_a_state_that_does_not_continue_the_log_is_refused(tmp_path, rounds, state_round, refusal):
    cfg = _config(tmp_path)
    run_dir = _completed_run(cfg, rounds=rounds, state_round=state_round)
    before = _snapshot(run_dir)
    with pytest.raises(FederationError, match=refusal):
        simulate(cfg, resume=True)
    with pytest.raises(FederationError, match=refusal), open_run_dir(cfg):
        pass
    assert _snapshot(run_dir) == before


# -- what a crash left is repaired once the resume is accepted ---------------------------------------------------

def test_a_torn_metrics_line_does_not_block_a_resume_and_is_moved_aside(tmp_path):
    cfg = _config(tmp_path)
    run_dir = _completed_run(cfg, rounds=(0, 1, 2), state_round=3)  # died writing round 3's line, state saved
    with open(run_dir / METRICS_FILE, "ab") as handle:
        handle.write(b'{"global_accuracy": 0.7, "rou')
    assert last_logged_round(run_dir / METRICS_FILE) == 2 and logged_rounds(run_dir / METRICS_FILE) == [0, 1, 2]
    assert check_resume(run_dir, cfg) == 4  # round 3's line is re-written from the state by the Federation
    with open_run_dir(cfg) as opened:
        assert opened == run_dir
        assert (run_dir / METRICS_FILE).read_bytes().endswith(b"\n")
        assert (run_dir / f"{METRICS_FILE}.torn").read_bytes() == b'{"global_accuracy": 0.7, "rou\n'
    append_jsonl(run_dir / METRICS_FILE, {"round": 3})
    assert logged_rounds(run_dir / METRICS_FILE) == [0, 1, 2, 3]


def test_a_damaged_complete_metrics_line_is_named(tmp_path):
    cfg = _config(tmp_path)
    run_dir = _completed_run(cfg)
    with open(run_dir / METRICS_FILE, "ab") as handle:
        handle.write(b"not json\n")
    with pytest.raises(FederationError, match=r"metrics.jsonl line 4 is not a round record"):
        check_resume(run_dir, cfg)


def test_an_adapter_swap_cut_by_a_crash_is_readable_then_finished_at_start(tmp_path):
    cfg = _config(tmp_path)
    run_dir = _completed_run(cfg)
    target = round_dir(run_dir, 2)
    # round 2 is run again after a crash, and the coordinator dies again, between the swap's two renames
    done = run_crashing(f"""
        from fedpeft.io import atomic
        crash_before(atomic.os, "rename", 3)
        atomic.write_dir_atomic(atomic.Path({str(target)!r}),
                                lambda tmp: (tmp / "adapter_model.safetensors").write_text("2 again"))
    """)
    assert done.returncode == CRASH_EXIT, done.stderr
    assert not target.exists(), "the crash hit between the two renames"
    export_run(run_dir, tmp_path / "export")  # the latest adapter is still found: its complete new copy
    assert (tmp_path / "export" / "adapter_model.safetensors").read_text() == "2 again"
    (run_dir / ".run_config.json.abc123.tmp").write_text("{")  # a file write cut before its rename
    with open_run_dir(cfg):
        assert (target / "adapter_model.safetensors").read_text() == "2 again"
        assert latest_adapter(run_dir) == target
        assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == [LATEST_POINTER, "round-0001",
                                                                          "round-0002"]
        assert not list(run_dir.glob(".*.tmp"))


def test_a_resumed_run_that_ends_without_its_own_summary_is_not_reported_with_the_old_one(tmp_path, monkeypatch):
    """The directory of a resumed run holds the summary of its first part: it must not pass for the new one."""
    import flwr.simulation

    cfg = _config(tmp_path, "--set", "data.synthetic_examples=200", "--set", "federation.num_sites=2")
    run_dir = _completed_run(cfg)
    write_json_atomic(run_dir / "summary.json", {"rounds": 2})
    ran = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: ran.append(kwargs))  # the ServerApp died
    with pytest.raises(RuntimeError, match="ended without writing .*summary.json"):
        simulate(cfg, resume=True)
    assert ran, "the resume was accepted and the federation started"
