"""Value rules of the run config that types alone cannot express: every message names the key, the value and
the fix. ``parse_mapping`` runs them on every config it builds, so a run that cannot be honoured is refused before
anything starts. Rules that need a registry (methods, aggregation rules, accountants, partitioners) or another
part's arithmetic (the secure-aggregation neighbour graph) live in ``fedpeft.composition``; a method's rules about
its own options live in its module in ``fedpeft.methods``."""

from __future__ import annotations

from typing import Any

from fedpeft.config.types import (
    CLASSIFIERS,
    CLIENT_DP_MODES,
    COMPUTE_DTYPES,
    DP_MODES,
    GRAD_SAMPLE_MODES,
    HEAD_MODES,
    QUANTIZATIONS,
    SITE_METRICS,
    TASKS,
    TRUNCATION_SIDES,
    WEIGHTINGS,
    RunConfig,
)
from fedpeft.errors import ConfigError

Rule = tuple[str, Any, bool, str]  # (key, value, holds, fix)
MAX_RUN_NAME_BYTES = 200


def fail(origin: str, key: str, value: Any, rule: str) -> None:
    raise ConfigError(f"{origin}: '{key}' = {value!r} is invalid: {rule}")


def check_rules(rules: list[Rule], origin: str) -> None:
    """Raise ConfigError for the first rule that does not hold."""
    for key, value, holds, fix in rules:
        if not holds:
            fail(origin, key, value, fix)


def check_values(cfg: RunConfig, origin: str) -> None:
    """Raise ConfigError for the first value rule the config breaks."""
    sections = (_model_rules, _classifier_rules, _peft_rules, _train_rules, _federation_rules, _data_rules,
                _privacy_rules, _strategy_rules, _secagg_rules, _run_rules)
    for rules in sections:
        check_rules(rules(cfg), origin)


def _model_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("model.task", cfg.model.task, cfg.model.task in TASKS, f"use one of {list(TASKS)}"),
        ("model.name", cfg.model.name, bool(cfg.model.name.strip()),
         "use a built-in name ('minilm', 'tiny-llama', 'smollm2-135m') or a local model directory"),
        ("model.num_labels", cfg.model.num_labels, cfg.model.num_labels == 0 or cfg.model.num_labels >= 2,
         "use 0 (infer from the data) or the number of classes (at least 2)"),
        ("model.quantization", cfg.model.quantization, cfg.model.quantization in QUANTIZATIONS,
         f"use one of {list(QUANTIZATIONS)}"),
        ("model.compute_dtype", cfg.model.compute_dtype, cfg.model.compute_dtype in COMPUTE_DTYPES,
         f"use one of {list(COMPUTE_DTYPES)}"),
        ("model.max_length", cfg.model.max_length, cfg.model.max_length >= 8, "use at least 8 tokens (e.g. 64)"),
        ("model.truncation_side", cfg.model.truncation_side, cfg.model.truncation_side in TRUNCATION_SIDES,
         f"use one of {list(TRUNCATION_SIDES)}: 'right' keeps a long text's beginning, 'left' its end"),
    ]


