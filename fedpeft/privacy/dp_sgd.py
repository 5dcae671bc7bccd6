"""Example-level DP-SGD on a site's adapter through Opacus: Poisson sampling, per-example clipping, Gaussian noise.

Only the trainable tensors (adapter + task head) get per-example gradients; the frozen (possibly 4-bit) base needs
no grad sampler. The privacy unit is one example (one sequence for causal LMs: ``batch_loss`` averages per sequence).
Accounting is not done here: the site's ledger composes every release (``fedpeft.privacy.ledger``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from fedpeft.client.batches import EncodedData, trim_batch
from fedpeft.client.trainer import TrainResult, batch_loss, param_groups
from fedpeft.config import TrainConfig
from fedpeft.privacy.accounting import planned_steps


@dataclass(frozen=True)
class DpSettings:
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "hooks"


@dataclass(frozen=True)
class DpTrainResult:
    train: TrainResult
    steps: int  # noisy optimizer steps actually taken (each one is a release the ledger accounts)
    sample_rate: float


def train_private(model: Any, data: EncodedData, cfg: TrainConfig, task: str, seed: int,
                  dp: DpSettings) -> DpTrainResult:
    """Train with DP-SGD for exactly the planned steps; the model is left without Opacus hooks afterwards."""
    import torch

    torch.manual_seed(seed)
    rate, budget = planned_steps(len(data), cfg.batch_size, cfg.local_epochs, cfg.max_steps)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    module, optimizer, private_loader = make_private(model, optimizer, data, cfg.batch_size, dp)
    try:
        losses = _run_steps(module, optimizer, private_loader, task, budget)
    finally:
        module._close()  # remove hooks and per-sample buffers: the cached model is reused by other sites
    mean = sum(losses) / len(losses) if losses else math.nan
    return DpTrainResult(TrainResult(mean, budget, len(data)), budget, rate)


def make_private(model: Any, optimizer: Any, data: EncodedData, batch_size: int, dp: DpSettings,
                 poisson_sampling: bool = True) -> tuple[Any, Any, Any]:
    """Opacus' (GradSampleModule, DPOptimizer, DP data loader) over the site's encoded data."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(data.input_ids, data.attention_mask, data.labels), batch_size=batch_size)
    model.train()  # Opacus refuses a module in eval mode (the site has just evaluated the received adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode=False: torch's default generator draws the noise
        return PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=poisson_sampling, grad_sample_mode=dp.grad_sample_mode)


def _run_steps(module: Any, optimizer: Any, loader: Any, task: str, budget: int) -> list[float]:
    """Exactly ``budget`` noisy steps (an empty Poisson batch still takes one: skipping it would leak that)."""
    module.train()
    losses: list[float] = []
    steps = 0
    while steps < budget:
        for input_ids, attention_mask, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(input_ids) == 0:
                _empty_grad_samples(module)
            else:
                loss, _, _ = batch_loss(module, trim_batch(input_ids, attention_mask, labels), task)
                loss.backward()
                losses.append(float(loss.detach()))
            optimizer.step()
            steps += 1
            if steps >= budget:
                break
    return losses


def _empty_grad_samples(module: Any) -> None:
    import torch

    for param in module.parameters():
        if param.requires_grad:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype)
