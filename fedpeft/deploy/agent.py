"""`fedpeft client`: a site's agent. Flower's SuperNode dialling out to the coordinator over TLS with the site's node
key, with the site's own files (data, base model, privacy policy, ledger) handed to fedpeft's ClientApp as node config.

Only outbound connections leave the site; the agent's local port is bound to 127.0.0.1. Flower's own messages for
a wrong CA, an unknown key or an unreachable coordinator are terse, so the agent checks these first and explains.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import re
import shutil
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft import wire
from fedpeft.deploy import preflight
from fedpeft.deploy.preflight import BUNDLE_FIX
from fedpeft.deploy.processes import Supervised, check_port_free, flower_executable, runtime_env, start, stop
from fedpeft.errors import CoordinatorUnreachable, DeployError

_KEYS = {"name": str, "index": int, "coordinator": str, "root_certificates": str, "node_key": str,
         "data_path": str, "base_model": str, "ledger_path": str, "policy_file": str, "state_dir": str,
         "local_port": int, "audit_log": str, "audit_key": str}
_OPTIONAL = {"base_model": "", "policy_file": "", "state_dir": "agent-state",
             "audit_log": "audit.jsonl", "audit_key": "audit.key"}
# The SuperNode's Runtime API port (loopback only). Without local_port in site.toml each site gets its own, 9094 +
# its index, so that several sites' agents on one host (a test bed, a shared server) do not collide.
DEFAULT_LOCAL_PORT = 9094
WORKER_READY_TIMEOUT = 600.0  # seconds for the warm worker to import torch and fedpeft on a busy machine
# Flower's SuperExec polls its SuperNode for each message's ClientApp task every 1 s by default; with the model in
# the warm worker that wait is a visible part of each of a round's 2-4 exchanges, and a local poll costs nothing.
_FLOWER_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
_ACTIVATION_FAILED = "Failed to activate SuperNode"
# A traceback through flower-supernode's own entry point: its main thread died. The process may linger (a server
# thread keeps it alive) while it does nothing, so the agent stops it and reports (e.g. `flower-superexec` missing).
_MAIN_THREAD_DIED = ('flower-supernode", line', "in <module>")
_SUPEREXEC = "flower-superexec"
AUDIT_KEY_FIX = ("restore the site's audit.key from its bundle (its audit.pub is what the site's auditors hold), or "
                 "set audit_key in site.toml to it")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What Flower prints for each failure, and what it means for the site's IT team.
_DIAGNOSES = (
    ("CERTIFICATE_VERIFY_FAILED", "the coordinator's TLS certificate does not verify against root_certificates "
                                  "(another federation's CA, an expired certificate, or a host name it does not "
                                  "carry); " + BUNDLE_FIX),
    (_ACTIVATION_FAILED, "the coordinator does not accept this site's node key (not registered, or "
                                     "removed from the federation); ask its operators to register node.pub"),
    ("Unable to parse the private key", "node_key is not a key Flower can use; " + BUNDLE_FIX),
    ("address already in use", "the SuperNode's local port ([site] local_port in site.toml) is taken, e.g. by "
                               "another site's agent on this host; give each site its own local_port"),
)


@dataclass(frozen=True)
class SiteSettings:
    name: str
    index: int
    coordinator: str
    root_certificates: Path
    node_key: Path
    data_path: Path
    base_model: str
    ledger_path: Path
    policy_file: Path | None
    state_dir: Path
    local_port: int
    audit_log: Path
    audit_key: Path


def load_site_settings(path: str | Path) -> SiteSettings:
    """Read site.toml ([site] table); relative paths are relative to the file."""
    path = Path(path)
    preflight.check_readable_file(path, "site config", "pass the site.toml of the site's bundle")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("site")
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"site config '{path}' is not valid TOML ({err}); fix the line it names") from None
    if not isinstance(table, dict):
        raise DeployError(f"site config '{path}' has no [site] table; start from the site.toml of the bundle")
    values = {**_OPTIONAL, **table}
    if "local_port" not in values and isinstance(values.get("index"), int):
        values["local_port"] = DEFAULT_LOCAL_PORT + values["index"]
    for key, kind in _KEYS.items():
        if key not in values:
            raise DeployError(f"site config '{path}': [site] {key} is missing; add it (see the bundle's site.toml)")
        if not isinstance(values[key], kind) or isinstance(values[key], bool):
            raise DeployError(f"site config '{path}': [site] {key} = {values[key]!r} must be a {kind.__name__}")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise DeployError(f"site config '{path}': unknown key(s) {unknown} in [site]; allowed: {sorted(_KEYS)}")
    here = path.parent

    def local(key: str) -> Path:
        return (here / Path(values[key]).expanduser()).resolve()

    base = values["base_model"]
    if base and (here / base).exists():
        base = str((here / base).resolve())
    return SiteSettings(name=values["name"], index=values["index"], coordinator=values["coordinator"],
                        root_certificates=local("root_certificates"), node_key=local("node_key"),
                        data_path=local("data_path"), base_model=base, ledger_path=local("ledger_path"),
                        policy_file=local("policy_file") if values["policy_file"] else None,
                        state_dir=local("state_dir"), local_port=values["local_port"],
                        audit_log=local("audit_log"), audit_key=local("audit_key"))


def check_site(site: SiteSettings, reach_coordinator: bool = True) -> tuple[str, int]:
    """Every local file, the key, the address and (optionally) a TLS handshake with the coordinator."""
    host, port = preflight.parse_address(site.coordinator, "[site] coordinator")
    ca = preflight.load_certificate(site.root_certificates, "root_certificates (the federation's CA)", BUNDLE_FIX)
    preflight.check_validity(ca, site.root_certificates, "root_certificates (the federation's CA)", fix=BUNDLE_FIX)
    preflight.check_node_key(site.node_key)
    preflight.check_audit_key(site.audit_key, "audit_key (the site's audit signing key)", AUDIT_KEY_FIX)
    preflight.check_data_file(site.data_path)
    preflight.check_data_rows(site.data_path)
    if site.policy_file is not None:
        from fedpeft.privacy.policy import load_policy

        load_policy(site.policy_file)  # raises naming the file and the rule
    if not 1 <= site.local_port <= 65535:
        raise DeployError(f"[site] local_port = {site.local_port} is not a port; use a free port such as 9094")
    from fedpeft.client.worker import check_socket_path

    try:
        check_socket_path(worker_socket(site))
    except ValueError as err:
        raise DeployError(f"site '{site.name}': {err}") from None
    if reach_coordinator:
        preflight.check_tls_endpoint(host, port, site.root_certificates)
    return host, port


def node_config(site: SiteSettings) -> str:
    """Flower's --node-config string: what the ClientApp reads from context.node_config."""
    items = {wire.NODE_PARTITION_ID: site.index, wire.NODE_DATA_PATH: str(site.data_path),
             wire.NODE_LEDGER_PATH: str(site.ledger_path), wire.NODE_AUDIT_LOG: str(site.audit_log),
             wire.NODE_AUDIT_KEY: str(site.audit_key)}
    if site.policy_file is not None:
        items[wire.NODE_POLICY_FILE] = str(site.policy_file)
    if site.base_model:
        items[wire.NODE_BASE_MODEL] = site.base_model
    items[wire.NODE_WORKER_SOCKET] = str(worker_socket(site))
    return " ".join(f'{k}={v}' if isinstance(v, int) else f'{k}="{v}"' for k, v in items.items())