def _classifier_rules(cfg: RunConfig) -> list[Rule]:
    """Label words: a causal LM's own head scores a word per class (fedpeft.models.label_words)."""
    m = cfg.model
    if m.classifier != "label-words":
        return [("model.classifier", m.classifier, m.classifier in CLASSIFIERS, f"use one of {list(CLASSIFIERS)}"),
                ("model.label_words", ",".join(m.label_words), not m.label_words,
                 "label words are read only with model.classifier = 'label-words'; set it, or clear them")]
    words, names = m.label_words, cfg.data.label_names
    return [
        ("model.classifier", m.classifier, m.task == "classification",
         "label words classify; a causal-lm run trains on its responses: leave model.classifier = 'head'"),
        ("model.classifier", m.classifier, m.name != "minilm",
         "minilm is an encoder without an LM head; use a decoder ('tiny-llama', 'smollm2-135m' or a local causal "
         "LM directory), or model.classifier = 'head'"),
        ("model.prompt_template", m.prompt_template, m.prompt_template.count("{text}") == 1,
         "put '{text}' exactly once where the text goes, e.g. '{text}\\nAnswer:'"),
        ("model.prompt_template", m.prompt_template, not m.prompt_template.endswith(" "),
         "end it without a space (e.g. 'Answer:'): each label word is scored with its own leading space"),
        ("model.label_words", "", bool(words),
         "give one word per class in class-id order (model.label_words = ['billing', 'access']), or set "
         "data.label_names, whose names then serve as the words"),
        ("model.label_words", ",".join(words), all(w.strip() and "," not in w for w in words)
         and len(set(words)) == len(words), "give each class its own non-empty word, without commas"),
        ("model.label_words", ",".join(words), not names or len(words) == len(names),
         f"give one word per class of data.label_names ({len(names)} classes), in the same order"),
        ("model.label_words", ",".join(words), m.num_labels in (0, len(words)),
         f"give one word per class: model.num_labels is {m.num_labels}"),
        ("peft.head", cfg.peft.head, cfg.peft.head == "aggregate",
         "label words have no head to keep local; use peft.head = 'aggregate' (only the adapter travels)"),
    ]


def _peft_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("peft.r", cfg.peft.r, cfg.peft.r >= 1, "the LoRA rank must be a positive integer (e.g. 8)"),
        ("peft.head", cfg.peft.head, cfg.peft.head in HEAD_MODES, f"use one of {list(HEAD_MODES)}"),
        ("peft.head", cfg.peft.head, cfg.peft.head == "aggregate" or cfg.model.task == "classification",
         "a causal LM has no separate task head; local heads need model.task = 'classification'"),
        ("peft.alpha", cfg.peft.alpha, cfg.peft.alpha > 0, "use a positive scaling (commonly 2 x r)"),
        ("peft.dropout", cfg.peft.dropout, 0.0 <= cfg.peft.dropout < 1.0, "use a probability in [0, 1)"),
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
        ("federation.rounds", cfg.federation.rounds, cfg.federation.rounds >= 1 or (
            cfg.federation.rounds == 0 and cfg.privacy.dp and cfg.privacy.dp_mode == "distributed"),
         "use 1 or more rounds (0 derives them from the budget, with privacy.dp_mode = 'distributed')"),
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
        ("federation.eval_every", cfg.federation.eval_every, cfg.federation.eval_every >= 1,
         "evaluate every round (1) or every k rounds (the last round is always evaluated)"),
        ("federation.max_examples", cfg.federation.max_examples, cfg.federation.max_examples >= 1,
         "use at least 1: the largest example count a site may claim (larger claims are clipped to it)"),
        ("federation.max_update_norm", cfg.federation.max_update_norm,
         cfg.federation.max_update_norm >= 0 and cfg.federation.max_update_norm != float("inf"),
         "use 0 (no server-side clipping) or a positive L2 norm (e.g. 100) each site's update is clipped to"),
        ("federation.weighting", cfg.federation.weighting,
         cfg.privacy.client_dp == "off" or cfg.federation.weighting == "uniform",
         "client-level DP bounds each site's influence by privacy.client_clip only if weights are public and "
         "equal: set federation.weighting = 'uniform'"),
    ]


