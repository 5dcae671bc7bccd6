"""A bottleneck adapter (Houlsby et al., 2019; Pfeiffer et al., 2021) as a peft custom LoRA layer.

After the wrapped projection: ``h + s * up(relu(down(h)))`` with ``down``: d -> r, ``up``: r -> d, ``up`` zero at
initialisation (the adapter starts as the identity) and ``s = alpha / r`` as in LoRA. Placed on the attention output
projection and/or the feed-forward output projection of every block.

peft has no bottleneck adapter, and a new peft method needs a new ``PeftType`` member; instead this uses peft's
extension point for custom LoRA layers (``LoraConfig._register_custom_module``): config = a LoraConfig whose
dispatcher builds this layer, layer = ``BottleneckLinear``, model = peft's LoraModel. So the adapter's tensors are
``lora_A`` (down) and ``lora_B`` (up) in peft's state dict, and everything downstream — the wire, DP-SGD on
``nn.Linear`` per-example gradients, secure aggregation, checkpoints — treats it like LoRA. Loading a saved bottleneck
adapter needs the same registration (``fedpeft.json`` beside the adapter says so; see ``fedpeft.models.saved``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from fedpeft.config import RunConfig
from fedpeft.config.checks import Rule
from fedpeft.errors import ModelError
from fedpeft.methods.base import FederatedMethod, register_method
from fedpeft.methods.lora import task_type
from fedpeft.models.saved import mark_config

ADAPTER_PLACEMENTS = ("both", "attention", "ffn")

# The projections closing each block's attention and feed-forward sublayers, per architecture.
PLACEMENTS: dict[str, dict[str, str]] = {
    "llama": {"attention": "o_proj", "ffn": "down_proj"},
    "mistral": {"attention": "o_proj", "ffn": "down_proj"},
    "qwen2": {"attention": "o_proj", "ffn": "down_proj"},
    "bert": {"attention": r"attention\.output\.dense", "ffn": r"layer\.\d+\.output\.dense"},
}


def bottleneck_targets(model_type: str, placement: str) -> str:
    """A peft target regex for the chosen placement ("attention", "ffn" or "both")."""
    names = PLACEMENTS.get(model_type)
    if names is None:
        raise ModelError(f"peft.method = 'bottleneck' has no default placement for model type {model_type!r}; set "
                         f"peft.target_modules to its output projections (known: {sorted(PLACEMENTS)})")
    chosen = [names["attention"], names["ffn"]] if placement == "both" else [names[placement]]
    return r".*\.(" + "|".join(chosen) + r")$"


class BottleneckLinear(LoraLinear):
    """peft's LoRA Linear with the adapter moved after the projection and a non-linearity in its bottleneck."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        width = self.out_features
        assert width is not None  # peft sets it from the wrapped nn.Linear
        like = self.lora_A[adapter_name].weight
        down = nn.Linear(width, r, bias=False, device=like.device, dtype=like.dtype)
        up = nn.Linear(r, width, bias=False, device=like.device, dtype=like.dtype)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = down, up
        nn.init.kaiming_uniform_(down.weight, a=5 ** 0.5)
        nn.init.zeros_(up.weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            down, up = cast(nn.Linear, self.lora_A[name]), self.lora_B[name]  # ModuleDict items are typed Module
            hidden = self._cast_input_dtype(result, down.weight.dtype)
            delta = up(torch.relu(down(self.lora_dropout[name](hidden)))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ModelError("a bottleneck adapter is non-linear and cannot be merged into the base; serve it as an "
                         "adapter (fedpeft export without --merge)")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise ModelError("a bottleneck adapter has no weight delta (it is non-linear)")


def register(lora_config: Any) -> Any:
    """Make ``lora_config`` build bottleneck layers on the Linear layers it targets (4-bit ones included)."""
    lora_config._register_custom_module({nn.Linear: BottleneckLinear})
    return lora_config



@register_method
class Bottleneck(FederatedMethod):
    name = "bottleneck"
    summary = "Houlsby/Pfeiffer adapter after the attention and/or feed-forward output (identity at init)"

    @classmethod
    def option_rules(cls, cfg: RunConfig) -> list[Rule]:
        placement = cfg.peft.adapter_placement
        return [("peft.adapter_placement", placement, placement in ADAPTER_PLACEMENTS,
                 f"use one of {list(ADAPTER_PLACEMENTS)} (where the bottleneck adapter sits in each block)")]

    def peft_config(self, model: Any) -> Any:
        from peft import LoraConfig

        p = self.peft
        targets = list(p.target_modules) or bottleneck_targets(getattr(model.config, "model_type", ""),
                                                               p.adapter_placement)
        config = LoraConfig(task_type=task_type(self.task), r=p.r,
                            lora_alpha=p.alpha,  # type: ignore[arg-type]  # peft says int; scaling is alpha / r
                            lora_dropout=p.dropout, target_modules=targets)
        return mark_config(register(config), self.name)

    def load_saved(self, base: Any, adapter_dir: str) -> Any:
        from peft import LoraConfig, PeftModel

        config = mark_config(register(LoraConfig.from_pretrained(adapter_dir)), self.name)
        return PeftModel.from_pretrained(base, adapter_dir, config=config)
