"""Value rules of the run config that types alone cannot express: every message names the key, the value and
the fix. ``from_mapping`` runs them on every config it builds, so a run that cannot be honoured is refused before
anything starts."""

from __future__ import annotations

from typing import Any

from fedpeft.config import (
    ACCOUNTANTS,
    ADAPTER_PLACEMENTS,
    CLIENT_DP_MODES,
    COMPUTE_DTYPES,
    GRAD_SAMPLE_MODES,
    HEAD_MODES,
    LORA_MODES,
    PARTITIONERS,
    PEFT_METHODS,
    QUANTIZATIONS,
    TASKS,
    WEIGHTINGS,
    RunConfig,
)
from fedpeft.errors import ConfigError
from fedpeft.models.quantization import resolve_quantization

Rule = tuple[str, Any, bool, str]  # (key, value, holds, fix)


def _fail(origin: str, key: str, value: Any, rule: str) -> None:
    raise ConfigError(f"{origin}: '{key}' = {value!r} is invalid: {rule}")


def check_values(cfg: RunConfig, origin: str) -> None:
    """Raise ConfigError for the first rule the config breaks."""
    sections = (_model_rules, _peft_rules, _adalora_rules, _train_rules, _federation_rules, _data_rules, _privacy_rules,
                _strategy_rules, _secagg_rules, _run_rules)
    for rules in sections:
        for key, value, holds, fix in rules(cfg):
            if not holds:
                _fail(origin, key, value, fix)
    _check_registered(cfg, origin)
    if cfg.federation.secure_aggregation:
        _check_secure(cfg, origin)


def _model_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("model.task", cfg.model.task, cfg.model.task in TASKS, f"use one of {list(TASKS)}"),
        ("model.name", cfg.model.name, bool(cfg.model.name.strip()),
         "use a built-in name ('minilm', 'tiny-llama') or a local model directory"),
        ("model.num_labels", cfg.model.num_labels, cfg.model.num_labels == 0 or cfg.model.num_labels >= 2,
         "use 0 (infer from the data) or the number of classes (at least 2)"),
        ("model.quantization", cfg.model.quantization, cfg.model.quantization in QUANTIZATIONS,
         f"use one of {list(QUANTIZATIONS)}"),
        ("model.compute_dtype", cfg.model.compute_dtype, cfg.model.compute_dtype in COMPUTE_DTYPES,
         f"use one of {list(COMPUTE_DTYPES)}"),
        ("model.max_length", cfg.model.max_length, cfg.model.max_length >= 8, "use at least 8 tokens (e.g. 64)"),
    ]


def _peft_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("peft.method", cfg.peft.method, cfg.peft.method in PEFT_METHODS, f"use one of {list(PEFT_METHODS)}"),
        ("peft.lora_mode", cfg.peft.lora_mode, cfg.peft.lora_mode in LORA_MODES, f"use one of {list(LORA_MODES)}"),
        ("peft.site_ranks", cfg.peft.site_ranks, _valid_ranks(cfg), "give one rank per site, comma-separated, each "
         f"between 1 and peft.r ({cfg.peft.r}), for federation.num_sites ({cfg.federation.num_sites}) sites; "
         "not with peft.lora_mode = 'ffa' (a frozen A of another rank is another A)"),
        ("peft.r", cfg.peft.r, cfg.peft.r >= 1, "the LoRA rank must be a positive integer (e.g. 8)"),
        ("peft.virtual_tokens", cfg.peft.virtual_tokens, cfg.peft.virtual_tokens >= 1,
         "use a positive number of virtual tokens (e.g. 16)"),
        ("peft.encoder_hidden_size", cfg.peft.encoder_hidden_size, cfg.peft.encoder_hidden_size >= 0,
         "use 0 (the model's hidden size) or a positive width"),
        ("peft.lora_mode", cfg.peft.lora_mode, cfg.peft.method == "lora" or cfg.peft.lora_mode == "fedit",
         "lora_mode 'ffa' freezes LoRA's A matrices; use it with peft.method = 'lora'"),
        ("peft.site_ranks", cfg.peft.site_ranks, cfg.peft.method == "lora" or not cfg.peft.site_ranks.strip(),
         "per-site ranks are LoRA ranks; leave peft.site_ranks empty for other methods"),
        ("peft.use_dora", cfg.peft.use_dora,
         cfg.peft.method == "lora" or not (cfg.peft.use_dora or cfg.peft.use_rslora),
         "use_dora and use_rslora are LoRA options; use them with peft.method = 'lora'"),
        ("peft.trainable_blocks", cfg.peft.trainable_blocks, cfg.peft.trainable_blocks >= 1,
         "train at least the top block (e.g. 2)"),
        ("peft.method", cfg.peft.method,
         cfg.peft.method not in ("freeze", "full") or resolve_quantization(cfg.model) == "none",
         f"'{cfg.peft.method}' trains base weights, which a quantized base cannot; set model.quantization = 'none'"),
        ("peft.adapter_placement", cfg.peft.adapter_placement, cfg.peft.adapter_placement in ADAPTER_PLACEMENTS,
         f"use one of {list(ADAPTER_PLACEMENTS)} (where the bottleneck adapter sits in each block)"),
        ("peft.head", cfg.peft.head, cfg.peft.head in HEAD_MODES, f"use one of {list(HEAD_MODES)}"),
        ("peft.head", cfg.peft.head, cfg.peft.head == "aggregate" or cfg.model.task == "classification",
         "a causal LM has no separate task head; local heads need model.task = 'classification'"),
        ("peft.alpha", cfg.peft.alpha, cfg.peft.alpha > 0, "use a positive scaling (commonly 2 x r)"),
        ("peft.dropout", cfg.peft.dropout, 0.0 <= cfg.peft.dropout < 1.0, "use a probability in [0, 1)"),
    ]


