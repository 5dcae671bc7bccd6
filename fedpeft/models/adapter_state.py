"""The one place that crosses the peft boundary: adapter tensors out of and into a peft model.

Only what ``get_peft_model_state_dict`` returns ever leaves a site: the adapter weights plus the task head
(``modules_to_save``), never base weights.  Tensors received from the wire are checked against the local model's
names and shapes before they are applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.errors import AdapterMismatchError, ModelError
from fedpeft.models.blocks import is_head

AdapterState = dict[str, Any]  # name -> torch.Tensor (fp32, contiguous, on CPU)
PARTIAL_ATTRIBUTE = "fedpeft_partial"  # set on a base by a partial method: its config, saved with checkpoints


def is_prompt_learning(model: Any) -> bool:
    """Prompt/prefix methods: peft saves their *computed* prompts, not the prompt encoder's trainable parameters."""
    config = getattr(model, "peft_config", {}).get("default")
    return bool(getattr(config, "is_prompt_learning", False))


def is_partial(model: Any) -> bool:
    """A base whose own tensors train (BitFit, layer freezing, full fine-tuning): the partial methods mark it with
    their config, as peft marks a model with its own."""
    return getattr(model, PARTIAL_ATTRIBUTE, None) is not None


def travels_by_parameter(model: Any) -> bool:
    """Methods whose trainable parameters are what travels, by their own names: prompt methods and the partial
    methods, which have no peft state dict at all."""
    return is_prompt_learning(model) or is_partial(model)


def _trainable_parameters(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad and p.numel()}


def get_adapter_state(model: Any) -> AdapterState:
    if travels_by_parameter(model):  # what trains is what travels: the encoder's parameters and the head
        return {name: p.detach().to("cpu").float().contiguous().clone()
                for name, p in _trainable_parameters(model).items()}
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().to("cpu").float().contiguous().clone()
            for name, tensor in get_peft_model_state_dict(model).items()}


def trainable_adapter_names(model: Any) -> set[str]:
    """Names (in peft's state-dict form) of the adapter tensors that train, i.e. that travel.

    Matched by storage, not by name: peft's state-dict names differ from the parameter paths in method-specific
    ways (the adapter name inside or at the end of the path, DoRA's magnitude ``.weight`` dropped).
    """
    from peft import get_peft_model_state_dict

    if travels_by_parameter(model):
        return set(_trainable_parameters(model))
    trainable = {p.data_ptr() for p in model.parameters() if p.requires_grad and p.numel()}
    return {name for name, tensor in get_peft_model_state_dict(model).items()
            if tensor.numel() and tensor.data_ptr() in trainable}


def wire_weight_modules(model: Any) -> dict[str, Any]:
    """Wire name -> the module whose ``weight`` is that travelling tensor, matched by storage as
    ``trainable_adapter_names`` matches: per-example gradients are taken per module and released under wire names.
    A travelling tensor that is no module's weight (a DoRA magnitude, a bias, a prompt table) is refused."""
    import torch
    from peft import get_peft_model_state_dict

    if travels_by_parameter(model):  # what travels is parameters by their paths, not peft's adapter state
        raise ModelError(f"{type(model).__name__}: its tensors travel by parameter, not as peft adapter weights: "
                         "per-example gradients (distributed DP) are computed for LoRA's and the probes' linear "
                         "weights only")
    weights = {module.weight.data_ptr(): module for module in model.modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.requires_grad}
    names = trainable_adapter_names(model)
    out = {}
    for name, tensor in sorted(get_peft_model_state_dict(model).items()):
        if name not in names:
            continue
        if tensor.data_ptr() not in weights:
            raise ModelError(f"'{name}' travels but is not a layer's weight: per-example gradients (distributed DP) "
                             "are computed for linear weights only; use LoRA or the probe methods")
        out[name] = weights[tensor.data_ptr()]
    return out


def untravelled_trainable(model: Any) -> list[str]:
    """Trainable parameters that peft's state dict does not carry (a method fedpeft could not federate)."""
    from peft import get_peft_model_state_dict

    if travels_by_parameter(model):
        return []
    carried = {t.data_ptr() for t in get_peft_model_state_dict(model).values() if t.numel()}
    return [n for n, p in model.named_parameters() if p.requires_grad and p.numel() and p.data_ptr() not in carried]


def get_wire_state(model: Any, local_head: bool = False) -> AdapterState:
    """The trainable part of the adapter state: what a site sends and receives each round (without the task head
    when heads stay local: ``peft.head = "local"``)."""
    names = trainable_adapter_names(model)
    return {name: tensor for name, tensor in get_adapter_state(model).items()
            if name in names and not (local_head and is_head(name))}


def get_head_state(model: Any) -> AdapterState:
    """The trainable task head alone (a site's personal head when heads stay local)."""
    return {name: tensor for name, tensor in get_wire_state(model).items() if is_head(name)}


def _expected_form(full: Mapping[str, Any], trainable: set[str], received: set[str]) -> dict[str, Any]:
    """The accepted form ``received`` has: the full adapter state, the wire state, or the wire state without the
    head (local heads); the wire state when it is none of them, so that the mismatch is reported against it."""
    wire = {k: v for k, v in full.items() if k in trainable}
    headless = {k: v for k, v in wire.items() if not is_head(k)}
    for form in (full, wire, headless):
        if set(form) == received:
            return dict(form)
    return wire


def check_adapter_state(expected: Mapping[str, Any], received: Mapping[str, Any], source: str) -> None:
    """Raise AdapterMismatchError naming the first missing/unexpected key or the first shape disagreement."""
    missing = sorted(set(expected) - set(received))
    unexpected = sorted(set(received) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"{source}: adapter tensors do not match the local model ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}). Server and sites must use the same "
            "model.name, peft.* settings and number of labels")
    for name, tensor in received.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise AdapterMismatchError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, the local model expects "
                f"{tuple(expected[name].shape)}. Check peft.r and the number of labels on both sides")
        if not bool(tensor.isfinite().all()):
            raise AdapterMismatchError(f"{source}: tensor '{name}' contains NaN or infinite values")


def set_adapter_state(model: Any, state: Mapping[str, Any], source: str = "received adapter") -> None:
    """Apply a full adapter state, or the wire state (its trainable part, with or without the task head); anything
    else is refused. A state without the head leaves the model's head as it is."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if travels_by_parameter(model):
        _set_trainable_parameters(model, state, source)
        return
    full = get_peft_model_state_dict(model)
    check_adapter_state(_expected_form(full, trainable_adapter_names(model), set(state)), state, source)
    kept_head = {name: tensor for name, tensor in full.items() if is_head(name) and name not in state}
    result = set_peft_model_state_dict(model, {**kept_head, **state})  # peft needs every head tensor
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatchError(f"{source}: peft rejected {len(unexpected)} tensors, e.g. {unexpected[:2]}")


def _set_trainable_parameters(model: Any, state: Mapping[str, Any], source: str) -> None:
    import torch

    parameters = _trainable_parameters(model)
    check_adapter_state(_expected_form(parameters, set(parameters), set(state)), state, source)
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))


def saved_format(model: Any, state: Mapping[str, Any]) -> AdapterState:
    """The adapter in peft's own save format (what ``PeftModel.from_pretrained`` loads), from the wire state."""
    from peft import get_peft_model_state_dict

    set_adapter_state(model, state, source="global adapter to save")
    return {name: tensor.detach().to("cpu").contiguous().clone()
            for name, tensor in get_peft_model_state_dict(model).items()}
