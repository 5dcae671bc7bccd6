"""IA3 (Liu et al., 2022): learned scaling vectors on keys, values and the feed-forward activations.

DP-SGD gets its per-example gradients from fedpeft's closed-form sampler (``fedpeft.privacy.peft_grad_samplers``):
Opacus' hooks sit on the ParameterDicts that own IA3's vectors, which are never called.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedpeft.methods.base import DP_OWN_SAMPLER, FederatedMethod, register_method
from fedpeft.methods.lora import task_type

if TYPE_CHECKING:
    from torch import nn


@register_method
class Ia3(FederatedMethod):
    name = "ia3"
    summary = "learned scaling vectors on keys, values and feed-forward activations"
    dp_sgd = DP_OWN_SAMPLER

    def peft_config(self, model: Any) -> Any:
        from peft import IA3Config

        # Configured targets scale their outputs (none of them feed-forward); else peft's per-architecture defaults.
        targets = list(self.peft.target_modules) or None
        feedforward: list[str] | None = [] if self.peft.target_modules else None
        return IA3Config(task_type=task_type(self.task), target_modules=targets, feedforward_modules=feedforward)

    def prepare(self, peft_model: Any) -> None:
        keep_outputs_in_compute_dtype(peft_model)


def keep_outputs_in_compute_dtype(peft_model: Any) -> None:
    """IA3's fp32 scaling vectors would promote a bf16 base's keys and values to fp32 (attention then refuses mixed
    dtypes); the scaled output goes back to the dtype the layer received."""
    from peft.tuners.ia3.layer import IA3Layer

    modules: Iterator[nn.Module] = peft_model.modules()
    for module in modules:
        if isinstance(module, IA3Layer):
            module.register_forward_hook(_output_like_input)


def _output_like_input(module: Any, args: tuple[Any, ...], output: Any) -> Any:
    first = args[0] if args else None
    if first is not None and hasattr(first, "dtype") and hasattr(output, "dtype") and output.dtype != first.dtype \
            and first.is_floating_point():
        return output.to(first.dtype)
    return output
