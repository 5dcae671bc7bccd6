"""AdaLoRA across sites: one rank budget per round, fixed by the server from the aggregated adapter.

AdaLoRA (Zhang et al., 2023) writes each update as ``P diag(E) Q`` and prunes the least important singular values
(entries of E) on a cubic budget schedule. peft's allocator ranks them by each process's own gradient sensitivity,
so run at every site it would prune *different* entries at every site, and the averaged adapter would belong to no
site's rank pattern. fedpeft moves the allocation to the server:

- the schedule is in rounds: ``adalora_warmup_rounds`` at ``adalora_init_r`` per module, then a cubic decrease to
  ``r`` per module on average, then ``adalora_final_rounds`` at that budget;
- after aggregating round t, the server keeps the ``budget(t)`` triplets whose rank-one term ``E_i P_i Q_i`` has
  the largest norm (``|E_i| * ||A_i|| * ||B_:,i||``), over all modules at once, and zeroes the other entries of E;
- the keep mask is sent with the next round's instructions, and each site holds masked entries at zero through its
  local training (DP noise included), so every site trains the same rank pattern.

The importance uses only the aggregated adapter, which the server holds anyway: it works on a secure sum and costs
no privacy (post-processing). It ignores gradient sensitivity, which would need per-site gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fedpeft.errors import AdapterMismatchError

E_SUFFIX = "lora_E"


@dataclass(frozen=True)
class RankSchedule:
    rounds: int
    warmup_rounds: int
    final_rounds: int
    init_r: int
    target_r: int

    @classmethod
    def from_config(cls, cfg: Any) -> RankSchedule:
        p = cfg.peft
        return cls(cfg.federation.rounds, p.adalora_warmup_rounds, p.adalora_final_rounds, p.adalora_init_r, p.r)

    def budget(self, completed_round: int, modules: int) -> int:
        """Triplets kept over all ``modules`` once round ``completed_round`` is aggregated (0: the start)."""
        initial, final = self.init_r * modules, self.target_r * modules
        first_pruning = max(self.warmup_rounds, 1)  # E starts at zero: nothing to rank before one round
        last_pruning = self.rounds - self.final_rounds
        if completed_round < first_pruning:
            return initial
        if completed_round >= last_pruning:
            return final
        progress = (completed_round - first_pruning + 1) / (last_pruning - first_pruning + 1)
        return final + math.ceil((initial - final) * (1 - progress) ** 3)

    def keep(self, state: Mapping[str, Any], completed_round: int) -> dict[str, Any]:
        """The triplets that train after round ``completed_round`` (and survive its aggregate)."""
        return keep_mask(state, self.budget(completed_round, len(singular_value_names(state))))


def singular_value_names(state: Mapping[str, Any]) -> list[str]:
    return sorted(name for name in state if name.endswith(E_SUFFIX))


def triplet_importance(state: Mapping[str, Any], e_name: str) -> Any:
    """The Frobenius norm of each rank-one term ``E_i * B[:, i] A[i, :]`` of one module."""
    stem = e_name[: -len(E_SUFFIX)]
    a, b, e = state[stem + "lora_A"], state[stem + "lora_B"], state[e_name]
    return e.flatten().abs() * a.norm(dim=1) * b.norm(dim=0)


def keep_mask(state: Mapping[str, Any], budget: int) -> dict[str, Any]:
    """The ``budget`` most important triplets over all modules (ties: the earlier name and index win)."""
    import torch

    names = singular_value_names(state)
    scores = torch.cat([triplet_importance(state, name) for name in names])
    order = torch.sort(scores, descending=True, stable=True).indices
    flat = torch.zeros_like(scores, dtype=torch.bool)
    flat[order[:budget]] = True
    sizes = [state[name].numel() for name in names]
    return {name: part.view(state[name].shape) for name, part in zip(names, flat.split(sizes), strict=True)}


def prune(state: Mapping[str, Any], keep: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter with every singular value outside ``keep`` set to zero."""
    return {name: tensor * keep[name] if name in keep else tensor for name, tensor in state.items()}


def pack(keep: Mapping[str, Any]) -> bytes:
    """The mask as bits, in sorted name order (what travels in the round's instructions)."""
    import numpy as np

    bits = np.concatenate([keep[name].flatten().numpy() for name in sorted(keep)])
    return np.packbits(bits).tobytes()


def unpack(data: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    import numpy as np
    import torch

    names = sorted(shapes)
    sizes = [math.prod(shapes[name]) for name in names]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if len(bits) < sum(sizes) or len(bits) >= sum(sizes) + 8:
        raise AdapterMismatchError(f"AdaLoRA rank mask: {len(data)} bytes received for {sum(sizes)} singular "
                                   "values; server and site must use the same model and peft.adalora_init_r")
    parts = np.split(bits[: sum(sizes)].astype(bool), np.cumsum(sizes)[:-1])
    return {name: torch.from_numpy(part.copy()).view(shapes[name]) for name, part in zip(names, parts, strict=True)}


def orthogonality_penalty(model: Any) -> Any:
    """AdaLoRA's regularizer keeping P and Q near orthonormal, so E holds the singular values (None for other
    methods). peft adds it only to a loss the model computes itself; fedpeft computes its losses from logits."""
    import torch

    config = getattr(model, "peft_config", {}).get("default")
    weight = getattr(config, "orth_reg_weight", 0.0) if type(config).__name__ == "AdaLoraConfig" else 0.0
    if not weight:
        return None
    terms = []
    for name, param in model.named_parameters():
        if param.requires_grad and (".lora_A." in name or ".lora_B." in name):
            gram = param @ param.T if ".lora_A." in name else param.T @ param
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device)))
    return weight * torch.stack(terms).mean()


def singular_value_parameters(model: Any) -> dict[str, Any]:
    """The model's E tensors under their adapter-state names (parameter path without the adapter name)."""
    return {name[: -len(".default")]: param for name, param in model.named_parameters()
            if name.endswith(f"{E_SUFFIX}.default")}


@contextmanager
def keep_ranks(model: Any, packed: bytes) -> Iterator[None]:
    """Hold the masked singular values at zero while the site trains: before every forward pass (undoing the last
    step, noisy or not) and once more at the end, so the update leaves them at zero too."""
    import torch

    params = singular_value_parameters(model)
    keep = unpack(packed, {name: tuple(p.shape) for name, p in params.items()})
    masks = [(params[name], mask.to(params[name].device, params[name].dtype)) for name, mask in keep.items()]

    def zero_masked(*_: Any) -> None:
        with torch.no_grad():
            for param, mask in masks:
                param.mul_(mask)

    zero_masked()
    handle = model.register_forward_pre_hook(zero_masked)
    try:
        yield
    finally:
        handle.remove()
        zero_masked()
