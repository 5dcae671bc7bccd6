"""Per-example gradients of linear weights from one forward and one backward pass, and their clipped sum.

Distributed DP beyond the linear probe (``peft.method = "probe-lora"``) needs, for the sampled rows, the sum of
each row's whole gradient (head and LoRA) clipped to norm C. Every tensor that trains there is the weight of a
bias-free ``nn.Linear`` (the head, LoRA's A and B), whose per-example gradient is ``sum_t g_t x_t^T`` over the
row's positions: the module's input ``x`` and the loss's gradient ``g`` at its output -- what Opacus' linear grad
sampler computes. It is done here with a forward hook and one ``torch.autograd.grad`` (not Opacus' module wrapper)
because Opacus records only modules in training mode, which would switch on the base's dropout: the gradient would
then be taken at other features than the ones the head is evaluated on, and would not be reproducible. Rows do not
interact (eval mode, mean pooling per row, no batch statistics), so ``g`` at row i is the gradient of row i's loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from fedpeft.errors import ModelError

MICRO_BATCH = 16  # rows per forward pass: bounds the memory of activations and per-example gradients


def check_linear(name: str, module: Any) -> None:
    """Only a bias-free linear weight has its per-example gradient computed here."""
    import torch

    if not isinstance(module, torch.nn.Linear) or (module.bias is not None and module.bias.requires_grad):
        raise ModelError(f"per-example gradients: '{name}' ({type(module).__name__}) is not a linear layer with a "
                         "trained weight only; fedpeft computes them for bias-free linear weights")


def per_example_gradients(modules: Mapping[str, Any], losses: Callable[[], Any]) -> dict[str, Any]:
    """``name -> (rows, out, in)``: each row's gradient of its loss w.r.t. each module's weight.

    ``losses()`` runs the forward pass and returns one loss per row (shape ``(rows,)``); the modules' inputs and
    outputs are recorded while it runs (a module called twice adds both calls' terms)."""
    import torch

    calls: list[tuple[str, Any, Any]] = []
    handles = [module.register_forward_hook(
        lambda _m, args, out, name=name: calls.append((name, args[0].detach(), out)))
        for name, module in modules.items()]
    try:
        per_row = losses()
    finally:
        for handle in handles:
            handle.remove()
    rows = per_row.shape[0]
    grads = torch.autograd.grad(per_row.sum(), [out for _, _, out in calls], allow_unused=True)
    result = {name: torch.zeros((rows, *module.weight.shape), device=module.weight.device)
              for name, module in modules.items()}
    for (name, x, out), g in zip(calls, grads, strict=True):
        if g is not None:
            result[name] += torch.einsum("bto,bti->boi", g.reshape(rows, -1, out.shape[-1]).float(),
                                         x.reshape(rows, -1, x.shape[-1]).float())
    return result


def clip_and_sum(gradients: Mapping[str, Any], clip: float) -> dict[str, Any]:
    """Sum over rows of each row's gradient (all tensors together) scaled to L2 norm at most ``clip``."""
    import torch

    squares = sum(g.pow(2).flatten(1).sum(1) for g in gradients.values())
    factors = (clip / torch.as_tensor(squares).sqrt().clamp(min=1e-12)).clamp(max=1.0)
    return {name: torch.einsum("b,boi->oi", factors, g) for name, g in gradients.items()}


def clipped_gradient_sum(modules: Mapping[str, Any], batches: Any, losses: Callable[[dict[str, Any]], Any], *,
                         clip: float) -> dict[str, Any]:
    """The clipped per-example gradient sum over every row of ``batches`` (micro-batches of row dicts), computed
    one micro-batch at a time; ``losses(batch)`` gives the batch's per-row losses."""
    import torch

    for name, module in modules.items():
        check_linear(name, module)
    total = {name: torch.zeros_like(module.weight, dtype=torch.float32) for name, module in modules.items()}
    for batch in batches:
        summed = clip_and_sum(per_example_gradients(modules, functools.partial(losses, batch)), clip)
        for name, value in summed.items():
            total[name] += value
    return total


def clipped_rows_sum(modules: Mapping[str, Any], data: Any, rows: Any, losses: Callable[[dict[str, Any]], Any], *,
                     clip: float) -> Any:
    """``clipped_gradient_sum`` over ``rows`` of encoded ``data``, in micro-batches, flattened in sorted-name order
    (the wire order ``fedpeft.secagg.vector`` unflattens): what a site releases in a round of distributed DP."""
    import torch

    from fedpeft.training.batches import trim_batch

    index = torch.as_tensor(rows, dtype=torch.long)
    batches = (trim_batch(data.input_ids[part], data.attention_mask[part], data.labels[part])
               for part in index.split(MICRO_BATCH))
    summed = clipped_gradient_sum(modules, batches, losses, clip=clip)
    return torch.cat([summed[name].flatten().cpu() for name in sorted(summed)]).numpy()
