"""The run's configuration as frozen, typed dataclasses, and the value lists of keys whose choices are fixed.

Validated once, when a run config is built (``fedpeft.config.parse_mapping``, then ``fedpeft.composition``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

TASKS = ("classification", "causal-lm")
QUANTIZATIONS = ("auto", "none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("fp32", "bf16")
TRUNCATION_SIDES = ("right", "left")
CLASSIFIERS = ("head", "label-words")  # classification: a new trained head, or label words scored on the LM head
# Methods, aggregation rules, accountants and partitioners are registered classes above this layer; their choice
# lists come from those registries (fedpeft.composition checks them).
HEAD_MODES = ("aggregate", "local")
WEIGHTINGS = ("num-examples", "uniform")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ghost")
CLIENT_DP_MODES = ("off", "central", "distributed")
DP_MODES = ("local", "distributed")
SITE_METRICS = ("exact", "coarse", "none")  # how a site's reply metrics leave it, least to most withheld


@dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm"  # a built-in name ("minilm", "tiny-llama", "smollm2-135m") or a local HF model directory
    task: str = "classification"
    max_length: int = 64
    # Which end of a text longer than max_length is cut: "right" keeps its beginning, "left" keeps its end (where a
    # report or an abstract puts its results; a label-word prompt goes on after the kept part either way).
    truncation_side: str = "right"
    num_labels: int = 0  # classification classes; 0: infer from the data (possible wherever the data is readable)
    quantization: str = "auto"  # frozen base: auto (nf4 for causal-lm, none for classification), none, nf4, fp4, int8
    double_quant: bool = True  # 4-bit only: quantize the quantization constants too (QLoRA)
    compute_dtype: str = "bf16"  # dtype of the quantized matmuls and the unquantized base parts: bf16 | fp32
    gradient_checkpointing: bool = False
    # Classification: "head" (a new head on the base) or "label-words" (a causal LM scores each class's word after
    # the prompt on its own LM head: fedpeft.models.label_words). In [model], not [data]: the loader builds the
    # classifier from this section alone, and sites cache the base by it.
    classifier: str = "head"
    prompt_template: str = "{text}\nAnswer:"  # label-words: the prompt; "{text}" is replaced by the text
    label_words: tuple[str, ...] = ()  # label-words: one word per class in id order, each scored after a space;
    # empty: data.label_names (filled in when the config is parsed)


@dataclass(frozen=True)
class PeftConfig:
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()  # empty: the architecture's default targets
    lora_mode: str = "fedit"  # fedit: train and average A and B; ffa: A frozen at a shared seeded init (FFA-LoRA)
    site_ranks: str = ""  # heterogeneous ranks, one per site ("4,8,8"), each <= r; "": every site uses r
    use_dora: bool = False  # LoRA: weight-decomposed LoRA (DoRA): a trained magnitude vector per target too
    use_rslora: bool = False  # LoRA: rank-stabilized scaling alpha / sqrt(r) instead of alpha / r
    virtual_tokens: int = 16  # prompt / p-tuning / prefix methods: learned tokens (per layer for prefix methods)
    encoder_hidden_size: int = 0  # p-tuning / prefix-tuning reparameterization MLP width; 0: the model's hidden size
    adapter_placement: str = "both"  # bottleneck: after the attention output, the feed-forward output, or both
    trainable_blocks: int = 2  # freeze: the top blocks that train (with the task head); the others stay frozen
    head: str = "aggregate"  # classification head: "aggregate" (travels like the adapter) or "local" (personalized)
    adalora_init_r: int = 12  # adalora: every module starts at this rank; the server prunes to r per module on average
    adalora_warmup_rounds: int = 1  # adalora: rounds at the initial rank budget before pruning starts
    adalora_final_rounds: int = 1  # adalora: rounds at the final budget (r per module) after pruning ends
    adalora_orth_reg: float = 0.5  # adalora: weight of the orthogonality penalty on A and B (not applied under DP)
    probe_rounds: int = 0  # probe-lora: the first rounds train only the head (then LoRA too); 0: half the rounds

    def rank_list(self) -> list[int]:
        return [int(x) for x in self.site_ranks.split(",") if x.strip()] if self.site_ranks.strip() else []


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 1
    max_steps: int = 0  # 0: no cap, run the full local epochs
    batch_size: int = 16
    learning_rate: float = 1e-3
    head_learning_rate: float = 2e-2  # task head (classification); 0: same as learning_rate
    layer_decay: float = 1.0  # layered rates: tensors in block i (of L) train at learning_rate * decay^(L-1-i)
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    autocast: bool = False  # forward passes in bf16 autocast (fp32 master weights): less memory and time on GPUs


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 5
    num_sites: int = 5
    fraction_train: float = 1.0
    min_sites: int = 1
    aggregation: str = "fedavg"
    weighting: str = "num-examples"
    round_timeout: float = 600.0
    eval_every: int = 1  # evaluate the global adapter on the sites every k rounds (and after the last round)
    secure_aggregation: bool = False  # the server learns only the sum of the sites' updates (SecAgg+)
    max_examples: int = 10000  # plain: a site's claimed example count (its weight) is clipped to this many
    max_update_norm: float = 100.0  # plain: each site's update is clipped to this L2 norm on the server; 0: off


@dataclass(frozen=True)
class StrategyConfig:
    server_learning_rate: float = 0.0  # 0: the rule's default (fedavgm 1.0, fedadam/fedadagrad 0.1, fedyogi 0.01)
    server_momentum: float = 0.9  # fedavgm
    beta_1: float = 0.9  # fedadam, fedyogi
    beta_2: float = 0.99  # fedadam, fedyogi
    tau: float = 0.0  # adaptivity; 0: the rule's default (1e-9, fedyogi 1e-3)
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term each site adds to its loss
    trim_fraction: float = 0.2  # trimmed-mean: share of clients dropped per side and coordinate, floor(f * n)

    def rule_options(self) -> dict[str, float]:
        options = {"server_momentum": self.server_momentum, "beta_1": self.beta_1, "beta_2": self.beta_2,
                   "tau": self.tau, "trim_fraction": self.trim_fraction}
        if self.server_learning_rate:
            options["server_learning_rate"] = self.server_learning_rate
        return options


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic", "synthetic-multitask" or a path to a .csv/.jsonl file
    synthetic_examples: int = 1500
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 1.0
    partition_column: str = ""
    eval_fraction: float = 0.2
    label_names: tuple[str, ...] = ()  # the federation's classes in id order; needed when sites read their own files
    task_column: str = ""  # multi-task classification: the column naming each row's task (one head per task)
    feature_cache: str = ""  # probe: where a site caches its frozen features ("": the site's own directory)


@dataclass(frozen=True)
class PrivacyConfig:
    dp: bool = False  # example-level DP-SGD (Opacus) at every site
    noise_multiplier: float = 0.0  # 0: derived from target_epsilon for the planned rounds and local steps
    target_epsilon: float = 8.0  # per-site budget over the run (a site's policy file may lower it)
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-example clipping norm C
    accountant: str = "prv"  # prv (tight) | rdp
    grad_sample_mode: str = "auto"  # Opacus: auto (= hooks, fastest measured on CPU and GPU), hooks, functorch, ghost
    client_dp: str = "off"  # client-level DP on the update: off | central (server adds noise) | distributed
    client_clip: float = 1.0  # S: each site's whole update is clipped to this L2 norm
    client_noise_multiplier: float = 1.0  # z: noise std on the sum is z * S
    dp_mode: str = "local"  # local: DP-SGD at each site with the full noise; distributed: one DP step per round
    # across the sites, each adding a share of the noise, under secure aggregation (peft.method = "probe" or
    # "probe-lora")
    sample_rate: float = 0.0  # distributed: each row's probability of being in a round's batch (0: 1, every row)
    min_cohort: int = 0  # distributed: the fewest sites whose noise shares must be in a sum (0: the secagg threshold)
    policy_file: str = ""  # the site's own policy (TOML); it wins over this run config
    policy_optional: bool = False  # true: a site whose policy_file does not exist trains under this config alone
    ledger_dir: str = ""  # where site ledgers live; "": <out_dir>/sites/<data key> (site_budget.site_ledger_path)
    expected_rows: int = 0  # distributed DP with federation.rounds = 0: the sites' total training rows the schedule
    # is derived from (fedpeft.privacy.defaults; a simulation counts them)
    site_metrics: str = "exact"  # exact | coarse | none: the sites' held-out scores, losses and counts
    # (fedpeft.privacy.release; a site's policy key site_metrics can only tighten it)


@dataclass(frozen=True)
class SecAggConfig:
    degree: int = 0  # neighbours each site shares its secrets with; 0: complete graph for small n, O(log n) above
    threshold: int = 0  # shares needed to reconstruct a secret; 0: the SecAgg+ default for the degree
    clip_range: float = 8.0  # each update value is clipped to [-clip_range, clip_range] before fixed-point encoding
    max_weight: float = 10000.0  # the largest site weight (example count); weights travel normalised by it
    bits: int = 32  # ring Z_2^bits of the masked values
    rekey_every: int = 0  # rounds one key set-up serves (then the two set-up exchanges again); 0: the whole run
    accept_two_sites: bool = False  # true: run a secure sum of 2 sites, where each can derive the other's update


@dataclass(frozen=True)
class RunSection:
    name: str = "quickstart"
    out_dir: str = "runs"
    seed: int = 0
    audit_key: str = ""  # the coordinator's Ed25519 audit key (PEM); "": one is made in <run dir>/audit/
    init_from: str = ""  # continual fine-tuning: start from an earlier run's adapter dir (runs/x/adapters/round-N)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    run: RunSection = field(default_factory=RunSection)

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flower's flat run-config shape; tuples become comma-separated strings (Flower has no list values)."""
        flat: dict[str, bool | int | float | str] = {}
        for section in fields(self):
            for item in fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), item.name)
                flat[f"{section.name}.{item.name}"] = ",".join(value) if isinstance(value, tuple) else value
        return flat

    def to_nested(self) -> dict[str, dict[str, Any]]:
        return {k: {ik: list(iv) if isinstance(iv, tuple) else iv for ik, iv in v.items()}
                for k, v in dataclasses.asdict(self).items()}


def resolve_quantization(cfg: ModelConfig) -> str:
    """``auto``: a causal LM's base in NF4 (the mission's 4-bit base; also when it classifies through label words),
    an encoder classifier unquantized."""
    if cfg.quantization == "auto":
        return "nf4" if cfg.task == "causal-lm" or cfg.classifier == "label-words" else "none"
    return cfg.quantization


