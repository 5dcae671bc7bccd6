"""Per-example gradients for peft layers whose trainable tensors Opacus cannot reach: IA3 and AdaLoRA.

Opacus computes per-example gradients with hooks on the modules that *own* trainable parameters. IA3's scaling
vectors and AdaLoRA's A, E, B live in ``nn.ParameterDict`` children of the peft layer; a ParameterDict is never
called, so Opacus' hooks on it never fire and the noisy step fails ("per sample gradient not found"). Here the peft
layer's forward pass is observed instead, and each example's gradient is computed in closed form from the tensors
autograd already produces:

- IA3, key/value kind: ``y = base(x) * s``, so ``dL_i/ds = sum_t g_t * z_t`` with ``z = base(x)``;
- IA3, feed-forward kind: ``y = base(x * s)``, so ``dL_i/ds = sum_t x_t * (dL/d(x * s))_t``;
- AdaLoRA: ``y = base(x) + c * h (A * E)^T B^T`` with ``h = dropout(x)`` and ``c = scaling / ranknum``.

The hooks go into Opacus' own hook list, so ``GradSampleModule._close()`` removes them with Opacus' hooks, and they
honour its ``hooks_enabled`` switch; the results are stored as ``param.grad_sample`` for Opacus' optimizer.
"""

from __future__ import annotations

from typing import Any

from fedpeft.errors import ModelError


def attach_peft_grad_samplers(gsm: Any) -> int:
    """Hook every IA3 / AdaLoRA layer inside Opacus' GradSampleModule ``gsm``; returns how many were hooked."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.ia3 import IA3Layer

    handles = gsm._module.autograd_grad_sample_hooks
    hooked = 0
    for name, module in gsm._module.named_modules():
        if isinstance(module, IA3Layer) and _trains(module.ia3_l):
            _require_linear(name, module)
            handles.extend(_ia3_hooks(gsm, module))
            hooked += 1
        elif isinstance(module, AdaLoraLayer) and _trains(module.lora_E):
            _require_linear(name, module)
            handles.extend(_adalora_hooks(gsm, module))
            hooked += 1
    return hooked


def _trains(parameters: Any) -> bool:
    return any(p.requires_grad for p in parameters.values())


def _require_linear(name: str, module: Any) -> None:
    import torch

    if not hasattr(module, "in_features") or isinstance(module.get_base_layer(), torch.nn.Conv2d):
        raise ModelError(f"DP-SGD: {name} ({type(module).__name__}) is not a linear layer; fedpeft computes "
                         "per-example gradients for IA3 and AdaLoRA on linear layers only. Set peft.target_modules "
                         "to linear layers or turn privacy.dp off")


def _recording(gsm: Any, module: Any) -> bool:
    import torch

    return gsm.hooks_enabled and module.training and torch.is_grad_enabled()


def _batch_scale(gsm: Any, batch: int) -> float:
    """Opacus' convention: with a mean loss each backprop carries 1/batch; per-example gradients undo it."""
    return float(batch) if gsm.loss_reduction == "mean" else 1.0


def _accumulate(param: Any, grad_sample: Any) -> None:
    grad_sample = grad_sample.to(param.dtype)
    previous = getattr(param, "grad_sample", None)
    param.grad_sample = grad_sample if previous is None else previous + grad_sample


def _tokens(t: Any) -> Any:
    """(batch, tokens, features) whatever the layer saw: a classifier's pooled (batch, features) has one token."""
    return t.float().reshape(t.shape[0], -1, t.shape[-1])


def _ia3_hooks(gsm: Any, layer: Any) -> list[Any]:
    base = layer.get_base_layer()
    seen: dict[str, Any] = {}

    def remember_input(module: Any, args: tuple[Any, ...]) -> None:
        if _recording(gsm, layer):
            seen["x"] = args[0].detach()

    def remember_base_output(module: Any, args: tuple[Any, ...], output: Any) -> None:
        if _recording(gsm, layer) and not layer.is_feedforward:
            seen["z"] = output.detach()

    def watch_scaled_input(module: Any, args: tuple[Any, ...]) -> None:
        scaled = args[0]
        if _recording(gsm, layer) and layer.is_feedforward and scaled.requires_grad:
            x = seen.pop("x")
            scaled.register_hook(lambda grad: _ia3_sample(gsm, layer, x, grad))

    def watch_output(module: Any, args: tuple[Any, ...], output: Any) -> None:
        if _recording(gsm, layer) and not layer.is_feedforward and output.requires_grad:
            z = seen.pop("z")
            output.register_hook(lambda grad: _ia3_sample(gsm, layer, z, grad))

    return [layer.register_forward_pre_hook(remember_input), base.register_forward_hook(remember_base_output),
            base.register_forward_pre_hook(watch_scaled_input), layer.register_forward_hook(watch_output)]


def _ia3_sample(gsm: Any, layer: Any, other: Any, grad: Any) -> None:
    """Both IA3 kinds reduce to sum over tokens of (the tensor s multiplies) x (the gradient at the product)."""
    per_example = (_tokens(other) * _tokens(grad)).sum(dim=1) * _batch_scale(gsm, grad.shape[0])
    for adapter in layer.active_adapters:
        param = layer.ia3_l[adapter]
        if param.requires_grad:
            _accumulate(param, per_example.view(grad.shape[0], *param.shape))


def _adalora_hooks(gsm: Any, layer: Any) -> list[Any]:
    seen: dict[str, Any] = {}
    handles = []
    for adapter, dropout in layer.lora_dropout.items():
        def remember_dropped(module: Any, args: tuple[Any, ...], output: Any, adapter: str = adapter) -> None:
            if _recording(gsm, layer):
                seen[adapter] = output.detach()
        handles.append(dropout.register_forward_hook(remember_dropped))

    def watch_output(module: Any, args: tuple[Any, ...], output: Any) -> None:
        if _recording(gsm, layer) and output.requires_grad:
            dropped = {adapter: seen.pop(adapter) for adapter in list(seen)}
            output.register_hook(lambda grad: _adalora_sample(gsm, layer, dropped, grad))

    handles.append(layer.register_forward_hook(watch_output))
    return handles


def _adalora_sample(gsm: Any, layer: Any, dropped: dict[str, Any], grad: Any) -> None:
    import torch

    g = _tokens(grad) * _batch_scale(gsm, grad.shape[0])
    for adapter, h in dropped.items():
        a, e, b = (layer.lora_A[adapter].float(), layer.lora_E[adapter].float(), layer.lora_B[adapter].float())
        c = float(layer.scaling[adapter]) / (float(layer.ranknum[adapter]) + 1e-5)
        h = _tokens(h)
        u = h @ (a * e).T  # (batch, tokens, r): the input in the singular basis
        grad_u = c * (g @ b)  # (batch, tokens, r)
        grad_ae = torch.einsum("btr,bti->bri", grad_u, h)  # d/d(A * E), per example
        _accumulate(layer.lora_B[adapter], c * torch.einsum("bto,btr->bor", g, u))
        _accumulate(layer.lora_A[adapter], grad_ae * e)
        _accumulate(layer.lora_E[adapter], (grad_ae * a).sum(dim=-1, keepdim=True))
