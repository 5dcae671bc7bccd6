"""The server's round loop over Flower's Grid: sample, train, sum, aggregate, checkpoint, evaluate, log."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire
from fedpeft.audit.payload import payload_bytes
from fedpeft.audit.trail import CoordinatorAudit
from fedpeft.config import RunConfig
from fedpeft.data.sites import column_site_names
from fedpeft.errors import FederationError, PrivacyBudgetExceeded, SecAggAbort
from fedpeft.io.atomic import append_jsonl, write_json_atomic
from fedpeft.io.digest import file_digest
from fedpeft.messaging import EVALUATE, TRAIN, as_float, broadcast
from fedpeft.methods import build_method
from fedpeft.models.adapter_state import AdapterState
from fedpeft.runs.checkpoint import (
    ADAPTER_WEIGHTS,
    latest_adapter,
    save_global_adapter,
)
from fedpeft.runs.run_dir import (
    MANIFEST_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    last_logged_round,
)
from fedpeft.runs.site_names import read_site_names
from fedpeft.runs.state import (
    ServerState,
    check_resumable,
    load_server_state,
    save_server_state,
)
from fedpeft.secagg.session import SecAggSession
from fedpeft.secagg.vector import weight_scale
from fedpeft.server import distributed
from fedpeft.server.client_dp import ServerClientDp
from fedpeft.server.collect import (
    RoundCollection,
    SiteIdentities,
    UpdateLimits,
    checked_examples,
    claimed_partitions,
    collect_secure,
    collect_updates,
    registered_sites,
)
from fedpeft.server.initial import InitialAdapter
from fedpeft.server.pipeline import AggregationPipeline
from fedpeft.server.progress import ConsoleProgress
from fedpeft.server.round_audit import round_audit_record
from fedpeft.server.waiting import wait_for_sites
from fedpeft.strategies import build_rule

BUDGET_RULE = PrivacyBudgetExceeded.default_rule  # a refusal that no later round of the run can lift


@dataclass(frozen=True)
class Applied:
    """A round's effect on the global adapter (``state`` None: unchanged)."""

    state: AdapterState | None
    update_norm: float | None = None
    client_epsilon: float | None = None
    adapter_sha256: str | None = None


@dataclass(frozen=True)
class Evaluation:
    global_accuracy: float | None  # None: no site released its held-out scores (privacy.site_metrics)
    global_loss: float | None
    site_accuracy: dict[str, float]
    evaluated: bool = True  # False: a round between evaluations (federation.eval_every), the last one's values


