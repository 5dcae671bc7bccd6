"""`fedpeft server`: the coordinator. Flower's SuperLink with TLS and node authentication, the federation's sites
registered by their public keys, and one run of fedpeft's ServerApp submitted with `flwr run` and followed to its end.

Everything the coordinator keeps lives in its state directory: the SuperLink's database (registered sites survive a
restart), the installed app, the logs. The run directory (``run.out_dir/run.name``) holds the checkpoints that make
the run resumable: starting `fedpeft server` again with the same config continues after the last completed round.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.deploy import preflight
from fedpeft.deploy.app_dir import write_app_dir
from fedpeft.deploy.processes import (
    check_port_free,
    flower_executable,
    runtime_env,
    start,
    stop,
    tail,
)
from fedpeft.deploy.site_keys import check_no_site_private_keys
from fedpeft.deploy.superlink import GUARD_ANNOUNCEMENT
from fedpeft.errors import DeployError
from fedpeft.io.atomic import complete_lines, write_json_atomic
from fedpeft.privacy.release import score_text

CONNECTION = "fedpeft"  # the name of the SuperLink connection in the coordinator's own Flower config
LOOPBACK = ("127.0.0.1", "localhost", "::1")
FINISHED = "finished"


@dataclass(frozen=True)
class CoordinatorSettings:
    pki_dir: Path
    config: RunConfig
    state_dir: Path
    host: str = "0.0.0.0"  # sites connect from other machines
    port: int = 9092
    sites: tuple[str, ...] = ()  # empty: every site bundle under <pki>/sites
    startup_timeout: float = 60.0


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, echo: Any = print) -> None:
        self.s = settings
        self.echo = echo
        self.flwr_home = settings.state_dir / "flwr"
        self.log_file = settings.state_dir / "superlink.log"
        self.env = runtime_env(self.flwr_home)
        self.superlink: subprocess.Popen | None = None

    # -- checks and process ------------------------------------------------------------------------------------
    def control_host(self) -> str:
        """The name under which this machine reaches its own SuperLink: a loopback name the certificate carries."""
        pki = self.s.pki_dir
        names = preflight.check_server_certificate(pki / "server.pem", pki / "server.key", pki / "ca.pem")
        return next((n for n in names if n in LOOPBACK), names[0])

    def site_keys(self) -> dict[str, Path]:
        sites_dir = self.s.pki_dir / "sites"
        available = sorted(d.name for d in sites_dir.iterdir() if (d / "node.pub").is_file()) \
            if sites_dir.is_dir() else []
        wanted = list(self.s.sites) or available
        missing = [name for name in wanted if name not in available]
        if missing or not wanted:
            raise DeployError(f"no site bundle with a node.pub for {missing or 'any site'} under {sites_dir}; "
                              "register each site from the public keys it made with `fedpeft pki add-site NAME "
                              "--dir ... --coordinator ... --public-key node.pub --audit-public-key audit.pub`")
        return {name: sites_dir / name / "node.pub" for name in wanted}

    def write_flower_config(self, control_host: str) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        host = f"[{control_host}]" if ":" in control_host else control_host
        text = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "{host}:{self.s.port}"\nroot-certificates = "{(self.s.pki_dir / "ca.pem").resolve()}"\n')
        (self.flwr_home / "config.toml").write_text(text, encoding="utf-8")

    def start_superlink(self, control_host: str) -> None:
        pki = self.s.pki_dir.resolve()
        command = [sys.executable, "-m", "fedpeft.deploy.superlink", "--ssl-ca-certfile", str(pki / "ca.pem"),
                   "--ssl-certfile", str(pki / "server.pem"), "--ssl-keyfile", str(pki / "server.key"),
                   "--enable-supernode-auth", "--database", str(self.s.state_dir.resolve() / "superlink.db"),
                   "--disable-runtime-dependency-installation", "--host", self.s.host, "--port", str(self.s.port)]
        check_port_free(self.s.host, self.s.port)
        self.superlink = start(command, self.log_file, self.env, cwd=self.s.state_dir)
        deadline = time.monotonic() + self.s.startup_timeout
        while True:
            if self.superlink.poll() is not None:
                raise DeployError(f"the SuperLink exited (code {self.superlink.returncode}) at start; is port "
                                  f"{self.s.port} taken? Its log {self.log_file} ends with:\n{tail(self.log_file)}")
            try:
                preflight.check_tls_endpoint(control_host, self.s.port, self.s.pki_dir / "ca.pem", timeout=2.0)
                self._require_guard()
                return
            except DeployError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _require_guard(self) -> None:
        """Fail closed: without the guard, anyone reaching the port could submit code to every site."""
        if GUARD_ANNOUNCEMENT not in tail(self.log_file, 400):
            raise DeployError(f"the SuperLink started without fedpeft's loopback guard on its Control API (see "
                              f"{self.log_file}); this flwr version is not supported by fedpeft server")

    # -- the Flower CLI ----------------------------------------------------------------------------------------
    def flwr(self, *args: str) -> dict[str, Any]:
        command = [flower_executable("flwr"), *args, CONNECTION, "--format", "json"]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, check=False)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            raise DeployError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
                              f"{(done.stdout + done.stderr).strip()[-800:]}") from None

    def register_sites(self) -> dict[str, str]:
        """Bring the SuperLink's registry in line with the PKI: register each site's current public key, unregister
        keys that were rotated (`fedpeft pki rotate-site`) or whose site was removed (`fedpeft pki remove-site`).
        Returns name -> node id; the book is kept in <state>/sites.json."""
        book_file, book = self._site_book()
        keys = self.site_keys()
        for name in [n for n in book if not (self.s.pki_dir / "sites" / n / "node.pub").is_file()]:
            self._unregister(name, book.pop(name), "the site was removed")
        for name, public_key in keys.items():
            current = public_key.read_text(encoding="utf-8").strip()
            if name in book and book[name]["public-key"] != current:
                self._unregister(name, book.pop(name), "its key was rotated")
            reply = self.flwr("supernode", "register", str(public_key.resolve()))
            if reply.get("success"):
                book[name] = {"node-id": str(reply["node-id"]), "public-key": current}
            elif "already in use" not in reply.get("error-message", ""):
                raise DeployError(f"registering site '{name}' ({public_key}) failed: {reply.get('error-message')}")
            write_json_atomic(book_file, book)  # after each site: a crash keeps what was done
        return {name: entry["node-id"] for name, entry in book.items() if name in keys}

    def _site_book(self) -> tuple[Path, dict]:
        """<state>/sites.json and what it holds: site name -> its node id and registered public key."""
        book_file = self.s.state_dir / "sites.json"
        return book_file, json.loads(book_file.read_text(encoding="utf-8")) if book_file.is_file() else {}

    def write_site_nodes(self, registered: dict[str, str]) -> None:
        """The ServerApp's node id -> site index map, from the keys the SuperLink registered and the indices in the
        PKI's own copy of each site.toml: a reply is filed under the site whose key its node authenticated with,
        never under the index the reply names (``fedpeft.server.collect.SiteIdentities``)."""
        import tomllib

        from fedpeft.runs.site_names import write_site_names
        from fedpeft.server.collect import SITE_NODES_FILE

        table = {}
        for name, node in registered.items():
            bundle = self.s.pki_dir / "sites" / name / "site.toml"
            try:
                table[node] = int(tomllib.loads(bundle.read_text(encoding="utf-8"))["site"]["index"])
            except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as err:
                raise DeployError(f"site '{name}': no index in {bundle} ({err}); recreate the site with "
                                  "`fedpeft pki add-site`") from None
        if len(set(table.values())) != len(table):
            raise DeployError(f"two sites under {self.s.pki_dir / 'sites'} share an index; give each its own")
        run_dir = Path(self.s.config.run.out_dir).expanduser() / self.s.config.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / SITE_NODES_FILE, table)
        names = {node: name for name, node in registered.items()}
        write_site_names(run_dir, {str(index): names[node] for node, index in table.items()})  # for people to read

    def _unregister(self, name: str, entry: dict, why: str) -> None:
        reply = self.flwr("supernode", "unregister", entry["node-id"])
        if not reply.get("success") and "not found" not in reply.get("error-message", "").lower():
            raise DeployError(f"unregistering site '{name}' (node {entry['node-id']}) failed: "
                              f"{reply.get('error-message')}")
        self.echo(f"site '{name}': old node key unregistered ({why})")

    def stop_unfinished_runs(self) -> None:
        """A coordinator that crashed leaves its run 'running' in the SuperLink's database; end it before resuming."""
        for run in self.flwr("list").get("runs", []):
            if not str(run.get("status", "")).startswith(FINISHED):
                self.flwr("stop", str(run["run-id"]))
                self.echo(f"stopped run {run['run-id']} left over from an earlier coordinator")

    def submit(self) -> str:
        app = write_app_dir(self.s.config, self.s.state_dir / "app")
        reply = self.flwr("run", str(app))
        if not reply.get("success"):
            raise DeployError(f"`flwr run` refused the run: {reply.get('error-message')}")
        return str(reply["run-id"])

    def run_status(self, run_id: str) -> str:
        runs = self.flwr("list", "--run-id", run_id).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    # -- the whole job -------------------------------------------------------------------------------------------
    def run(self, poll_seconds: float = 2.0) -> str:
        """Start, register, submit, follow; returns the run's final Flower status (e.g. 'finished:completed')."""
        check_no_site_private_keys(self.s.pki_dir)  # before anything starts: a site's private keys are not ours
        self.s.state_dir.mkdir(parents=True, exist_ok=True)
        control_host = self.control_host()
        self.write_flower_config(control_host)
        try:
            self.start_superlink(control_host)
            self.echo(f"coordinator listening on {self.s.host}:{self.s.port} (TLS, node authentication); "
                      f"log: {self.log_file}")
            registered = self.register_sites()
            self.echo(f"sites registered: {', '.join(sorted(registered))}")
            self.write_site_nodes(registered)
            self.stop_unfinished_runs()
            run_id = self.submit()
            write_json_atomic(self.s.state_dir / "current_run.json", {"run-id": run_id})
            self.echo(f"run {run_id} submitted; waiting for {self.s.config.federation.num_sites} sites")
            return self.follow(run_id, poll_seconds)
        finally:
            if self.superlink is not None:
                stop(self.superlink)

    def follow(self, run_id: str, poll_seconds: float) -> str:
        """Show each completed round until the run ends; the ServerApp's own log goes to serverapp-<run>.log."""
        metrics = Path(self.s.config.run.out_dir).expanduser() / self.s.config.run.name / "metrics.jsonl"
        app_log = self.s.state_dir / f"serverapp-{run_id}.log"
        streamer = start([flower_executable("flwr"), "log", run_id, CONNECTION, "--stream"], app_log, self.env)
        shown = 0
        try:
            while True:
                status = self.run_status(run_id)
                shown = self._show_new_rounds(metrics, shown)
                if status.startswith(FINISHED):
                    break
                if self.superlink is not None and self.superlink.poll() is not None:
                    raise DeployError(f"the SuperLink stopped (code {self.superlink.returncode}); its log "
                                      f"{self.log_file} ends with:\n{tail(self.log_file)}")
                time.sleep(poll_seconds)
        finally:
            time.sleep(1.0)  # the last log lines
            stop(streamer)
        if status != "finished:completed":
            self.echo(f"run {run_id} ended {status}; the ServerApp's log {app_log} ends with:\n{tail(app_log)}")
        return status

    def _show_new_rounds(self, metrics: Path, shown: int) -> int:
        lines = complete_lines(metrics)  # not a line the ServerApp is writing, nor one a crash left torn
        if len(lines) > shown:
            names = self._site_names(metrics.parent)
            for line in lines[shown:]:
                self.echo(round_line(json.loads(line), names))
        return len(lines)

    def _site_names(self, run_dir: Path) -> dict[str, str]:
        """Site index and node id -> the site's PKI name: the records key failures by node, the rest by index."""
        from fedpeft.runs.site_names import read_site_names

        try:
            _, book = self._site_book()
            names = read_site_names(run_dir)
        except (OSError, ValueError):  # a display aid only: the keys as they are
            return {}
        return {**names, **{str(entry["node-id"]): name for name, entry in book.items() if "node-id" in entry}}


def round_line(record: dict[str, Any], names: dict[str, str]) -> str:
    """One round as the coordinator's console shows it: the score, how many sites returned, and each failed or
    refusing site by name with its reason."""
    line = (f"round {record['round']}: accuracy {score_text(record.get('global_accuracy'))}, "
            f"sites returned {record.get('sites_returned', '-')}")
    for label, entries in (("failed", record.get("failures") or {}), ("refused", record.get("refusals") or {})):
        if entries:
            line += f"; {label}: " + "; ".join(f"{names.get(str(key), key)} ({reason})"
                                               for key, reason in entries.items())
    return line
