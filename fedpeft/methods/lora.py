"""LoRA (Hu et al., 2022) federated, with its variants: FFA-LoRA, DoRA, rsLoRA and per-site (heterogeneous) ranks.

- ``lora_mode = "fedit"`` trains and averages A and B (FedIT); ``"ffa"`` freezes A at the shared seeded init and
  trains only B (FFA-LoRA, Sun et al., 2024): the aggregate of B_k A is then exactly the mean of the sites' B_k A,
  half the adapter travels, and half of it is out of DP noise's reach.
- ``use_dora`` / ``use_rslora``: peft's weight-decomposed LoRA and rank-stabilized scaling.
- ``site_ranks``: site k trains rank r_k <= r (HetLoRA-style); see ``fedpeft.methods.hetero_rank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.config.checks import Rule
from fedpeft.methods import hetero_rank
from fedpeft.methods.base import FederatedMethod, register_method
from fedpeft.models.adapter_state import AdapterState, wire_weight_modules
from fedpeft.models.peft_model import lora_targets
from fedpeft.training import per_example
from fedpeft.training.trainer import example_losses

LORA_MODES = ("fedit", "ffa")


@register_method
class Lora(FederatedMethod):
    name = "lora"
    summary = "low-rank A, B on every target linear layer (+ FFA, DoRA, rsLoRA, per-site ranks)"
    bookkeeping = (hetero_rank.RANK_WEIGHT,)
    distributed_dp = True  # plain LoRA, label words or causal LM (dp_rules)

    @classmethod
    def option_rules(cls, cfg: RunConfig) -> list[Rule]:
        p = cfg.peft
        return [
            ("peft.lora_mode", p.lora_mode, p.lora_mode in LORA_MODES, f"use one of {list(LORA_MODES)}"),
            ("peft.site_ranks", p.site_ranks, hetero_rank.valid_ranks(cfg), "give one rank per site, "
             f"comma-separated, each between 1 and peft.r ({p.r}), for federation.num_sites "
             f"({cfg.federation.num_sites}) sites; not with peft.lora_mode = 'ffa' (a frozen A of another rank is "
             "another A)"),
            ("peft.lora_mode", p.lora_mode, p.method in (cls.name, "probe-lora") or p.lora_mode == "fedit",
             "lora_mode 'ffa' freezes LoRA's A matrices; use it with peft.method = 'lora' or 'probe-lora'"),
            ("peft.site_ranks", p.site_ranks, p.method == cls.name or not p.site_ranks.strip(),
             "per-site ranks are LoRA ranks; leave peft.site_ranks empty for other methods"),
            ("peft.use_dora", p.use_dora, p.method == cls.name or not (p.use_dora or p.use_rslora),
             "use_dora and use_rslora are LoRA options; use them with peft.method = 'lora'"),
        ]

    def dp_rules(self, cfg: RunConfig) -> list[Rule]:
        # Opacus computes per-example gradients per module that owns and uses its parameters; DoRA's magnitude
        # module (called with keyword-only arguments) is not one, in every grad-sample mode (measured).
        distributed = cfg.privacy.dp and cfg.privacy.dp_mode == "distributed"
        return [("privacy.dp", cfg.privacy.dp, not (cfg.privacy.dp and self.peft.use_dora),
                 "DP-SGD (Opacus) cannot compute per-example gradients for DoRA's magnitudes; with privacy.dp use "
                 "peft.method = 'lora' (use_rslora is fine), or turn privacy.dp off"),
                # Distributed DP takes each row's gradient of bias-free linear weights (LoRA's A and B): a new
                # classification head may carry a bias, and per-site ranks upload padded slices, not one gradient.
                ("model.classifier", cfg.model.classifier,
                 not distributed or cfg.model.task == "causal-lm" or cfg.model.classifier == "label-words",
                 "distributed DP with LoRA classifies through label words (no new head to train); set "
                 "model.classifier = 'label-words', or peft.method = 'probe-lora' for a classification head"),
                ("peft.site_ranks", self.peft.site_ranks, not (distributed and self.hetero),
                 "distributed DP sums one gradient of the global adapter's shape; leave peft.site_ranks empty"),
                # The derived schedule's rule (privacy/defaults.py) was fitted to the probe's unit-scale weights;
                # LoRA's B starts at 0 and moves by hundredths, so its step would be wrong by orders of magnitude.
                ("federation.rounds", cfg.federation.rounds, not (distributed and cfg.federation.rounds == 0),
                 "rounds derived from the budget (0) are calibrated for the probe; with LoRA under distributed DP "
                 "set federation.rounds and strategy.server_learning_rate yourself (choose them on validation rows)")]

    def clipped_gradient_sum(self, model: Any, data: Any, rows: Any, clip: float) -> Any:
        """Each sampled row's gradient of its own loss w.r.t. LoRA's A and B, clipped to ``clip`` and summed."""
        model.eval()  # no dropout: the gradient of the function the sites evaluate, reproducibly
        return per_example.clipped_rows_sum(wire_weight_modules(model), data, rows,
                                            lambda batch: example_losses(model, batch, self.task), clip=clip)

    @property
    def hetero(self) -> bool:
        return bool(self.peft.site_ranks.strip())

    def peft_config(self, model: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(task_type=task_type(self.task), r=self.peft.r,
                          lora_alpha=self.peft.alpha,  # type: ignore[arg-type]  # peft says int; scaling is alpha / r
                          lora_dropout=self.peft.dropout, target_modules=lora_targets(model, self.peft),
                          use_dora=self.peft.use_dora, use_rslora=self.peft.use_rslora)

    def prepare(self, peft_model: Any) -> None:
        if self.peft.lora_mode == "ffa":
            freeze_lora_a(peft_model)

    def for_site(self, site: int) -> FederatedMethod:
        if not self.hetero:
            return self
        return SiteRankLora(hetero_rank.site_peft_config(self.peft, hetero_rank.rank_of(self.peft, site)),
                            task=self.task, rounds=self.rounds, global_r=self.peft.r)

    def upload_template(self, global_state: Mapping[str, Any]) -> AdapterState:
        return hetero_rank.wire_template(global_state, hetero=self.hetero)

    def mean_inputs(self, update_sum: Mapping[str, Any], weight_sum: float) -> tuple[AdapterState, float]:
        if hetero_rank.RANK_WEIGHT not in update_sum:
            return dict(update_sum), weight_sum
        return hetero_rank.rank_aware_mean(update_sum, weight_sum), 1.0  # each rank slice has its own weight


class SiteRankLora(Lora):
    """LoRA at one site's own rank r_k <= r: the global adapter is truncated on the way in, the update zero-padded
    (with its rank-weight vector) on the way out."""

    def __init__(self, peft: Any, *, task: str, rounds: int = 1, global_r: int) -> None:
        super().__init__(peft, task=task, rounds=rounds)
        self.global_r = global_r

    def for_site(self, site: int) -> FederatedMethod:
        return self

    def local_view(self, global_state: Mapping[str, Any]) -> AdapterState:
        return hetero_rank.truncate(global_state, self.peft.r)

    def upload(self, update: AdapterState, global_state: Mapping[str, Any]) -> AdapterState:
        return hetero_rank.pad(update, global_state, self.peft.r)


def task_type(task: str) -> Any:
    from peft import TaskType

    return TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM


def freeze_lora_a(peft_model: Any) -> None:
    """FFA-LoRA: A stays at its seeded init; only B (and a head) train and travel."""
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