class Federation:
    """One federated run: the global adapter, the aggregation rule, and what is written after each round."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path, initial: InitialAdapter, *,
                 progress: ConsoleProgress) -> None:
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        self.global_state: AdapterState = dict(initial.wire)
        self.method = build_method(cfg)
        self.template = self.method.upload_template(initial.wire)  # one upload's names and shapes
        self.initial = initial
        self.peft_config = initial.peft_config
        self.progress = progress
        self.rule = build_rule(cfg.federation.aggregation, **cfg.strategy.rule_options())
        self.client_dp = ServerClientDp(cfg)
        self.aggregate = AggregationPipeline(method=self.method, rule=self.rule, client_dp=self.client_dp)
        self.distributed = cfg.privacy.dp and cfg.privacy.dp_mode == "distributed"  # one DP step per round
        self.site_epsilon: dict[str, float] = {}
        self.accuracy_by_round: list[float | None] = []
        self.spent_sites: set[str] = set()  # sites that refused a round because their privacy budget is spent
        # node -> site: the deployment's registered nodes (its PKI), else bound at a node's first reply
        self.identities = SiteIdentities(registered_sites(run_dir))
        # index -> the name people know a site by: the deployment's PKI names, else the partition column's values
        self.site_names = read_site_names(run_dir) or column_site_names(cfg)
        progress.show_names(self.site_names, self.site_of_node)
        self.limits = UpdateLimits(max_examples=cfg.federation.max_examples,
                                   max_update_norm=cfg.federation.max_update_norm, bookkeeping=self.method.bookkeeping)
        self.unchanged_because: dict[int, str] = {}  # round -> why it left the global adapter as it was
        self.audit = CoordinatorAudit(cfg, run_dir)
        self.last_site_accuracy: dict[str, float] = {}
        self.timeout = cfg.federation.round_timeout
        self.warned_whole_batch: set[str] = set()
        # secure rounds: keys set up once per key epoch, then two exchanges a round (fedpeft/secagg/session.py)
        self.secagg = SecAggSession(grid, cfg.secagg, timeout=self.timeout, last_round=cfg.federation.rounds)

    def run(self) -> dict[str, Any]:
        nodes = self.wait_for_sites()
        started = time.monotonic()
        first_round = self.resume()
        resumed_after = None if first_round == 1 else first_round - 1
        self.audit.run_start(self.initial.base_fingerprint, self.peft_config, resumed_after,
                             site_names=self.site_names)
        if first_round == 1:
            with self.progress.stage("round 0: evaluating the initial (untrained) adapter"):
                initial = self.evaluate(nodes, 0)
            audit = {"round": 0, "initial_evaluation": True, "refusals": {},
                     "sites_evaluated": sorted(initial.site_accuracy), "global_accuracy": initial.global_accuracy}
            self.complete_round(0, initial, {"round": 0, "seconds": time.monotonic() - started}, audit)
        for server_round in range(first_round, self.cfg.federation.rounds + 1):
            self.complete_round(server_round, *self.run_round(nodes, server_round))
            if len(self.spent_sites) >= len(nodes):  # a spent budget never grows back: later rounds are refused too
                self.progress.message(f"[red]round {server_round}: every site has refused because its privacy budget "
                                      f"is spent ({', '.join(sorted(self.spent_sites))}); the run stops here[/red]")
                break
        summary = self.summary(time.monotonic() - started)
        write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        final = summary["final_adapter"]
        self.audit.run_end(final, file_digest(Path(final) / ADAPTER_WEIGHTS) if final else None, summary)
        if summary["unchanged_reason"]:  # `fedpeft simulate` / `server` then exit non-zero (cli._trained_or_why)
            self.progress.message(f"[red]{summary['unchanged_reason']}[/red]")
        return summary

    def unchanged_reason(self) -> str | None:
        """Why the global adapter is still the initial one after every round, or None when it changed."""
        initial = self.initial.wire
        if set(initial) != set(self.global_state) or any(
                not bool((self.global_state[name] == tensor).all()) for name, tensor in initial.items()):
            return None
        why = "; ".join(f"round {r}: {reason}" for r, reason in sorted(self.unchanged_because.items())[-3:])
        return (f"the global adapter never changed in {self.cfg.federation.rounds} rounds: no round's aggregate was "
                f"applied ({why or 'see the rounds in ' + METRICS_FILE}); nothing was learnt, see {self.run_dir}")

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
        return self.identities.name(node)

    def site_of_node(self, node: str) -> str | None:
        """The site index a node id (a key of a round's failures) is known as, None if it is none."""
        return self.identities.known.get(int(node)) if node.isdigit() else None

    def wait_for_sites(self) -> list[int]:
        return wait_for_sites(self.grid, self.cfg.federation, timeout=self.timeout, progress=self.progress)

    def sample(self, nodes: list[int], server_round: int) -> list[int]:
        count = max(self.cfg.federation.min_sites, round(self.cfg.federation.fraction_train * len(nodes)))
        return sorted(random.Random(self.cfg.run.seed * 7919 + server_round).sample(nodes, min(count, len(nodes))))

    def run_round(self, nodes: list[int], server_round: int) -> tuple[Evaluation, dict[str, Any], dict[str, Any]]:
        """Returns the evaluation, the metrics record and the audit record of the round."""
        started = time.monotonic()
        sampled = self.sample(nodes, server_round)
        with self.progress.stage(f"round {server_round}: {len(sampled)} sites training"):
            got = self.train_round(sampled, server_round)
        for site, refusal in got.refusals.items():  # signed before the round's record that counts them
            self.audit.refusal(server_round, site, rule=refusal.rule, reason=refusal.reason)
            if refusal.rule == BUDGET_RULE:
                self.spent_sites.add(site)
        applied = self.apply_round(got, server_round, sampled_fraction=len(sampled) / len(nodes))
        self.site_epsilon.update(got.site_epsilon)
        if not self.distributed:  # a distributed round's full batch (q = 1) is the plan, not a mistake
            self.warn_whole_batch(got.whole_batch_sites)
        evaluation = self.evaluate_or_keep(nodes, server_round)
        audit = round_audit_record(
            server_round=server_round, sampled=[self.site_name(n) for n in sampled], got=got,
            aggregated=applied.state is not None, cfg=self.cfg, update_norm=applied.update_norm,
            client_epsilon=applied.client_epsilon, adapter_sha256=applied.adapter_sha256,
            global_accuracy=evaluation.global_accuracy, site_name=self.site_name)
        refusals = {site: refusal.reason for site, refusal in got.refusals.items()}
        return evaluation, {
            "round": server_round, "seconds": time.monotonic() - started, "sites_sampled": len(sampled),
            "sites_returned": got.total.count, "failures": got.failures, "refusals": refusals,
            "site_epsilon": got.site_epsilon, "client_dp_epsilon": applied.client_epsilon,
            "train_loss": _weighted_mean(got.losses),
            "bytes_per_client": sum(got.sizes) / len(got.sizes) if got.sizes else 0,
            "clipped_update_norms": got.clipped_norms, "clipped_examples": got.clipped_examples,
            "integrity": got.integrity or None, "unchanged_because": self.unchanged_because.get(server_round),
            "aggregated": applied.state is not None}, audit

    def note_clipping(self, got: RoundCollection, server_round: int) -> None:
        """Name each site whose update or example count the server clipped (they stay in the round)."""
        for site, norm in sorted(got.clipped_norms.items()):
            self.progress.message(f"[yellow]round {server_round}: site {site}'s update has L2 norm {norm:.4g}; "
                                  f"clipped to federation.max_update_norm = {self.cfg.federation.max_update_norm:g}"
                                  "[/yellow]")
        for site, examples in sorted(got.clipped_examples.items()):
            self.progress.message(f"[yellow]round {server_round}: site {site} claims {examples:.6g} training examples;"
                                  f" its weight is clipped to federation.max_examples = "
                                  f"{self.cfg.federation.max_examples}[/yellow]")

    def apply_round(self, got: RoundCollection, server_round: int, *, sampled_fraction: float) -> Applied:
        """Aggregate what arrived (when enough did) and checkpoint the new global adapter."""
        self.note_clipping(got, server_round)
        if got.integrity:
            self.unchanged_because[server_round] = got.integrity
            self.progress.message(f"[red]round {server_round}: {got.integrity}[/red]")
            return Applied(None)
        if got.total.count < self.cfg.federation.min_sites:
            self.unchanged_because[server_round] = (f"only {got.total.count} usable updates (< federation.min_sites "
                                                    f"= {self.cfg.federation.min_sites})")
            self.progress.message(f"round {server_round}: {self.unchanged_because[server_round]}; the global adapter "
                                  "is unchanged")
            return Applied(None)
        result = self.aggregate(self.global_state, got.total, server_round=server_round,
                                sampled_fraction=sampled_fraction)
        if result.state is None:
            self.unchanged_because[server_round] = result.rejected
            self.progress.message(f"[yellow]round {server_round}: {result.rejected}[/yellow]")
            return Applied(None, result.update_norm, result.client_epsilon)
        self.global_state = result.state
        saved = save_global_adapter(self.run_dir, server_round, self.initial.saved_format(self.global_state),
                                    self.peft_config)
        return Applied(result.state, result.update_norm, result.client_epsilon, file_digest(saved / ADAPTER_WEIGHTS))

    def train_round(self, sampled: list[int], server_round: int) -> RoundCollection:
        if self.cfg.federation.secure_aggregation:
            got = self.secure_train_round(sampled, server_round)
        else:
            replies = broadcast(self.grid, sampled, TRAIN, self.global_state, config=self.train_config(server_round),
                                timeout=self.timeout)
            got = collect_updates(replies, self.template, self.cfg.federation.weighting,
                                  keep_updates=self.aggregate.keeps_updates, limits=self.limits,
                                  identities=self.identities)
        if got.first_record is not None:
            self.record_manifest(got.first_record)
        return got

    def secure_train_round(self, sampled: list[int], server_round: int) -> RoundCollection:
        import torch  # noqa: F401  (ArrayRecord needs torch imported to accept a state dict)

        # a distributed round's sum covers what the method trains in this round (e.g. probe-lora's head alone)
        template = self.method.gradient_template(self.global_state, server_round) if self.distributed else self.template
        length = sum(t.numel() for t in template.values())
        plan = distributed.round_plan(self.cfg, dim=length, sampled=len(sampled)) if self.distributed else None
        config = ConfigRecord({**self.train_config(server_round), **(distributed.instructions(plan) if plan else {})})
        content = RecordDict({wire.ADAPTER: ArrayRecord(self.global_state), wire.CONFIG: config})
        try:
            secure = self.secagg.run(sampled, server_round, content, length, integer_bits=plan.bits if plan else None)
        except SecAggAbort as abort:  # nothing decoded; the sites' refusals still go on the record
            self.progress.message(f"[yellow]{abort}[/yellow]")
            return RoundCollection(failures={"secagg": str(abort)},
                                   refusals={self.identities.name(node): r for node, r in self.secagg.refusals.items()})
        if plan is not None:
            return distributed.collect(secure, template, plan, identities=self.identities)
        scale = weight_scale(weighting=self.cfg.federation.weighting, max_weight=self.cfg.secagg.max_weight)
        return collect_secure(secure, self.template, scale, identities=self.identities)

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
        """The round's instructions, with the method's own (e.g. which singular values train, fixed here for every
        site)."""
        return {wire.SERVER_ROUND: server_round, **self.method.round_instructions(self.global_state, server_round - 1)}

    def record_manifest(self, record: Any) -> None:
        """Write once what a site upload consists of (names, shapes, dtypes, bytes): the evidence of what left."""
        path = self.run_dir / MANIFEST_FILE
        if path.exists():
            return
        tensors = {name: {"shape": list(array.shape), "dtype": array.dtype, "bytes": len(array.data)}
                   for name, array in record.items()}
        write_json_atomic(path, {"tensors": tensors, "total_bytes": payload_bytes(record)})

    def evaluate_or_keep(self, nodes: list[int], server_round: int) -> Evaluation:
        """Every ``federation.eval_every`` rounds and after the last one (a distributed-DP run has hundreds of
        one-step rounds); in between, the last evaluation stands, marked as not re-evaluated."""
        every, last = self.cfg.federation.eval_every, self.cfg.federation.rounds
        if self.cfg.privacy.site_metrics == "none":  # no site would release a score: ask none of them
            return Evaluation(None, None, {}, evaluated=False)
        if server_round % every and server_round != last and self.accuracy_by_round:
            return Evaluation(self.accuracy_by_round[-1], None, dict(self.last_site_accuracy), evaluated=False)
        with self.progress.stage(f"round {server_round}: evaluating on {len(nodes)} sites"):
            return self.evaluate(nodes, server_round)

    def evaluate(self, nodes: list[int], server_round: int) -> Evaluation:
        replies = broadcast(self.grid, nodes, EVALUATE, self.global_state, config={wire.SERVER_ROUND: server_round},
                            timeout=self.timeout)
        site_accuracy, accuracies, losses, withheld = {}, [], [], []
        sites, refused = self.identities.resolve(claimed_partitions(replies.ok))
        for reason in refused.values():
            self.progress.message(f"[yellow]round {server_round}: evaluation reply left out: {reason}[/yellow]")
        for reply in replies.ok:
            if reply.metadata.src_node_id not in sites:
                continue
            site = sites[reply.metadata.src_node_id]
            try:
                metrics = reply.content[wire.METRICS]
                if wire.EVAL_ACCURACY not in metrics:  # its policy says site_metrics = "none": not a failure
                    withheld.append(site)
                    continue
                examples = checked_examples(metrics[wire.NUM_EXAMPLES], site, self.limits, RoundCollection())
                site_acc, site_loss = as_float(metrics[wire.EVAL_ACCURACY]), as_float(metrics[wire.EVAL_LOSS])
                if not (0.0 <= site_acc <= 1.0 and math.isfinite(site_loss)):
                    raise ValueError(f"accuracy {site_acc!r} / loss {site_loss!r} is not a result (accuracy in "
                                     "[0, 1], a finite loss)")
            except (KeyError, TypeError, ValueError) as err:
                self.progress.message(f"[yellow]round {server_round}: site {site}'s evaluation left out: {err}"
                                      "[/yellow]")
                continue
            site_accuracy[site] = site_acc
            accuracies.append((site_acc, examples))
            losses.append((site_loss, examples))
        if withheld:
            self.progress.message(f"round {server_round}: sites {sorted(withheld)} release no held-out scores "
                                  "(privacy.site_metrics or their policy says none)")
        if not accuracies and withheld:
            return Evaluation(None, None, {})
        if not accuracies:
            raise FederationError(f"round {server_round}: no site could evaluate ({replies.failed})")
        accuracy, loss = _weighted_mean(accuracies), _weighted_mean(losses)
        if accuracy is None or loss is None:
            raise FederationError(f"round {server_round}: the sites that evaluated hold no evaluation examples")
        return Evaluation(accuracy, loss, site_accuracy)

    def summary(self, seconds: float) -> dict[str, Any]:
        final = latest_adapter(self.run_dir)
        return {"rounds": self.cfg.federation.rounds, "seconds": seconds,
                "initial_accuracy": self.accuracy_by_round[0], "final_accuracy": self.accuracy_by_round[-1],
                "final_site_accuracy": self.last_site_accuracy, "site_epsilon": self.site_epsilon,
                "client_dp_epsilon": self.client_dp.epsilon(), "accuracy_by_round": self.accuracy_by_round,
                "final_adapter": str(final) if final else None, "unchanged_reason": self.unchanged_reason(),
                "site_names": self.site_names,
                "config": self.cfg.to_nested()}


def _eval_fields(evaluation: Evaluation) -> dict[str, Any]:
    return {"global_accuracy": evaluation.global_accuracy, "global_eval_loss": evaluation.global_loss,
            "site_accuracy": evaluation.site_accuracy, "evaluated": evaluation.evaluated}


def _weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    """None when no pair has a value (a distributed-DP site reports no training loss: it would leave un-noised)."""
    pairs = [(v, w) for v, w in pairs if not math.isnan(v)]
    weight = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / weight if weight else None