def _adalora_rules(cfg: RunConfig) -> list[Rule]:
    p = cfg.peft
    if p.method != "adalora":
        return []
    return [
        ("peft.adalora_init_r", p.adalora_init_r, p.adalora_init_r >= p.r,
         f"the initial rank must be at least the final average rank peft.r ({p.r}); e.g. 1.5 x r"),
        ("peft.adalora_warmup_rounds", p.adalora_warmup_rounds, p.adalora_warmup_rounds >= 0, "use 0 or more"),
        ("peft.adalora_final_rounds", p.adalora_final_rounds, p.adalora_final_rounds >= 0, "use 0 or more"),
        ("peft.adalora_warmup_rounds", p.adalora_warmup_rounds,
         p.adalora_warmup_rounds + p.adalora_final_rounds < cfg.federation.rounds,
         f"warm-up plus final rounds ({p.adalora_warmup_rounds} + {p.adalora_final_rounds}) must leave a round "
         f"for pruning within federation.rounds ({cfg.federation.rounds}); lower them or run more rounds"),
        ("peft.adalora_orth_reg", p.adalora_orth_reg, p.adalora_orth_reg >= 0, "use 0 (off) or a positive weight"),
    ]


def _train_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("train.local_epochs", cfg.train.local_epochs, cfg.train.local_epochs >= 1, "use 1 or more"),
        ("train.max_steps", cfg.train.max_steps, cfg.train.max_steps >= 0, "use 0 (no cap) or a positive cap"),
        ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size >= 1, "use a positive batch size"),
        ("train.eval_batch_size", cfg.train.eval_batch_size, cfg.train.eval_batch_size >= 1, "use a positive size"),
        ("train.learning_rate", cfg.train.learning_rate, 0 < cfg.train.learning_rate < 1,
         "use a positive rate below 1 (e.g. 1e-3 for LoRA)"),
        ("train.layer_decay", cfg.train.layer_decay, 0 < cfg.train.layer_decay <= 1,
         "use a factor in (0, 1]: 1 trains every block at learning_rate, 0.8 lowers each block below the top one"),
        ("train.head_learning_rate", cfg.train.head_learning_rate, 0 <= cfg.train.head_learning_rate < 1,
         "use 0 (same as train.learning_rate) or a positive rate below 1"),
        ("train.weight_decay", cfg.train.weight_decay, cfg.train.weight_decay >= 0, "use 0 or a positive decay"),
    ]


def _federation_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("federation.rounds", cfg.federation.rounds, cfg.federation.rounds >= 1, "use 1 or more rounds"),
        ("federation.num_sites", cfg.federation.num_sites, cfg.federation.num_sites >= 1, "use 1 or more sites"),
        ("federation.fraction_train", cfg.federation.fraction_train, 0 < cfg.federation.fraction_train <= 1,
         "use a fraction in (0, 1]"),
        ("federation.min_sites", cfg.federation.min_sites,
         1 <= cfg.federation.min_sites <= cfg.federation.num_sites,
         f"use a number between 1 and federation.num_sites ({cfg.federation.num_sites})"),
        ("federation.weighting", cfg.federation.weighting, cfg.federation.weighting in WEIGHTINGS,
         f"use one of {list(WEIGHTINGS)}"),
        ("federation.round_timeout", cfg.federation.round_timeout, cfg.federation.round_timeout > 0,
         "use a positive number of seconds"),
        ("federation.weighting", cfg.federation.weighting,
         cfg.privacy.client_dp == "off" or cfg.federation.weighting == "uniform",
         "client-level DP bounds each site's influence by privacy.client_clip only if weights are public and "
         "equal: set federation.weighting = 'uniform'"),
        ("federation.aggregation", cfg.federation.aggregation,
         not (cfg.federation.aggregation == "fedprox" and cfg.privacy.dp),
         "FedProx's proximal term is not per-example, so DP-SGD would drop its gradient: use 'fedavg' with "
         "privacy.dp, or turn privacy.dp off"),
    ]


