"""The fused DP optimizer step is Opacus' step: same clipped sum, same scale, noise of the same law."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedpeft.privacy.dp_sgd import DpSettings, _empty_gradients, make_private
from fedpeft.privacy.fused_optimizer import FusedDPOptimizer, fuse
from fedpeft.training.batches import trim_batch
from fedpeft.training.trainer import batch_loss
from tests.privacy.test_dp_sgd import TASKS, _setup, _trainable


def _gradients(task: str, fused: bool, noise: float = 0.0, clip: float = 0.05) -> dict[str, torch.Tensor]:
    model, data = _setup(task)
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=0.0)
    private = make_private(model, optimizer, data, len(data), dp=DpSettings(noise, clip, "hooks"),
                           poisson_sampling=False)
    assert type(private.optimizer) is FusedDPOptimizer
    if not fused:
        private.optimizer.__class__ = DPOptimizer
    private.module.train()
    batch_loss(private.module, trim_batch(data.input_ids, data.attention_mask, data.labels), task)[0].backward()
    private.optimizer.step()
    grads = {n: p.grad.detach().clone() for n, p in _trainable(model).items()}
    private.module._close()
    return grads


@pytest.mark.parametrize("task", TASKS)
def test_without_noise_the_fused_step_gives_opacus_gradients(task):
    fused, reference = _gradients(task, fused=True), _gradients(task, fused=False)
    assert fused.keys() == reference.keys()
    for name, grad in fused.items():
        assert grad.shape == reference[name].shape
        assert torch.allclose(grad, reference[name], rtol=1e-5, atol=1e-8), name
    assert any(grad.abs().sum() > 0 for grad in fused.values())


def _noise_only(fused: bool) -> torch.Tensor:
    """The gradient of an empty Poisson batch: Opacus' noise N(0, (σC)²) / expected batch size, nothing else."""
    model, data = _setup("classification")
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=0.0)
    private = make_private(model, optimizer, data, 4, dp=DpSettings(2.0, 0.5, "hooks"), poisson_sampling=False)
    if not fused:
        private.optimizer.__class__ = DPOptimizer
    private.optimizer.zero_grad(set_to_none=True)
    _empty_gradients(private)
    private.optimizer.step()
    noise = torch.cat([p.grad.flatten() for p in _trainable(model).values()]) * private.optimizer.expected_batch_size
    private.module._close()
    return noise


def test_the_fused_noise_has_opacus_law_and_an_empty_batch_still_steps():
    fused, reference = _noise_only(True), _noise_only(False)
    assert fused.numel() == reference.numel() > 5_000
    for noise in (fused, reference):  # σC = 1.0; the standard error of a std over n draws is ~1/sqrt(2n) < 0.01
        assert abs(float(noise.std()) - 1.0) < 0.05
        assert abs(float(noise.mean())) < 0.05


def test_fuse_leaves_other_opacus_optimizers_alone():
    model, data = _setup("classification")
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=0.0)
    private = make_private(model, optimizer, data, 4, dp=DpSettings(1.0, 1.0, "ghost"), poisson_sampling=False)
    assert type(private.optimizer) is not FusedDPOptimizer
    assert fuse(private.optimizer) is private.optimizer and type(private.optimizer) is not FusedDPOptimizer
    private.module._close()
