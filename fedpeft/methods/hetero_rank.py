"""Heterogeneous LoRA ranks (HetLoRA-style): sites train rank r_k <= r; updates are zero-padded to the global rank r,
and each rank slice is averaged over the sites that have it (rank-aware weights).

Everything stays a sum: each site adds one extra vector, ``RANK_WEIGHT`` = (1 for its ranks, 0 above), which the
weighted sum turns into sum_k w_k * [j < r_k] per rank j -- so the same path serves secure aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fedpeft.config import PeftConfig, RunConfig

RANK_WEIGHT = "fedpeft.rank_weight"  # travels with the update; never part of an adapter


def rank_of(peft: PeftConfig, site: int) -> int:
    ranks = peft.rank_list()
    return ranks[site] if ranks else peft.r


def valid_ranks(cfg: RunConfig) -> bool:
    """``peft.site_ranks``: empty, or one rank in [1, r] per site, and not with FFA (a frozen A of another rank is
    another A)."""
    if not cfg.peft.site_ranks.strip():
        return True
    try:
        ranks = cfg.peft.rank_list()
    except ValueError:
        return False
    return (len(ranks) == cfg.federation.num_sites and all(1 <= r <= cfg.peft.r for r in ranks)
            and cfg.peft.lora_mode != "ffa")


def site_peft_config(peft: PeftConfig, rank: int) -> PeftConfig:
    """Rank r_k with alpha scaled so that alpha_k / r_k == alpha / r: a truncated slice means the same delta."""
    if rank == peft.r:
        return peft
    return replace(peft, r=rank, alpha=peft.alpha * rank / peft.r, site_ranks="")


def truncate(state: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The global (rank r) adapter as a rank-``rank`` site sees it: A's first rows, B's first columns."""
    return {name: _rank_slice(name, tensor, rank) for name, tensor in state.items()}


def _rank_slice(name: str, tensor: Any, rank: int) -> Any:
    if ".lora_A." in name:
        return tensor[:rank]
    if ".lora_B." in name:
        return tensor[:, :rank]
    return tensor


def pad(update: Mapping[str, Any], template: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """Zero-pad a rank-``rank`` update to the template's (global) shapes and add the rank-weight vector."""
    import torch

    out: dict[str, Any] = {}
    for name, like in template.items():
        padded = torch.zeros_like(like)
        if ".lora_A." in name:
            padded[:rank] = update[name]
        elif ".lora_B." in name:
            padded[:, :rank] = update[name]
        else:
            padded = update[name].clone()
        out[name] = padded
    global_rank = next((t.shape[0] for n, t in template.items() if ".lora_A." in n), rank)
    out[RANK_WEIGHT] = (torch.arange(global_rank) < rank).float()
    return out


def wire_template(global_state: Mapping[str, Any], hetero: bool) -> dict[str, Any]:
    """What one site upload looks like: the global adapter, plus the rank-weight vector with heterogeneous ranks."""
    import torch

    if not hetero:
        return dict(global_state)
    rank = next(t.shape[0] for n, t in global_state.items() if ".lora_A." in n)
    return {**global_state, RANK_WEIGHT: torch.zeros(rank)}


def rank_aware_mean(update_sum: Mapping[str, Any], weight_sum: float) -> dict[str, Any]:
    """The mean update with each rank slice divided by the weight of the sites that have that rank (0 if none)."""
    per_rank = update_sum[RANK_WEIGHT]
    safe = per_rank.clamp(min=1e-12)
    has_rank = (per_rank > 0).to(per_rank.dtype)
    out = {}
    for name, total in update_sum.items():
        if name == RANK_WEIGHT:
            continue
        if ".lora_A." in name:
            out[name] = total / safe[:, None] * has_rank[:, None]
        elif ".lora_B." in name:
            out[name] = total / safe[None, :] * has_rank[None, :]
        else:
            out[name] = total / weight_sum
    return out