def _data_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("data.task_column", cfg.data.task_column,
         cfg.model.task == "classification" or not (cfg.data.task_column or cfg.data.source == "synthetic-multitask"),
         "multi-task heads are classification heads; set model.task = 'classification' or clear data.task_column "
         "(a causal LM takes every task as prompt and response)"),
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
    return [
        ("privacy.noise_multiplier", cfg.privacy.noise_multiplier, cfg.privacy.noise_multiplier >= 0,
         "use 0 (derive from privacy.target_epsilon) or a positive noise multiplier"),
        ("privacy.target_epsilon", cfg.privacy.target_epsilon, cfg.privacy.target_epsilon > 0,
         "use a positive budget (e.g. 8)"),
        ("privacy.delta", cfg.privacy.delta, 0 < cfg.privacy.delta < 1, "use a probability well below 1/#examples"),
        ("privacy.max_grad_norm", cfg.privacy.max_grad_norm, cfg.privacy.max_grad_norm > 0,
         "use a positive clipping norm (e.g. 1.0)"),
        ("privacy.grad_sample_mode", cfg.privacy.grad_sample_mode, cfg.privacy.grad_sample_mode in GRAD_SAMPLE_MODES,
         f"use one of {list(GRAD_SAMPLE_MODES)}"),
        ("privacy.client_dp", cfg.privacy.client_dp, cfg.privacy.client_dp in CLIENT_DP_MODES,
         f"use one of {list(CLIENT_DP_MODES)}"),
        ("privacy.client_clip", cfg.privacy.client_clip, cfg.privacy.client_clip > 0, "use a positive norm"),
        ("privacy.dp_mode", cfg.privacy.dp_mode, cfg.privacy.dp_mode in DP_MODES, f"use one of {list(DP_MODES)}"),
        ("privacy.sample_rate", cfg.privacy.sample_rate, 0 <= cfg.privacy.sample_rate <= 1,
         "use a probability in (0, 1], or 0 for 1 (every row in every round's batch)"),
        ("privacy.min_cohort", cfg.privacy.min_cohort, 0 <= cfg.privacy.min_cohort <= cfg.federation.num_sites,
         f"use 0 (the secure-aggregation threshold) or at most federation.num_sites ({cfg.federation.num_sites})"),
        ("privacy.expected_rows", cfg.privacy.expected_rows, cfg.privacy.expected_rows >= 0,
         "use the sites' total training rows, or 0 (a simulation counts them)"),
        ("privacy.site_metrics", cfg.privacy.site_metrics, cfg.privacy.site_metrics in SITE_METRICS,
         f"use one of {list(SITE_METRICS)} (exact: as computed; coarse: rounded; none: no scores or losses)"),
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
        ("strategy.trim_fraction", cfg.strategy.trim_fraction, 0 <= cfg.strategy.trim_fraction < 0.5,
         "use a fraction in [0, 0.5) of the clients to drop on each side (0: the plain mean)"),
    ]


def _secagg_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("secagg.degree", cfg.secagg.degree, cfg.secagg.degree >= 0, "use 0 (automatic) or a positive degree"),
        ("secagg.threshold", cfg.secagg.threshold, cfg.secagg.threshold >= 0,
         "use 0 (automatic) or a positive threshold"),
        ("secagg.clip_range", cfg.secagg.clip_range, cfg.secagg.clip_range > 0, "use a positive range (e.g. 8.0)"),
        ("secagg.max_weight", cfg.secagg.max_weight, cfg.secagg.max_weight >= 1, "use at least 1"),
        ("secagg.bits", cfg.secagg.bits, cfg.secagg.bits in (32, 64), "use 32 (4 bytes per value) or 64"),
        ("secagg.rekey_every", cfg.secagg.rekey_every, cfg.secagg.rekey_every >= 0,
         "use 0 (keys set up once per run) or a positive number of rounds per key set-up"),
    ]


def _run_rules(cfg: RunConfig) -> list[Rule]:
    return [
        ("run.name", cfg.run.name, bool(cfg.run.name) and "/" not in cfg.run.name and cfg.run.name not in (".", ".."),
         "use a plain directory name without '/'"),
        # It names the run directory (and, resumed or numbered, e.g. name-2): file systems allow 255 bytes a name.
        ("run.name", cfg.run.name, len(cfg.run.name.encode("utf-8")) <= MAX_RUN_NAME_BYTES,
         f"use a name of at most {MAX_RUN_NAME_BYTES} bytes (it names the run directory)"),
    ]