def _data_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("data.task_column", cfg.data.task_column,
         cfg.model.task == "classification" or not (cfg.data.task_column or cfg.data.source == "synthetic-multitask"),
         "multi-task heads are classification heads; set model.task = 'classification' or clear data.task_column "
         "(a causal LM takes every task as prompt and response)"),
        ("data.partitioner", cfg.data.partitioner, cfg.data.partitioner in PARTITIONERS,
         f"use one of {list(PARTITIONERS)}"),
        ("data.dirichlet_alpha", cfg.data.dirichlet_alpha, cfg.data.dirichlet_alpha > 0,
         "use a positive concentration (small = more label skew, e.g. 0.5)"),
        ("data.eval_fraction", cfg.data.eval_fraction, 0 < cfg.data.eval_fraction < 1, "use a fraction in (0, 1)"),
        ("data.synthetic_examples", cfg.data.synthetic_examples, cfg.data.synthetic_examples >= 10,
         "use at least 10 examples"),
        ("data.partition_column", cfg.data.partition_column,
         cfg.data.partitioner != "column" or bool(cfg.data.partition_column),
         "the 'column' partitioner needs data.partition_column naming the site-id column"),
        ("data.label_names", ",".join(cfg.data.label_names),
         len(set(cfg.data.label_names)) == len(cfg.data.label_names)
         and cfg.model.num_labels in (0, len(cfg.data.label_names)),
         "list each class once, in id order; model.num_labels (when set) must equal their number"),
    ]


def _privacy_rules(cfg: RunConfig) -> list[Rule]:
    # Opacus computes per-example gradients per module that owns and uses its parameters; DoRA's magnitude module
    # (called with keyword-only arguments) is not one, in every grad-sample mode: measured, see tests/config.
    # IA3's and AdaLoRA's tensors (ParameterDicts used by their parent) get fedpeft's own per-example gradients,
    # which feed Opacus' per-sample optimizer (hooks / functorch) but not ghost clipping's norm-only pass.
    no_dp_yet = cfg.peft.use_dora
    own_sampler = cfg.peft.method in ("ia3", "adalora")
    # Prompt and P-tuning with a classification head fail inside Opacus' per-example gradient of the head.
    no_dp_cls = cfg.peft.method in ("prompt-tuning", "p-tuning") and cfg.model.task == "classification"
    return [
        ("privacy.dp", cfg.privacy.dp, not (cfg.privacy.dp and no_dp_yet),
         "DP-SGD (Opacus) cannot compute per-example gradients for DoRA's magnitudes; with privacy.dp use "
         "peft.method = 'lora' (use_rslora is fine), or turn privacy.dp off"),
        ("privacy.grad_sample_mode", cfg.privacy.grad_sample_mode,
         not (cfg.privacy.dp and own_sampler and cfg.privacy.grad_sample_mode == "ghost"),
         f"'{cfg.peft.method}' gets per-example gradients from fedpeft's own sampler, which ghost clipping cannot "
         "use; set privacy.grad_sample_mode = 'auto' (hooks)"),
        ("privacy.dp", cfg.privacy.dp, not (cfg.privacy.dp and no_dp_cls),
         "DP-SGD (Opacus) fails on prompt-tuning / p-tuning with a classification head; with privacy.dp use "
         "'prefix-tuning', 'p-tuning-v2' or 'lora' for classification (prompt methods work with DP for causal-lm)"),
        ("privacy.dp", cfg.privacy.dp, not (cfg.privacy.dp and cfg.peft.method == "full"),
         "DP-SGD (Opacus) fails on full fine-tuning of BERT-family bases (position embeddings shared across the "
         "batch have no per-example gradient; measured); with privacy.dp use peft.method = 'freeze' or 'bitfit'"),
        ("privacy.noise_multiplier", cfg.privacy.noise_multiplier, cfg.privacy.noise_multiplier >= 0,
         "use 0 (derive from privacy.target_epsilon) or a positive noise multiplier"),
        ("privacy.target_epsilon", cfg.privacy.target_epsilon, cfg.privacy.target_epsilon > 0,
         "use a positive budget (e.g. 8)"),
        ("privacy.delta", cfg.privacy.delta, 0 < cfg.privacy.delta < 1, "use a probability well below 1/#examples"),
        ("privacy.max_grad_norm", cfg.privacy.max_grad_norm, cfg.privacy.max_grad_norm > 0,
         "use a positive clipping norm (e.g. 1.0)"),
        ("privacy.accountant", cfg.privacy.accountant, cfg.privacy.accountant in ACCOUNTANTS,
         f"use one of {list(ACCOUNTANTS)}"),
        ("privacy.grad_sample_mode", cfg.privacy.grad_sample_mode, cfg.privacy.grad_sample_mode in GRAD_SAMPLE_MODES,
         f"use one of {list(GRAD_SAMPLE_MODES)}"),
        ("privacy.client_dp", cfg.privacy.client_dp, cfg.privacy.client_dp in CLIENT_DP_MODES,
         f"use one of {list(CLIENT_DP_MODES)}"),
        ("privacy.client_clip", cfg.privacy.client_clip, cfg.privacy.client_clip > 0, "use a positive norm"),
        ("privacy.client_noise_multiplier", cfg.privacy.client_noise_multiplier,
         cfg.privacy.client_noise_multiplier >= 0, "use 0 or a positive noise multiplier"),
    ]


