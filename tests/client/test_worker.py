"""The site's warm worker (fedpeft.client.worker) as a real process on a Unix socket, driven by the thin ClientApp's
client code with Flower's own serde: it answers as the in-process ClientApp does, and loads the model once."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft import wire
from fedpeft.client.proxy import WorkerUnavailable, call_worker, ping


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps new messages with the run of the process (flwr-clientapp sets it); a test plays that process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 11), ("_task_id", 5)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-llama run config (flat, as Flower hands it to a node) and its round-0 global adapter."""
    from fedpeft.composition import from_mapping
    from fedpeft.server.initial import initial_adapter

    out = tmp_path_factory.mktemp("runs")
    cfg = from_mapping({"model": {"name": "tiny-llama", "max_length": 16}, "peft": {"method": "lora", "r": 2},
                        "federation": {"rounds": 1, "num_sites": 2, "min_sites": 1},
                        "run": {"name": "worker", "out_dir": str(out)}})
    return cfg.to_flat(), initial_adapter(cfg).wire


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A worker process on a socket in a fresh directory; stopped (SIGTERM) after the module's tests."""
    directory = tmp_path_factory.mktemp("site") / "worker"
    path = directory / "worker.sock"
    process = subprocess.Popen([sys.executable, "-m", "fedpeft.client.worker", "--socket", str(path), "--site",
                                "test"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, "the worker ended at start-up"
            try:
                ping(str(path))
                break
            except WorkerUnavailable:
                assert time.monotonic() < deadline, "the worker did not come up in 180 s"
                time.sleep(0.5)
        yield path
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert not path.exists(), "a stopped worker removes its socket"


def _message(adapter, kind: str = MessageType.EVALUATE, server_round: int = 1) -> Message:
    content = RecordDict({wire.ADAPTER: ArrayRecord(adapter), wire.CONFIG: ConfigRecord({wire.SERVER_ROUND:
                                                                                         server_round})})
    return Message(content, dst_node_id=11, message_type=kind, group_id=str(server_round))


def _context(flat, site_dir, socket_path=None) -> Context:
    node = {wire.NODE_PARTITION_ID: 0, wire.NODE_NUM_PARTITIONS: 2,
            wire.NODE_LEDGER_PATH: str(site_dir / "ledger.jsonl"), wire.NODE_AUDIT_LOG: str(site_dir / "audit.jsonl"),
            wire.NODE_AUDIT_KEY: str(site_dir / "audit.key")}
    if socket_path is not None:
        node[wire.NODE_WORKER_SOCKET] = str(socket_path)
    return Context(run_id=1, node_id=11, node_config=node, state=RecordDict(), run_config=dict(flat))


def _same_reply(got: Message, expected: Message) -> None:
    for field in ("run_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id", "message_type"):
        assert getattr(got.metadata, field) == getattr(expected.metadata, field), field
    assert not got.has_error() and not expected.has_error()
    assert set(got.content) == set(expected.content)
    got_metrics, expected_metrics = dict(got.content[wire.METRICS]), dict(expected.content[wire.METRICS])
    assert got_metrics == pytest.approx(expected_metrics, rel=1e-5)
    if wire.ADAPTER in expected.content:
        got_update = got.content[wire.ADAPTER].to_torch_state_dict()
        for name, tensor in expected.content[wire.ADAPTER].to_torch_state_dict().items():
            assert got_update[name].allclose(tensor, atol=1e-6), name


def test_the_socket_is_private_to_the_sites_user(worker):
    assert stat.S_IMODE(worker.stat().st_mode) == 0o600
    assert stat.S_IMODE(worker.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("kind", [MessageType.EVALUATE, MessageType.TRAIN])
def test_the_worker_replies_as_the_in_process_clientapp_does_and_loads_the_model_once(worker, tiny, tmp_path, kind):
    from fedpeft.client.app import build_client_app

    flat, adapter = tiny
    message = _message(adapter, kind)
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    expected = build_client_app()(message, _context(flat, tmp_path / "here"))
    before = ping(str(worker))
    got, context, status = call_worker(str(worker), message, _context(flat, tmp_path / "there", worker))
    _same_reply(got, expected)
    again, _, after = call_worker(str(worker), _message(adapter, kind, 2), _context(flat, tmp_path / "there", worker))
    assert not again.has_error()
    assert after["handled"] == before["handled"] + 2
    assert after["model_loads"] == 1, "the base model is loaded once per worker, not per message"
    assert f"round 2 {kind}: sent " in after["summary"] and " bytes" in after["summary"]
    assert context.node_config[wire.NODE_WORKER_SOCKET] == str(worker)


def test_a_handler_error_comes_back_as_flowers_error_reply(worker, tiny, tmp_path):
    flat, _ = tiny
    broken = Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}), dst_node_id=11,
                     message_type=MessageType.EVALUATE, group_id="1")  # no adapter
    reply, _, status = call_worker(str(worker), broken, _context(flat, tmp_path, worker))
    assert reply.has_error() and "Error" in reply.error.reason
    assert status["ok"] and "sent an error" in status["summary"]


def test_a_missing_worker_is_an_error_reply_with_the_fix_and_the_socket_only_in_the_sites_log(tiny, tmp_path,
                                                                                               capfd):
    from fedpeft.client.app import app

    flat, adapter = tiny
    missing = tmp_path / "no-agent" / "worker.sock"
    started = time.monotonic()
    reply = app(_message(adapter), _context(flat, tmp_path, missing))
    assert time.monotonic() - started < 30, "no directory: no worker is coming, so no waiting"
    assert reply.has_error() and "restart `fedpeft client`" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason and "<site file>" in reply.error.reason, "a path left the site"
    assert str(missing) in capfd.readouterr().err, "the site's own log names the socket"


def test_a_handler_error_names_no_site_path_in_the_reply_and_the_whole_error_in_the_sites_log(worker, tiny,
                                                                                              tmp_path):
    """The site's data file is missing: the exception names its path, which must not reach the coordinator."""
    flat, adapter = tiny
    context = _context(flat, tmp_path, worker)
    missing = tmp_path / "hospital" / "private" / "records.csv"
    context.node_config[wire.NODE_DATA_PATH] = str(missing)
    reply, _, status = call_worker(str(worker), _message(adapter), context)
    assert reply.has_error() and status["ok"]
    assert "records.csv" not in reply.error.reason and str(tmp_path) not in reply.error.reason, reply.error.reason
    assert "<site file>" in reply.error.reason, reply.error.reason


def test_a_clientapp_process_whose_parent_died_exits_instead_of_lingering(tmp_path):
    """A killed agent must not leave its ClientApp processes behind (each ~120 MB, blocked for ever)."""
    import psutil

    child = ("import time; from fedpeft.client.proxy import exit_when_orphaned; "
             "exit_when_orphaned(poll=0.1, grace=0.2); print('watching', flush=True); time.sleep(120)")
    parent = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}], "
              "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL); p.stdout.readline(); print(p.pid, flush=True)")
    started = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120)
    pid = int(started.stdout.split()[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        psutil.Process(pid).kill()
        raise AssertionError("the orphaned ClientApp process is still running")
