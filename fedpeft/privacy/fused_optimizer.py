"""Opacus' DP optimizer step over one flat vector instead of one small kernel chain per parameter.

Opacus clips, sums, noises and scales every trainable tensor separately: for a LoRA model of 1B parameters that is
~300 tensors and ~3,000 tiny kernel launches per step, measured at 85 ms of a 0.5 s DP step on an H100 (the plain
optimizer step took 8 ms). Here the per-sample gradients are laid side by side as one (batch, values) matrix: one
norm, one matrix-vector product for the clipped sum, one Gaussian draw, one scale. The arithmetic is Opacus' own —
the per-sample norm over all tensors, the clip factor ``C / (norm + 1e-6)`` capped at 1, noise N(0, (σC)²) per
value — which ``tests/privacy/test_fused_optimizer.py`` checks against the unfused optimizer.
"""

from __future__ import annotations

from typing import Any

from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed


class FusedDPOptimizer(DPOptimizer):
    """A DPOptimizer whose clip/accumulate, noise and scale run on one flat vector (one device, no secure mode)."""

    def clip_and_accumulate(self) -> None:
        import torch

        params = self.params
        samples = [self._get_flat_grad_sample(p) for p in params]
        rows = len(samples[0])
        flat = torch.cat([s.reshape(rows, p.numel()).to(p.dtype) for s, p in zip(samples, params, strict=True)],
                         dim=1)
        clip = (self.max_grad_norm / (flat.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        summed = clip @ flat  # an empty batch gives zeros: (0,) @ (0, values)
        for param, part in zip(params, summed.split([p.numel() for p in params]), strict=True):
            _check_processed_flag(param.grad_sample)
            grad = part.view_as(param)
            param.summed_grad = grad if param.summed_grad is None else param.summed_grad + grad
            _mark_as_processed(param.grad_sample)

    def add_noise(self) -> None:
        import torch

        params = self.params
        for param in params:
            _check_processed_flag(param.summed_grad)
        summed = torch.cat([p.summed_grad.reshape(-1) for p in params])
        std = self.noise_multiplier * self.max_grad_norm
        if std > 0:
            summed += torch.normal(0.0, std, summed.shape, device=summed.device, dtype=summed.dtype,
                                   generator=self.generator)
        for param, part in zip(params, summed.split([p.numel() for p in params]), strict=True):
            param.grad = part.view_as(param)
            _mark_as_processed(param.summed_grad)

    def scale_grad(self) -> None:
        import torch

        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params]
            torch._foreach_div_(grads, self.expected_batch_size * self.accumulated_iterations)


def fuse(optimizer: Any) -> Any:
    """Switch a plain DPOptimizer to the fused step where that is the same computation.

    Left unchanged: Opacus' other optimizers (ghost clipping, per-layer or adaptive clipping, distributed) and
    secure-mode noise, whose steps differ; and parameters on several devices, which one flat vector cannot hold.
    """
    if type(optimizer) is not DPOptimizer or optimizer.secure_mode:
        return optimizer
    if len({p.device for p in optimizer.params}) > 1:
        return optimizer
    optimizer.__class__ = FusedDPOptimizer
    return optimizer