def _strategy_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("strategy.server_learning_rate", cfg.strategy.server_learning_rate, cfg.strategy.server_learning_rate >= 0,
         "use 0 (the rule's default) or a positive rate"),
        ("strategy.server_momentum", cfg.strategy.server_momentum, 0 <= cfg.strategy.server_momentum < 1,
         "use a momentum in [0, 1)"),
        ("strategy.beta_1", cfg.strategy.beta_1, 0 <= cfg.strategy.beta_1 < 1, "use a value in [0, 1)"),
        ("strategy.beta_2", cfg.strategy.beta_2, 0 <= cfg.strategy.beta_2 < 1, "use a value in [0, 1)"),
        ("strategy.tau", cfg.strategy.tau, cfg.strategy.tau >= 0, "use 0 (the rule's default) or a positive tau"),
        ("strategy.proximal_mu", cfg.strategy.proximal_mu, cfg.strategy.proximal_mu >= 0, "use 0 or a positive mu"),
    ]


def _secagg_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("secagg.degree", cfg.secagg.degree, cfg.secagg.degree >= 0, "use 0 (automatic) or a positive degree"),
        ("secagg.threshold", cfg.secagg.threshold, cfg.secagg.threshold >= 0,
         "use 0 (automatic) or a positive threshold"),
        ("secagg.clip_range", cfg.secagg.clip_range, cfg.secagg.clip_range > 0, "use a positive range (e.g. 8.0)"),
        ("secagg.max_weight", cfg.secagg.max_weight, cfg.secagg.max_weight >= 1, "use at least 1"),
        ("secagg.bits", cfg.secagg.bits, cfg.secagg.bits in (32, 64), "use 32 (4 bytes per value) or 64"),
    ]


def _run_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("run.name", cfg.run.name, bool(cfg.run.name) and "/" not in cfg.run.name and cfg.run.name not in (".", ".."),
         "use a plain directory name without '/'"),
    ]


def _valid_ranks(cfg: RunConfig) -> bool:
    if not cfg.peft.site_ranks.strip():
        return True
    try:
        ranks = cfg.peft.rank_list()
    except ValueError:
        return False
    return (len(ranks) == cfg.federation.num_sites and all(1 <= r <= cfg.peft.r for r in ranks)
            and cfg.peft.lora_mode != "ffa")


def _check_registered(cfg: RunConfig, origin: str) -> None:
    from fedpeft.strategies import registered_rules  # local: strategies import torch, config must stay light

    rules = registered_rules()
    if cfg.federation.aggregation not in rules:
        _fail(origin, "federation.aggregation", cfg.federation.aggregation, f"use one of {sorted(rules)}")
    if cfg.federation.secure_aggregation and not rules[cfg.federation.aggregation].works_on_secure_sum:
        secure = sorted(name for name, rule in rules.items() if rule.works_on_secure_sum)
        _fail(origin, "federation.aggregation", cfg.federation.aggregation,
              f"this rule needs individual updates, which secure aggregation never reveals; use one of {secure} "
              "or set federation.secure_aggregation = false")


def _check_secure(cfg: RunConfig, origin: str) -> None:
    """The neighbour graph and threshold must be buildable for the sites a round samples."""
    from fedpeft.errors import SecAggError
    from fedpeft.secagg.graph import default_degree, default_threshold, validate

    fed = cfg.federation
    sampled = max(fed.min_sites, round(fed.fraction_train * fed.num_sites))
    if sampled < 2:
        _fail(origin, "federation.num_sites", fed.num_sites, "secure aggregation needs at least 2 sites per round")
    degree = min(cfg.secagg.degree or default_degree(sampled), sampled - 1)
    threshold = cfg.secagg.threshold or default_threshold(degree)
    try:
        validate(sampled, degree, threshold)
    except SecAggError as err:
        raise ConfigError(f"{origin}: [secagg] for {sampled} sites per round: {err}") from None
