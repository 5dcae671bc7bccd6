"""AdaLoRA federated with one rank pattern for every site, fixed by the server (``fedpeft.models.adalora`` has the
schedule, the importance and the mask; this module wires them into a round).

The server sends the keep mask with each round's instructions (``wire.RANK_KEEP``), sites hold masked singular
values at zero through local training, and after aggregating the server prunes the global adapter to the round's
budget. The mask is a function of the aggregate only: it works on a secure sum and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fedpeft import wire
from fedpeft.config import RunConfig
from fedpeft.config.checks import Rule
from fedpeft.methods.base import DP_OWN_SAMPLER, FederatedMethod, register_method
from fedpeft.methods.lora import task_type
from fedpeft.models.adalora import RankSchedule, keep_ranks, pack, prune
from fedpeft.models.adapter_state import AdapterState
from fedpeft.models.peft_model import lora_targets


@register_method
class AdaLora(FederatedMethod):
    name = "adalora"
    summary = "SVD-shaped LoRA (P diag(E) Q); the server prunes singular values to a budget per round"
    dp_sgd = DP_OWN_SAMPLER

    @classmethod
    def option_rules(cls, cfg: RunConfig) -> list[Rule]:
        p = cfg.peft
        if p.method != cls.name:
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

    @property
    def schedule(self) -> RankSchedule:
        p = self.peft
        return RankSchedule(self.rounds, p.adalora_warmup_rounds, p.adalora_final_rounds, p.adalora_init_r, p.r)

    def peft_config(self, model: Any) -> Any:
        from peft import AdaLoraConfig

        # peft's step-based rank allocator is never called: the server fixes the ranks per round; total_step only
        # satisfies AdaLoraConfig's own check.
        p = self.peft
        return AdaLoraConfig(task_type=task_type(self.task), init_r=p.adalora_init_r, target_r=p.r,
                             lora_alpha=p.alpha,  # type: ignore[arg-type]  # peft says int; scaling is alpha / r
                             lora_dropout=p.dropout, target_modules=lora_targets(model, p),
                             total_step=1, orth_reg_weight=p.adalora_orth_reg)

    @contextmanager
    def training(self, model: Any, instructions: Mapping[str, Any]) -> Iterator[None]:
        packed = instructions.get(wire.RANK_KEEP)
        if packed is None:
            yield
            return
        with keep_ranks(model, packed):
            yield

    def round_instructions(self, global_state: Mapping[str, Any], completed_round: int) -> dict[str, Any]:
        return {wire.RANK_KEEP: pack(self.schedule.keep(global_state, completed_round))}

    def after_aggregation(self, global_state: AdapterState, server_round: int) -> AdapterState:
        return prune(global_state, self.schedule.keep(global_state, server_round))
