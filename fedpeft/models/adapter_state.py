"""The one place that crosses the peft boundary: adapter tensors out of and into a peft model.

Only what ``get_peft_model_state_dict`` returns ever leaves a site: the adapter weights plus the task head
(``modules_to_save``), never base weights.  Tensors received from the wire are checked against the local model's
names and shapes before they are applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.errors import AdapterMismatchError

AdapterState = dict[str, Any]  # name -> torch.Tensor (fp32, contiguous, on CPU)


def get_adapter_state(model: Any) -> AdapterState:
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().to("cpu").float().contiguous().clone()
            for name, tensor in get_peft_model_state_dict(model).items()}


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
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    check_adapter_state(get_peft_model_state_dict(model), state, source)
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatchError(f"{source}: peft rejected {len(unexpected)} tensors, e.g. {unexpected[:2]}")
