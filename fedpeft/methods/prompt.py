"""The prompt family: prompt tuning (learned input embeddings, Lester et al.), P-tuning (embeddings from a small
MLP, Liu et al.), prefix tuning (key/value prefixes on every layer from an MLP, Li & Liang) and P-tuning v2 (the
same prefixes learned directly). What trains is what travels: the prompt encoder's parameters (and a head); peft
saves the *computed* prompts.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.config.checks import Rule
from fedpeft.errors import ModelError
from fedpeft.methods.base import DP_CAUSAL_LM_ONLY, FederatedMethod, register_method
from fedpeft.methods.lora import task_type


class _PromptMethod(FederatedMethod):
    label_words = False  # peft feeds virtual tokens as embeddings / a cache, which label-word scoring has no use for
    @classmethod
    def option_rules(cls, cfg: RunConfig) -> list[Rule]:
        if cfg.peft.method != cls.name:
            return []
        p = cfg.peft
        return [("peft.virtual_tokens", p.virtual_tokens, p.virtual_tokens >= 1,
                 "use a positive number of virtual tokens (e.g. 16)"),
                ("peft.encoder_hidden_size", p.encoder_hidden_size, p.encoder_hidden_size >= 0,
                 "use 0 (the model's hidden size) or a positive width")]

    def width(self, model: Any) -> int | None:
        return self.peft.encoder_hidden_size or int(getattr(model.config, "hidden_size", 0)) or None

    def common(self) -> dict[str, Any]:
        return {"task_type": task_type(self.task), "num_virtual_tokens": self.peft.virtual_tokens}


@register_method
class PromptTuning(_PromptMethod):
    name = "prompt-tuning"
    summary = "learned input embeddings (virtual tokens)"
    dp_sgd = DP_CAUSAL_LM_ONLY  # Opacus fails inside the classification head's per-example gradient (measured)

    def peft_config(self, model: Any) -> Any:
        from peft import PromptTuningConfig

        return PromptTuningConfig(**self.common())


@register_method
class PTuning(_PromptMethod):
    name = "p-tuning"
    summary = "virtual-token embeddings produced by a small MLP"
    dp_sgd = DP_CAUSAL_LM_ONLY

    def peft_config(self, model: Any) -> Any:
        from peft import PromptEncoderConfig

        # peft annotates encoder_hidden_size as int but defaults it to None (= the model's hidden size)
        return PromptEncoderConfig(**self.common(), encoder_hidden_size=self.width(model))  # type: ignore[arg-type]


@register_method
class PrefixTuning(_PromptMethod):
    name = "prefix-tuning"
    summary = "key/value prefixes on every layer, produced by an MLP"

    def peft_config(self, model: Any) -> Any:
        from peft import PrefixTuningConfig

        check_takes_prefixes(model, self.name)
        # peft annotates encoder_hidden_size as int but defaults it to None (= the model's hidden size)
        return PrefixTuningConfig(**self.common(), prefix_projection=True,
                                  encoder_hidden_size=self.width(model))  # type: ignore[arg-type]


@register_method
class PTuningV2(_PromptMethod):
    name = "p-tuning-v2"
    summary = "key/value prefixes on every layer, learned directly"

    def peft_config(self, model: Any) -> Any:
        from peft import PrefixTuningConfig

        check_takes_prefixes(model, self.name)
        return PrefixTuningConfig(**self.common(), prefix_projection=False)


def check_takes_prefixes(model: Any, method: str) -> None:
    """peft's prefix methods hand their prefixes to the base as ``past_key_values``; a transformers release whose
    model (or backbone) no longer names that argument would fail at the first forward, or silently drop the
    prefixes into ``**kwargs`` (transformers 5.24 renamed it to ``cache`` for Llama; measured)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    for module in (model, backbone):
        if module is not None and "past_key_values" in inspect.signature(module.forward).parameters:
            return
    raise ModelError(f"peft.method = {method!r} passes its prefixes as past_key_values, which "
                     f"{type(model).__name__}.forward of this transformers release does not take; use "
                     "peft.method = 'lora' or 'prompt-tuning', or install the tested versions "
                     "(pip install -e . -c constraints.txt)")
