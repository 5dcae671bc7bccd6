"""The server's round loop over Flower's Grid: sample, train, sum, aggregate, checkpoint, evaluate, log."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire
from fedpeft.audit.payload import file_digest, payload_bytes
from fedpeft.audit.trail import CoordinatorAudit
from fedpeft.config import RunConfig
from fedpeft.errors import FederationError, SecAggAbort
from fedpeft.io.atomic import append_jsonl, write_json_atomic
from fedpeft.models.adalora import RankSchedule, pack, prune
from fedpeft.models.adapter_state import AdapterState
from fedpeft.secagg.server import SecAggRound
from fedpeft.server.checkpoint import (
    ADAPTER_WEIGHTS,
    latest_adapter,
    save_global_adapter,
)
from fedpeft.server.client_dp import ServerClientDp
from fedpeft.server.collect import RoundCollection, collect_secure, collect_updates
from fedpeft.server.initial import InitialAdapter
from fedpeft.server.messaging import EVALUATE, TRAIN, broadcast
from fedpeft.server.progress import ConsoleProgress
from fedpeft.server.round_audit import mean_update_norm, round_audit_record
from fedpeft.server.run_dir import (
    MANIFEST_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    last_logged_round,
)
from fedpeft.server.state import (
    ServerState,
    check_resumable,
    load_server_state,
    save_server_state,
)
from fedpeft.strategies import build_rule
from fedpeft.strategies.hetero_rank import RANK_WEIGHT, rank_aware_mean, wire_template


@dataclass(frozen=True)
class Evaluation:
    global_accuracy: float
    global_loss: float
    site_accuracy: dict[str, float]


class Federation:
    """One federated run: the global adapter, the aggregation rule, and what is written after each round."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path, initial: InitialAdapter,
                 progress: ConsoleProgress) -> None:
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        self.global_state: AdapterState = dict(initial.wire)
        self.template = wire_template(initial.wire, hetero=bool(cfg.peft.site_ranks))  # one upload's shapes
        self.initial = initial
        self.peft_config = initial.peft_config
        self.progress = progress
        self.rule = build_rule(cfg.federation.aggregation, **cfg.strategy.rule_options())
        self.client_dp = ServerClientDp(cfg)
        self.site_epsilon: dict[str, float] = {}
        self.accuracy_by_round: list[float] = []
        self.site_of_node: dict[int, str] = {}  # learnt from the sites' evaluation replies
        self.audit = CoordinatorAudit(cfg, run_dir)
        self.last_site_accuracy: dict[str, float] = {}
        self.timeout = cfg.federation.round_timeout
        self.ranks = RankSchedule.from_config(cfg) if cfg.peft.method == "adalora" else None
        self.warned_whole_batch: set[str] = set()

    def run(self) -> dict[str, Any]:
        nodes = self.wait_for_sites()
        started = time.monotonic()
        first_round = self.resume()
        resumed_after = None if first_round == 1 else first_round - 1
        self.audit.run_start(self.initial.base_fingerprint, self.peft_config, resumed_after)
        if first_round == 1:
            with self.progress.stage("round 0: evaluating the initial (untrained) adapter"):
                initial = self.evaluate(nodes, 0)
            audit = {"round": 0, "initial_evaluation": True, "refusals": {},
                     "sites_evaluated": sorted(initial.site_accuracy), "global_accuracy": initial.global_accuracy}
            self.complete_round(0, initial, {"round": 0, "seconds": time.monotonic() - started}, audit)
        for server_round in range(first_round, self.cfg.federation.rounds + 1):
            self.complete_round(server_round, *self.run_round(nodes, server_round))
        summary = self.summary(time.monotonic() - started)
        write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        final = summary["final_adapter"]
        self.audit.run_end(final, file_digest(Path(final) / ADAPTER_WEIGHTS) if final else None, summary)
        return summary

    def resume(self) -> int:
        """Restore the last completed round's state, if the run directory has one; returns the next round."""
        state = load_server_state(self.run_dir)
        if state is None:
            return 1
        check_resumable(state, self.cfg, self.run_dir)
        self.global_state = state.global_state
        self.rule.load_state_dict(state.rule_state)
        self.client_dp.releases = list(state.client_dp_releases)
        self.site_epsilon = dict(state.site_epsilon)
        self.accuracy_by_round = list(state.accuracy_by_round)
        self.last_site_accuracy = dict(state.last_site_accuracy)
        if last_logged_round(self.run_dir / METRICS_FILE) < state.completed_round:  # crashed between the two writes
            append_jsonl(self.run_dir / METRICS_FILE, state.last_record)
        self.progress.message(f"resuming {self.run_dir} after round {state.completed_round} (its checkpoint); "
                              "nothing before it is run again")
        return state.completed_round + 1

    def complete_round(self, server_round: int, evaluation: Evaluation, record: dict[str, Any],
                       audit: dict[str, Any]) -> None:
        """The signed account first (it is the history of what happened), then the checkpoint, then the metrics
        line: a crash between the last two is repaired by resume(), so no round is lost or doubled."""
        record = {**record, **_eval_fields(evaluation)}
        for site, reason in audit["refusals"].items():
            self.audit.refusal(server_round, site, reason)
        self.audit.round(audit)
        self.accuracy_by_round.append(evaluation.global_accuracy)
        self.last_site_accuracy = evaluation.site_accuracy
        save_server_state(self.run_dir, ServerState(
            completed_round=server_round, global_state=self.global_state, rule_state=self.rule.state_dict(),
            client_dp_releases=list(self.client_dp.releases), site_epsilon=self.site_epsilon,
            accuracy_by_round=self.accuracy_by_round, last_site_accuracy=self.last_site_accuracy,
            last_record=record, config=self.cfg.to_flat()))
        append_jsonl(self.run_dir / METRICS_FILE, record)
        self.progress.round_done(record)

    def site_name(self, node: int) -> str:
        return self.site_of_node.get(node, f"node-{node}")

    def wait_for_sites(self) -> list[int]:
        wanted, deadline = self.cfg.federation.num_sites, time.monotonic() + self.timeout
        with self.progress.stage(f"waiting for {wanted} sites to connect"):
            while True:
                nodes = sorted(self.grid.get_node_ids())
                if len(nodes) >= wanted or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        if len(nodes) < self.cfg.federation.min_sites:
            raise FederationError(f"only {len(nodes)} sites connected within {self.timeout:.0f} s; "
                                  f"federation.min_sites = {self.cfg.federation.min_sites}")
        return nodes

    def sample(self, nodes: list[int], server_round: int) -> list[int]:
        count = max(self.cfg.federation.min_sites, round(self.cfg.federation.fraction_train * len(nodes)))
        return sorted(random.Random(self.cfg.run.seed * 7919 + server_round).sample(nodes, min(count, len(nodes))))

    def run_round(self, nodes: list[int], server_round: int) -> tuple[Evaluation, dict[str, Any], dict[str, Any]]:
        """Returns the evaluation, the metrics record and the audit record of the round."""
        started = time.monotonic()
        sampled = self.sample(nodes, server_round)
        with self.progress.stage(f"round {server_round}: {len(sampled)} sites training"):
            got = self.train_round(sampled, server_round)
        aggregated = got.total.count >= self.cfg.federation.min_sites
        client_epsilon, update_norm, adapter_sha256 = None, None, None
        if aggregated:
            update_sum = dict(got.total.update_sum)
            rank_weight = update_sum.pop(RANK_WEIGHT, None)
            update_sum, client_epsilon = self.client_dp.apply(update_sum, len(sampled) / len(nodes))
            weight_sum = got.total.weight_sum
            if rank_weight is not None:  # heterogeneous ranks: each rank slice has its own weight
                update_sum, weight_sum = rank_aware_mean({**update_sum, RANK_WEIGHT: rank_weight}, weight_sum), 1.0
            update_norm = mean_update_norm(update_sum, weight_sum)
            self.global_state = self.rule.aggregate(self.global_state, update_sum, weight_sum)
            if self.ranks is not None:
                self.global_state = prune(self.global_state, self.ranks.keep(self.global_state, server_round))
            saved = save_global_adapter(self.run_dir, server_round, self.initial.saved_format(self.global_state),
                                        self.peft_config)
            adapter_sha256 = file_digest(saved / ADAPTER_WEIGHTS)
        else:
            self.progress.message(f"round {server_round}: only {got.total.count} usable updates (< "
                                  f"federation.min_sites = {self.cfg.federation.min_sites}); the global adapter "
                                  "is unchanged")
        self.site_epsilon.update(got.site_epsilon)
        self.warn_whole_batch(got.whole_batch_sites)
        with self.progress.stage(f"round {server_round}: evaluating on {len(nodes)} sites"):
            evaluation = self.evaluate(nodes, server_round)
        audit = round_audit_record(
            server_round, [self.site_name(n) for n in sampled], got, aggregated, self.cfg, update_norm,
            client_epsilon, adapter_sha256, evaluation.global_accuracy, self.site_name)
        return evaluation, {
            "round": server_round, "seconds": time.monotonic() - started, "sites_sampled": len(sampled),
            "sites_returned": got.total.count, "failures": got.failures, "refusals": got.refusals,
            "site_epsilon": got.site_epsilon, "client_dp_epsilon": client_epsilon,
            "train_loss": _weighted_mean(got.losses),
            "bytes_per_client": sum(got.sizes) / len(got.sizes) if got.sizes else 0, "aggregated": aggregated}, audit

    def train_round(self, sampled: list[int], server_round: int) -> RoundCollection:
        if self.cfg.federation.secure_aggregation:
            got = self.secure_train_round(sampled, server_round)
        else:
            replies = broadcast(self.grid, sampled, TRAIN, self.global_state, self.train_config(server_round),
                                self.timeout)
            got = collect_updates(replies, self.template, self.cfg.federation.weighting)
        if got.first_record is not None:
            self.record_manifest(got.first_record)
        return got

    def secure_train_round(self, sampled: list[int], server_round: int) -> RoundCollection:
        import torch  # noqa: F401  (ArrayRecord needs torch imported to accept a state dict)

        config = ConfigRecord(self.train_config(server_round))
        content = RecordDict({wire.ADAPTER: ArrayRecord(self.global_state), wire.CONFIG: config})
        length = sum(t.numel() for t in self.template.values())
        try:
            secure = SecAggRound(self.grid, sampled, server_round, self.cfg.secagg, self.timeout).run(content, length)
        except SecAggAbort as abort:
            self.progress.message(f"[yellow]{abort}[/yellow]")
            return RoundCollection(failures={"secagg": str(abort)})
        scale = self.cfg.secagg.max_weight if self.cfg.federation.weighting == "num-examples" else 1.0
        return collect_secure(secure, self.template, scale)

    def warn_whole_batch(self, sites: list[str]) -> None:
        """Once per site: a DP site with no more rows than train.batch_size gets no privacy amplification by
        sampling, so its epsilon grows much faster than a larger site's."""
        for site in sorted(set(sites) - self.warned_whole_batch):
            self.warned_whole_batch.add(site)
            self.progress.message(
                f"[yellow]site {site} holds no more training rows than train.batch_size "
                f"({self.cfg.train.batch_size}): DP-SGD used every row at every step (sampling rate 1, no "
                "amplification by sampling), so its budget runs out fast; lower train.batch_size[/yellow]")

    def train_config(self, server_round: int) -> dict[str, Any]:
        """The round's instructions; with AdaLoRA, which singular values train (fixed here for every site)."""
        config: dict[str, Any] = {wire.SERVER_ROUND: server_round}
        if self.ranks is not None:
            config[wire.RANK_KEEP] = pack(self.ranks.keep(self.global_state, server_round - 1))
        return config

    def record_manifest(self, record: Any) -> None:
        """Write once what a site upload consists of (names, shapes, dtypes, bytes): the evidence of what left."""
        path = self.run_dir / MANIFEST_FILE
        if path.exists():
            return
        tensors = {name: {"shape": list(array.shape), "dtype": array.dtype, "bytes": len(array.data)}
                   for name, array in record.items()}
        write_json_atomic(path, {"tensors": tensors, "total_bytes": payload_bytes(record)})

    def evaluate(self, nodes: list[int], server_round: int) -> Evaluation:
        replies = broadcast(self.grid, nodes, EVALUATE, self.global_state, {wire.SERVER_ROUND: server_round},
                            self.timeout)
        site_accuracy, accuracies, losses = {}, [], []
        for reply in replies.ok:
            metrics = reply.content[wire.METRICS]
            examples = float(metrics[wire.NUM_EXAMPLES])
            self.site_of_node[reply.metadata.src_node_id] = str(int(metrics[wire.PARTITION_ID]))
            site_accuracy[str(int(metrics[wire.PARTITION_ID]))] = float(metrics[wire.EVAL_ACCURACY])
            accuracies.append((float(metrics[wire.EVAL_ACCURACY]), examples))
            losses.append((float(metrics[wire.EVAL_LOSS]), examples))
        if not accuracies:
            raise FederationError(f"round {server_round}: no site could evaluate ({replies.failed})")
        return Evaluation(_weighted_mean(accuracies), _weighted_mean(losses), site_accuracy)

    def summary(self, seconds: float) -> dict[str, Any]:
        final = latest_adapter(self.run_dir)
        return {"rounds": self.cfg.federation.rounds, "seconds": seconds,
                "initial_accuracy": self.accuracy_by_round[0], "final_accuracy": self.accuracy_by_round[-1],
                "final_site_accuracy": self.last_site_accuracy, "site_epsilon": self.site_epsilon,
                "client_dp_epsilon": self.client_dp.epsilon(), "accuracy_by_round": self.accuracy_by_round,
                "final_adapter": str(final) if final else None, "config": self.cfg.to_nested()}


def _eval_fields(evaluation: Evaluation) -> dict[str, Any]:
    return {"global_accuracy": evaluation.global_accuracy, "global_eval_loss": evaluation.global_loss,
            "site_accuracy": evaluation.site_accuracy}


def _weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    weight = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / weight if weight else None
