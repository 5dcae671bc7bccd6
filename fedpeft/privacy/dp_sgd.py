"""Example-level DP-SGD on a site's adapter through Opacus: Poisson sampling, per-example clipping, Gaussian noise.

Only the trainable tensors (adapter + task head) get per-example gradients; the frozen (possibly 4-bit) base needs
no grad sampler. The privacy unit is one example (one sequence for causal LMs: ``batch_loss`` averages per sequence).
Accounting is not done here: the site's ledger composes every release (``fedpeft.privacy.ledger``).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from fedpeft.config import TrainConfig
from fedpeft.models.precision import bf16_autocast
from fedpeft.privacy.planning import planned_steps
from fedpeft.training.batches import IGNORE_INDEX, EncodedData, trim_batch
from fedpeft.training.trainer import TrainResult, batch_loss, mean_loss, on_model_device, param_groups


@dataclass(frozen=True)
class DpSettings:
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "hooks"  # hooks | functorch | ghost (resolve "auto" with resolve_grad_sample_mode)


def resolve_grad_sample_mode(mode: str) -> str:
    """``auto``: per-sample gradients through Opacus' hooks, on every device (with fedpeft's fused optimizer step).

    Measured (benchmarks/RESULTS.md): on the 2-core CPU hooks were the cheapest mode for MiniLM LoRA at batch 32
    (1.02-1.12x a plain step; functorch 1.09-1.23x; ghost 1.37x); on an H100 with a 1.26B NF4 Llama + LoRA r=16,
    hooks took 1.35x / 1.56x / 2.47x a plain step at batch 32 / 16 / 8 x 256 tokens, ghost clipping 2.10x / 2.65x /
    2.66x, functorch 3.88x (batch 8); ghost also peaked 50 MiB higher, since LoRA's per-sample gradients are small.
    """
    return "hooks" if mode == "auto" else mode


@dataclass(frozen=True)
class DpTrainResult:
    train: TrainResult
    steps: int  # noisy optimizer steps actually taken (each one is a release the ledger accounts)
    sample_rate: float


def train_private(model: Any, data: EncodedData, cfg: TrainConfig, task: str, *, seed: int,
                  dp: DpSettings) -> DpTrainResult:
    """Train with DP-SGD for exactly the planned steps; the model is left without Opacus hooks afterwards."""
    import torch

    torch.manual_seed(seed)
    rate, budget = planned_steps(len(data), cfg.batch_size, cfg.local_epochs, cfg.max_steps)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    private = make_private(model, optimizer, data, cfg.batch_size, dp=dp)
    try:
        with bf16_autocast(private.module, cfg.autocast) as forward_precision:
            losses = _run_steps(private, task, budget, forward_precision)
    finally:
        private.module._close()  # remove hooks and per-sample buffers: the cached model is reused by other sites
    mean = mean_loss(losses)
    return DpTrainResult(TrainResult(mean, budget, len(data)), budget, rate)


@dataclass(frozen=True)
class Private:
    module: Any  # Opacus GradSampleModule around the peft model
    optimizer: Any  # DPOptimizer (clips, adds noise)
    loader: Any  # Poisson-sampled batches
    criterion: Any = None  # ghost clipping only: the per-sample loss wrapper whose backward clips


def make_private(model: Any, optimizer: Any, data: EncodedData, batch_size: int, *, dp: DpSettings,
                 poisson_sampling: bool = True) -> Private:
    """Opacus' module, optimizer and DP data loader (and, for ghost clipping, criterion) over the site's data."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(data.input_ids, data.attention_mask, data.labels), batch_size=batch_size)
    model.train()  # Opacus refuses a module in eval mode (the site has just evaluated the received adapter)
    mode = resolve_grad_sample_mode(dp.grad_sample_mode)
    extra = {"criterion": torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)} if mode == "ghost" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode=False: torch's default generator draws the noise
        parts = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=poisson_sampling, grad_sample_mode=mode, **extra)
    if mode == "ghost":
        module, optimizer, criterion, loader = parts
        return Private(module, optimizer, loader, criterion)
    from fedpeft.privacy.fused_optimizer import fuse
    from fedpeft.privacy.peft_grad_samplers import attach_peft_grad_samplers

    module, optimizer, loader = parts
    attach_peft_grad_samplers(module)  # IA3 / AdaLoRA tensors, which Opacus' own hooks never reach
    return Private(module, fuse(optimizer), loader)


def private_loss(private: Private, batch: dict[str, Any], task: str) -> Any:
    """The batch loss whose backward yields clipped per-example gradients (one sequence = one example)."""
    if private.criterion is None:
        return batch_loss(private.module, batch, task)[0]
    batch = on_model_device(batch, private.module)
    logits = private.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    if task == "classification":
        return private.criterion(logits, labels)
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    return private.criterion(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), shape=logits.shape)


def _run_steps(private: Private, task: str, budget: int, forward_precision: Any = nullcontext) -> list[Any]:
    """Exactly ``budget`` noisy steps (an empty Poisson batch still takes one: skipping it would leak that)."""
    private.module.train()
    losses: list[Any] = []
    steps = 0
    while steps < budget:
        for input_ids, attention_mask, labels in private.loader:
            private.optimizer.zero_grad(set_to_none=True)
            if len(input_ids) == 0:
                _empty_gradients(private)
            else:
                with forward_precision():
                    loss = private_loss(private, trim_batch(input_ids, attention_mask, labels), task)
                loss.backward()
                losses.append(loss.detach().mean())  # ghost clipping's loss is per sample
            private.optimizer.step()
            steps += 1
            if steps >= budget:
                break
    return losses


def _empty_gradients(private: Private) -> None:
    """What an empty batch contributes before noise: nothing (zero per-sample gradients / a zero clipped sum)."""
    import torch

    for param in private.module.parameters():
        if param.requires_grad:
            if private.criterion is None:
                param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
            else:
                param.grad = torch.zeros_like(param)
