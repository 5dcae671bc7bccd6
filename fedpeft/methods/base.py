"""The contract of a federated PEFT method, and its registry.

A method is peft's triple (config, layer, model) plus what federating it needs, in Flower's spirit of small hooks:
what a site does before local training (its view of the global adapter, e.g. a truncated rank), around it (e.g. a
held rank mask) and after it (what it uploads, e.g. a padded update), and what the server sends with each round
and does with the aggregate (e.g. prune ranks). The server and the sites call these hooks and name no method; the
config's choice list, its errors and docs/methods.md's generator come from ``registered_methods()``.

Adding a method is one module in ``fedpeft/methods/`` with a ``@register_method`` class (plus its options in
``PeftConfig`` when it has new ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from fedpeft.config import PeftConfig, RunConfig, TrainConfig, resolve_quantization
from fedpeft.config.checks import Rule
from fedpeft.errors import ConfigError
from fedpeft.models.adapter_state import AdapterState
from fedpeft.models.peft_model import check_travels, wrap_peft
from fedpeft.registry import Registry
from fedpeft.training.batches import EncodedData
from fedpeft.training.trainer import EvalResult, TrainResult, evaluate, train_local

# How a method's trainable tensors get the per-example gradients DP-SGD needs.
DP_OPACUS = "opacus"  # Opacus' grad samplers (every grad-sample mode)
DP_OWN_SAMPLER = "own-sampler"  # fedpeft's closed-form per-example gradients (hooks / functorch, not ghost)
DP_CAUSAL_LM_ONLY = "causal-lm"  # Opacus, but it fails on the method's classification head (measured)
DP_NONE = "none"

_METHODS: Registry[FederatedMethod] = Registry("peft method", "peft.method", ConfigError)


class FederatedMethod:
    """One value of ``peft.method``. Instances are cheap; build them with ``build_method`` / ``method_for``."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what trains (docs, errors)
    dp_sgd: ClassVar[str] = DP_OPACUS
    trains_base: ClassVar[bool] = False  # the base's own tensors train: the base must not be quantized
    bookkeeping: ClassVar[tuple[str, ...]] = ()  # upload tensors that are public bookkeeping, not the update
    distributed_dp: ClassVar[bool] = False  # gives per-example clipped gradients (``gradient_rows``) for
    # privacy.dp_mode = "distributed"
    label_words: ClassVar[bool] = True  # can classify through label words (model.classifier = "label-words"):
    # it adapts the LM and leaves its forward pass (input ids in, LM-head logits out) as it is

    def __init__(self, peft: PeftConfig, *, task: str, rounds: int = 1) -> None:
        self.peft, self.task, self.rounds = peft, task, rounds

    # ---- configuration ------------------------------------------------------------------------------------------
    @classmethod
    def option_rules(cls, cfg: RunConfig) -> list[Rule]:
        """Rules about the options this method owns, checked for every run (e.g. 'ffa is a LoRA mode')."""
        return []

    def rules(self, cfg: RunConfig) -> list[Rule]:
        """Rules that hold when this method is chosen: DP-SGD support and a trainable (unquantized) base."""
        key, method = "peft.method", self.name
        return [
            (key, method, not (self.trains_base and resolve_quantization(cfg.model) != "none"),
             f"'{method}' trains base weights, which a quantized base cannot; set model.quantization = 'none'"),
            ("privacy.grad_sample_mode", cfg.privacy.grad_sample_mode,
             not (cfg.privacy.dp and self.dp_sgd == DP_OWN_SAMPLER and cfg.privacy.grad_sample_mode == "ghost"),
             f"'{method}' gets per-example gradients from fedpeft's own sampler, which ghost clipping cannot "
             "use; set privacy.grad_sample_mode = 'auto' (hooks)"),
            ("privacy.dp", cfg.privacy.dp,
             not (cfg.privacy.dp and self.dp_sgd == DP_CAUSAL_LM_ONLY and cfg.model.task == "classification"),
             f"DP-SGD (Opacus) fails on {method} with a classification head; with privacy.dp use 'prefix-tuning', "
             "'p-tuning-v2' or 'lora' for classification (prompt methods work with DP for causal-lm)"),
            *self.dp_rules(cfg),
            self.label_words_rule(cfg),
        ]

    def label_words_rule(self, cfg: RunConfig) -> Rule:
        usable = [name for name, cls in registered_methods().items() if cls.label_words]
        return ("peft.method", self.name, self.label_words or cfg.model.classifier != "label-words",
                f"'{self.name}' cannot classify through label words (it replaces the input or the head the words are "
                f"scored with); use one of {usable}, or model.classifier = 'head'")

    def dp_rules(self, cfg: RunConfig) -> list[Rule]:
        """Method-specific reasons DP-SGD cannot run (beyond ``dp_sgd``)."""
        return []

    # ---- the model ----------------------------------------------------------------------------------------------
    def peft_config(self, model: Any) -> Any:
        """peft's config for ``model``."""
        raise NotImplementedError(f"method '{self.name}' builds no peft config")

    def wrap(self, model: Any, seed: int = 0) -> Any:
        """The trainable model: peft's wrapper around the frozen base, seeded so every process agrees."""
        peft_model = wrap_peft(model, self.peft_config(model), seed=seed)
        self.prepare(peft_model)
        check_travels(peft_model, self.name)
        return peft_model

    def prepare(self, peft_model: Any) -> None:
        """After wrapping: freeze or hook what the method needs (FFA-LoRA's A, IA3's output dtype)."""

    def load_saved(self, base: Any, adapter_dir: str) -> Any:
        """A checkpoint this method saved, on a fresh base (peft's own loader by default)."""
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter_dir)

    # ---- a site -------------------------------------------------------------------------------------------------
    def for_site(self, site: int) -> FederatedMethod:
        """This method as site ``site`` runs it (e.g. at its own LoRA rank)."""
        return self

    def local_view(self, global_state: Mapping[str, Any]) -> AdapterState:
        """The global adapter as this site's model holds it."""
        return dict(global_state)

    @contextmanager
    def training(self, model: Any, instructions: Mapping[str, Any]) -> Iterator[None]:
        """Around local training, given the round's instructions from ``round_instructions``."""
        yield

    def upload(self, update: AdapterState, global_state: Mapping[str, Any]) -> AdapterState:
        """What the site sends of its update (e.g. padded to the global shapes, with bookkeeping vectors)."""
        return update

    # ---- local computation (by default the model's own forward, through fedpeft.training) -----------------------
    def site_data(self, model: Any, data: EncodedData, *, cache_dir: Path, settings: dict[str, Any]) -> Any:
        """What the site trains and evaluates on (e.g. cached features instead of tokens)."""
        return data

    def local_train(self, model: Any, data: Any, cfg: TrainConfig, *, seed: int, proximal_mu: float) -> TrainResult:
        return train_local(model, data, cfg, self.task, seed=seed, proximal_mu=proximal_mu)

    def local_evaluate(self, model: Any, data: Any, cfg: TrainConfig) -> EvalResult:
        return evaluate(model, data, cfg.eval_batch_size, self.task)

    def num_rows(self, data: Any) -> int:
        return len(data)

    def clipped_gradient_sum(self, model: Any, data: Any, rows: Any, clip: float) -> Any:
        """The sum over ``rows`` of the per-example gradients, each clipped to ``clip``, flattened in wire order
        (distributed DP; only methods with ``distributed_dp``)."""
        raise NotImplementedError(f"method '{self.name}' gives no per-example gradients for distributed DP")

    # ---- the server ---------------------------------------------------------------------------------------------
    def upload_template(self, global_state: Mapping[str, Any]) -> AdapterState:
        """What one upload looks like (names and shapes), to check and decode uploads against."""
        return dict(global_state)

    def gradient_template(self, global_state: Mapping[str, Any], server_round: int) -> AdapterState:
        """What round ``server_round``'s clipped-gradient sum covers (distributed DP), from the run config and the
        round alone: server and sites derive the same length (e.g. probe-lora: the head alone in its probe rounds)."""
        return self.upload_template(global_state)

    def round_instructions(self, global_state: Mapping[str, Any], completed_round: int) -> dict[str, Any]:
        """Extra instructions for the round after ``completed_round`` (ConfigRecord values)."""
        return {}

    def mean_inputs(self, update_sum: Mapping[str, Any], weight_sum: float) -> tuple[AdapterState, float]:
        """The (sum, weight) a rule divides; a method whose slices have their own weights divides them here."""
        return dict(update_sum), weight_sum

    def after_aggregation(self, global_state: AdapterState, server_round: int) -> AdapterState:
        """The next global adapter from the rule's result (post-processing of the aggregate only)."""
        return global_state


def register_method(cls: type[FederatedMethod]) -> type[FederatedMethod]:
    return _METHODS.register(cls)


def registered_methods() -> dict[str, type[FederatedMethod]]:
    return _METHODS.all()


def method_class(name: str) -> type[FederatedMethod]:
    return _METHODS.get(name)


def method_for(peft: PeftConfig, task: str, rounds: int = 1) -> FederatedMethod:
    return method_class(peft.method)(peft, task=task, rounds=rounds)


def build_method(cfg: RunConfig) -> FederatedMethod:
    """The run's method, as the server runs it (``.for_site(i)``: as site i does)."""
    return method_for(cfg.peft, cfg.model.task, cfg.federation.rounds)