def worker_socket(site: SiteSettings) -> Path:
    """The warm worker's Unix socket: in its own 0700 directory of the site's state directory, or, where that path
    is longer than a Unix socket allows (108 bytes), in this user's private runtime directory, named by the state
    directory so that sites on one host never share one."""
    from fedpeft.client.worker import MAX_SOCKET_PATH

    beside = site.state_dir / "worker" / "worker.sock"
    if len(os.fsencode(str(beside))) <= MAX_SOCKET_PATH:
        return beside
    digest = hashlib.sha256(os.fsencode(str(site.state_dir.resolve()))).hexdigest()[:16]
    return _private_runtime_dir() / f"worker-{digest}.sock"


def _private_runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR (a per-user 0700 directory), else /tmp/fedpeft-<uid>, made 0700 and refused unless this
    user owns it and nobody else can enter it (a directory another user made could hold a planted socket)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "fedpeft" if runtime and Path(runtime).is_dir() else Path(f"/tmp/fedpeft-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise DeployError(f"{folder} (for the site worker's socket) is not a directory only this user can enter; "
                          "remove it, or set [site] state_dir in site.toml to a shorter directory")
    return folder


def worker_command(site: SiteSettings) -> list[str]:
    return [sys.executable, "-m", "fedpeft.client.worker", "--socket", str(worker_socket(site)), "--site", site.name]


def start_worker(site: SiteSettings, echo: Callable[[str], None]) -> Supervised:
    """The site's warm worker (fedpeft.client.worker), ready to answer: it keeps torch, fedpeft and the base model
    loaded across Flower's messages, which Flower's one ClientApp process per message would each load again."""
    from fedpeft.client.proxy import WorkerUnavailable, ping
    from fedpeft.client.worker import SUMMARY_PREFIX

    def ready() -> bool:
        try:
            ping(str(worker_socket(site)))
            return True
        except WorkerUnavailable:
            return False

    log = site.state_dir / "worker.log"
    echo(f"site '{site.name}': starting its worker (imports torch and fedpeft once; log: {log})")
    env = runtime_env(site.state_dir / "flwr", _FLOWER_ENV)
    worker = Supervised("site worker", worker_command(site), log, env, echo=echo, marker=SUMMARY_PREFIX,
                        cwd=site.state_dir)
    worker.start(ready, WORKER_READY_TIMEOUT)
    return worker


def check_local_port(site: SiteSettings, wait: float = 0.0) -> None:
    """DeployError naming the port, the option that sets it and a free one, when the SuperNode could not bind it."""
    free = next((p for p in range(DEFAULT_LOCAL_PORT, DEFAULT_LOCAL_PORT + 200) if _bindable(p)), None)
    suggestion = f" (e.g. {free}, free now)" if free is not None else ""
    check_port_free("127.0.0.1", site.local_port, wait=wait,
                    fix=f"it is the SuperNode's local port of site '{site.name}': another site's agent on this host "
                        f"(or another program) holds it. Set [site] local_port in site.toml to a free port"
                        f"{suggestion}; each site on one host needs its own")


def _bindable(port: int) -> bool:
    try:
        check_port_free("127.0.0.1", port, wait=0.0)
        return True
    except DeployError:
        return False


def supernode_command(site: SiteSettings) -> list[str]:
    return [flower_executable("flower-supernode"), "--superlink", site.coordinator,
            "--root-certificates", str(site.root_certificates), "--auth-supernode-private-key", str(site.node_key),
            "--node-config", node_config(site), "--host", "127.0.0.1", "--port", str(site.local_port)]


def diagnose(output: str) -> str | None:
    return next((meaning for marker, meaning in _DIAGNOSES if marker in output), None)


def wait_for_coordinator(site: SiteSettings, echo: Callable[[str], None], attempts: int | None) -> None:
    """Wait while nothing answers at the coordinator's address; a certificate problem is fatal at once."""
    host, port = preflight.parse_address(site.coordinator, "[site] coordinator")
    for attempt in itertools.count(1):
        try:
            preflight.check_tls_endpoint(host, port, site.root_certificates)
            return
        except CoordinatorUnreachable as err:
            if attempts is not None and attempt > attempts:
                raise
            echo(f"{err}; trying again in {_backoff(attempt):.0f} s")
            time.sleep(_backoff(attempt))


def _backoff(attempt: int) -> float:
    return min(60.0, 2.0 * 2 ** (attempt - 1))


def run_agent(site: SiteSettings, echo: Callable[[str], None] = print, attempts: int | None = None) -> int:
    """Run the SuperNode until it ends. The coordinator not being up yet, or not having registered this site's key
    yet, is waited out (``attempts`` retries; None: for ever); a wrong CA or key, or a SuperNode that dies, raises
    DeployError with the cause and the SuperNode's last log lines (so a service manager restarts or reports it)."""
    check_site(site, reach_coordinator=False)
    check_flower_commands(runtime_env(site.state_dir / "flwr", _FLOWER_ENV))
    site.state_dir.mkdir(parents=True, exist_ok=True)
    site.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    check_local_port(site)
    worker = start_worker(site, echo)
    try:
        return _serve(site, echo, attempts)
    finally:
        worker.stop()


def _serve(site: SiteSettings, echo: Callable[[str], None], attempts: int | None) -> int:
    echo(f"site '{site.name}': checks passed; connecting to {site.coordinator}; log: {site.state_dir / 'agent.log'}")
    for attempt in itertools.count(1):
        wait_for_coordinator(site, echo, attempts)
        check_local_port(site, wait=10.0)  # a SuperNode that just ended may hold it a moment longer
        code, output = _run_supernode(site, echo)
        meaning = diagnose(output)
        if code == 0:
            return 0
        if _ACTIVATION_FAILED in output and (attempts is None or attempt <= attempts):
            echo(f"site '{site.name}': {meaning}; trying again in {_backoff(attempt):.0f} s")
            time.sleep(_backoff(attempt))
            continue
        if meaning is None and _main_thread_died(output):
            meaning = "flower-supernode failed (its main thread died with the error below), so the agent stopped it"
        detail = meaning or f"flower-supernode ended with exit code {code}"
        log = site.state_dir / "agent.log"
        raise DeployError(f"site '{site.name}': the agent stopped: {detail}. The SuperNode's last log lines:\n"
                          f"{last_lines(output)}\n(full log: {log})")
    return 1  # unreachable: the loop returns or raises


def check_flower_commands(env: dict[str, str]) -> None:
    """The SuperNode starts ``flower-superexec`` by name from its PATH; without it the SuperNode is useless."""
    if shutil.which(_SUPEREXEC, path=env.get("PATH", "")) is None:
        raise DeployError(f"Flower's `{_SUPEREXEC}` command is not on the PATH the SuperNode gets "
                          f"({env.get('PATH', '')!r}), so the SuperNode could not run the ClientApp; install fedpeft "
                          "(it brings flwr) in the environment `fedpeft client` runs from, or add its bin directory "
                          "to PATH (e.g. Environment=PATH=... in the systemd unit)")


def last_lines(output: str, count: int = 12) -> str:
    lines = [_ANSI.sub("", line).rstrip() for line in output.splitlines()]
    return "\n".join(f"    {line}" for line in [line for line in lines if line.strip()][-count:])


def _main_thread_died(line: str) -> bool:
    return all(marker in line for marker in _MAIN_THREAD_DIED)


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_supernode(site: SiteSettings, echo: Callable[[str], None], *, grace: float = 5.0,
                   poll: float = 0.5) -> tuple[int, str]:
    """One SuperNode process, until it ends. It is stopped as soon as Flower reports a fatal exit (its retry loop
    would linger), when its main thread dies (``grace`` seconds later, for the rest of the traceback), or when it
    exits while something it started still holds its output open."""
    log_file = site.state_dir / "agent.log"
    process = start(supernode_command(site), log_file, runtime_env(site.state_dir / "flwr", _FLOWER_ENV),
                    cwd=site.state_dir, pipe=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True, name="supernode-output").start()
    recent: list[str] = []
    died_at: float | None = None
    fatal_lines = 0  # lines still to read after Flower's "Exit Code:" (its explanation)
    try:
        with log_file.open("a", encoding="utf-8") as log:
            while True:
                try:
                    line = lines.get(timeout=poll)
                except queue.Empty:
                    line = ""
                if line is None:  # end of output
                    break
                if line:
                    log.write(line)
                    log.flush()
                    recent = (recent + [line])[-200:]
                    if "Received successfully" in line or "Sent successfully" in line:
                        echo(line.rstrip())
                    if died_at is None and _main_thread_died(line):
                        died_at = time.monotonic()
                    if fatal_lines:
                        fatal_lines -= 1
                        if fatal_lines == 0:
                            break
                    if "Exit Code:" in line:
                        fatal_lines = 3
                elif fatal_lines or process.poll() is not None:
                    break  # no more output for now, and the process is gone (or said why it ends)
                if died_at is not None and time.monotonic() - died_at > grace:
                    break
    finally:
        stop(process)
    output = "".join(recent)
    failed = "Exit Code:" in output or died_at is not None
    return (1 if failed else process.returncode or 0), output
