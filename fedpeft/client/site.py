"""A site's runtime inside one process: the base model is loaded once and reused for every site and round.

A Ray actor of the simulation engine serves many virtual sites in turn, so the per-process cache holds one peft model
(whose trainable tensors are overwritten by each round's global adapter) and each site's encoded data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft import wire
from fedpeft.audit.trail import SiteAudit
from fedpeft.client import distributed
from fedpeft.config import ModelConfig, PeftConfig, RunConfig
from fedpeft.data.records import ClassificationData
from fedpeft.data.sites import SiteData, is_multitask, label_names, num_labels, site_split
from fedpeft.io.atomic import write_bytes_atomic
from fedpeft.methods import FederatedMethod, build_method, method_for
from fedpeft.models.adapter_state import (
    AdapterState,
    get_head_state,
    get_wire_state,
    set_adapter_state,
)
from fedpeft.models.loader import load_base_model
from fedpeft.models.task_heads import attach_task_heads
from fedpeft.privacy.client_dp import add_gaussian, clip_update, noise_share_std
from fedpeft.privacy.dp_sgd import DpSettings, train_private
from fedpeft.privacy.planning import planned_steps
from fedpeft.privacy.release import stricter
from fedpeft.privacy.site_budget import SiteBudget, run_site_dir, site_ledger_path, site_policy
from fedpeft.strategies import registered_rules
from fedpeft.training.batches import EncodedData, encode_classification, encode_prompt_response
from fedpeft.training.probe import feature_settings
from fedpeft.training.trainer import EvalResult, TrainResult


@dataclass(frozen=True)
class LocalRound:
    update: AdapterState  # new local adapter minus the received global adapter (clipped/noised under client DP)
    train: TrainResult
    privacy: dict[str, float] = field(default_factory=dict)  # epsilon after the round, noise, sampling rate, ...
    ledger_line_sha256: str | None = None  # the privacy ledger's line for this round (DP), for the audit log
    ring_values: Any = None  # distributed DP: the noisy integer sum that is uploaded instead of an update
    ring_bits: int = 0  # distributed DP: the ring Z_2^bits it is uploaded in
    min_cohort: int = 0  # distributed DP: the fewest sites in a sum this site reveals its unmasking shares for


HEAD_FILE = "head.safetensors"  # a site's own task head when heads stay local (peft.head = "local")


@dataclass(frozen=True)
class SharedModel:
    model: Any  # the peft model, its trainable tensors overwritten for each site and round
    tokenizer: Any
    initial_head: AdapterState  # the seeded head as built, for a local-head site that has not trained yet


@functools.lru_cache(maxsize=4)  # one per distinct site configuration (e.g. LoRA rank) a process serves
def shared_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, labels: int, seed: int) -> SharedModel:
    base, tokenizer = load_base_model(model_cfg, labels)
    model = method_for(peft_cfg, model_cfg.task).wrap(base, seed)
    return SharedModel(model, tokenizer, get_head_state(model))


@functools.lru_cache(maxsize=256)
def encoded_site_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[EncodedData, EncodedData]:
    split = site_split(cfg, partition_id, num_partitions)
    tokenizer = shared_model(cfg.model, build_method(cfg).for_site(partition_id).peft, num_labels(cfg),
                             cfg.run.seed).tokenizer
    return _encode(split.train, tokenizer, cfg.model.max_length), _encode(split.eval, tokenizer, cfg.model.max_length)


def _encode(data: SiteData, tokenizer: Any, max_length: int) -> EncodedData:
    if isinstance(data, ClassificationData):
        return encode_classification(data.texts, data.labels, tokenizer, max_length)
    return encode_prompt_response(data.prompts, data.responses, tokenizer, max_length)


class Site:
    """Train or evaluate one site's data starting from a given global adapter."""

    def __init__(self, cfg: RunConfig, partition_id: int, data_partition: tuple[int, int], *,
                 policy_file: str | None = None, ledger_path: str | None = None,
                 audit_files: tuple[str, str] | None = None) -> None:
        """``data_partition`` = (index, count) of the rows this site reads from ``cfg.data`` ((0, 1): all of them)."""
        self.cfg = cfg
        self.partition_id = partition_id
        self.policy_file, self.ledger_path = policy_file, ledger_path
        self.audit_files = audit_files  # (log, key); None: beside the ledger
        self.method: FederatedMethod = build_method(cfg).for_site(partition_id)
        self.shared = shared_model(cfg.model, self.method.peft, num_labels(cfg), cfg.run.seed)
        self.model = self.shared.model
        self.local_head = cfg.peft.head == "local"
        attach_task_heads(self.model, label_names(cfg) if is_multitask(cfg.data) else None)
        train, held_out = encoded_site_data(cfg, *data_partition)
        settings = feature_settings(cfg.model.name, cfg.model.max_length, self.shared.tokenizer)
        cache = Path(cfg.data.feature_cache).expanduser() if cfg.data.feature_cache else self.site_dir()
        self.train_data = self.method.site_data(self.model, train, cache_dir=cache, settings=settings)
        self.eval_data = self.method.site_data(self.model, held_out, cache_dir=cache, settings=settings)

    def load_global(self, global_state: AdapterState) -> None:
        """The global adapter, and with local heads this site's own head (the seeded one until it trains)."""
        state = self.method.local_view(global_state)
        if self.local_head:
            state = {**state, **self.own_head()}
        set_adapter_state(self.model, state, source=f"global adapter received by site {self.partition_id}"
                          + (f" with its own head {self.head_dir() / HEAD_FILE}" if self.local_head else ""))

    def own_head(self) -> AdapterState:
        from safetensors.torch import load_file

        path = self.head_dir() / HEAD_FILE
        return load_file(str(path)) if path.is_file() else self.shared.initial_head

    def save_local_head(self) -> None:
        """Atomically: a crash leaves the previous round's head, never a torn file."""
        from safetensors.torch import save

        write_bytes_atomic(self.head_dir() / HEAD_FILE, save(get_head_state(self.model)))

    def ledger_file(self) -> Path:
        return Path(self.ledger_path) if self.ledger_path else site_ledger_path(self.cfg, str(self.partition_id))

    def site_dir(self) -> Path:
        """The site's own files (ledger, audit log, feature cache): beside its ledger."""
        return self.ledger_file().parent

    def head_dir(self) -> Path:
        """A local head: beside a deployed site's ledger; a simulated site's belongs to the run (<run dir>/sites)."""
        return self.site_dir() if self.ledger_path else run_site_dir(self.cfg, str(self.partition_id))

    def evaluate(self, global_state: AdapterState) -> EvalResult:
        self.load_global(global_state)
        return self.method.local_evaluate(self.model, self.eval_data, self.cfg.train)

    def audit_paths(self) -> tuple[Path, Path]:
        """The site's signed log and its key: the node's, else beside the ledger."""
        if self.audit_files is not None:
            log, key = (Path(p) for p in self.audit_files)
            return log, key
        return self.site_dir() / "audit.jsonl", self.site_dir() / "audit.key"

    def audit(self) -> SiteAudit:
        """The site's own signed log of what left it (and its Ed25519 key, created on first use)."""
        return SiteAudit(*self.audit_paths(), str(self.partition_id))

    def budget(self) -> SiteBudget | None:
        """The site's privacy gate, or None when neither DP nor a site policy is in play."""
        site = str(self.partition_id)
        policy = site_policy(self.cfg, site, self.policy_file)
        if policy is None and not self.cfg.privacy.dp:
            return None
        return SiteBudget(self.cfg, site, policy, self.ledger_file(), audit_log=self.audit_paths()[0])

    def metrics_mode(self) -> str:
        """How this site's reply metrics leave it: the stricter of the run's and its own policy's choice."""
        policy = site_policy(self.cfg, str(self.partition_id), self.policy_file)
        return stricter(self.cfg.privacy.site_metrics, policy.site_metrics if policy else "exact")

    def train_round(self, global_state: AdapterState, server_round: int,
                    instructions: dict[str, Any] | None = None) -> LocalRound:
        """Raises a PrivacyError subclass, before any training, when policy or budget forbid this round.

        ``instructions``: the round's config from the server, for the method (e.g. AdaLoRA's rank mask)."""
        budget = self.budget()
        if budget is not None:
            budget.check_policy()
        if self.cfg.privacy.dp and self.cfg.privacy.dp_mode == "distributed":
            assert budget is not None  # budget() returns one whenever DP is on
            return self.distributed_round(budget, global_state, server_round, instructions or {})
        self.load_global(global_state)
        seed = self.cfg.run.seed * 1_000_003 + server_round * 1009 + self.partition_id
        privacy: dict[str, float] = {}
        ledger_line = None
        with self.method.training(self.model, instructions or {}):
            if self.cfg.privacy.dp:
                assert budget is not None  # budget() returns one whenever DP is on
                result, privacy = self._train_private(budget, server_round, seed)
                ledger_line = budget.ledger.last_line_sha256()
            else:
                result = self.method.local_train(self.model, self.train_data, self.cfg.train, seed=seed,
                                                 proximal_mu=self.proximal_mu())
        if self.local_head:
            self.save_local_head()
        trained, start = get_wire_state(self.model, self.local_head), self.method.local_view(global_state)
        update = self.method.upload({name: trained[name] - start[name] for name in trained}, global_state)
        return LocalRound(self._client_level_dp(update), result, privacy, ledger_line)

    def distributed_round(self, budget: SiteBudget, global_state: AdapterState, server_round: int,
                          instructions: dict[str, Any]) -> LocalRound:
        """One DP step across the sites: this site's noisy integer clipped-gradient sum (see client/distributed)."""
        self.load_global(global_state)
        dim = sum(t.numel() for t in self.method.gradient_template(global_state, server_round).values())
        plan = distributed.checked_plan(self.cfg, instructions, dim=dim, policy=budget.policy)
        needed_mu, planned = distributed.site_round(budget=budget, server_round=server_round, plan=plan)
        accepts = budget.policy.accept_distributed_noise if budget.policy else True
        share = distributed.noise_share(plan, needed_mu=needed_mu, accepts_shares=accepts)
        with self.method.training(self.model, instructions):  # e.g. probe-lora: which tensors this round trains
            values = distributed.release(self.method, self.model, self.train_data, plan, share=share)
        spent = budget.commit_distributed(server_round, planned)
        rows = self.method.num_rows(self.train_data)
        privacy = {wire.EPSILON: spent, wire.SAMPLE_RATE: plan.sample_rate, "noise-share": share,
                   "noise-std-in-sum": needed_mu ** 0.5 / plan.scale}
        return LocalRound({}, TrainResult(float("nan"), 1, rows), privacy, budget.ledger.last_line_sha256(),
                          ring_values=values, ring_bits=plan.bits, min_cohort=plan.cohort)

    def proximal_mu(self) -> float:
        """The local proximal term's weight, where the run's aggregation rule asks sites for one (FedProx)."""
        rule = registered_rules()[self.cfg.federation.aggregation]
        return self.cfg.strategy.proximal_mu if rule.client_proximal_term else 0.0

    def _train_private(self, budget: SiteBudget, server_round: int, seed: int) -> tuple[TrainResult, dict]:
        t = self.cfg.train
        plan = budget.plan(server_round, *planned_steps(len(self.train_data), t.batch_size, t.local_epochs,
                                                        t.max_steps))
        settings = DpSettings(plan.noise_multiplier, plan.max_grad_norm, self.cfg.privacy.grad_sample_mode)
        done = train_private(self.model, self.train_data, self.cfg.train, self.cfg.model.task, seed=seed,
                             dp=settings)
        spent = budget.commit(server_round, plan, done.steps)
        return done.train, {wire.EPSILON: spent, "noise-multiplier": plan.noise_multiplier,
                            wire.SAMPLE_RATE: plan.sample_rate, "dp-steps": done.steps}

    def _client_level_dp(self, update: AdapterState) -> AdapterState:
        """Clip (and, distributed, noise) the whole update; nothing about its norm leaves the site."""
        p = self.cfg.privacy
        if p.client_dp == "off":
            return update
        update = dict(update)
        # Public bookkeeping (e.g. the rank-weight vector of per-site ranks) is not part of the update's norm.
        bookkeeping = {key: update.pop(key) for key in self.method.bookkeeping if key in update}
        clipped, _ = clip_update(update, p.client_clip)
        if p.client_dp == "distributed":
            clipped = add_gaussian(clipped, noise_share_std(p.client_noise_multiplier, p.client_clip,
                                                            self.cfg.federation.min_sites))
        return {**clipped, **bookkeeping}
