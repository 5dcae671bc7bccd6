"""Heterogeneous LoRA ranks: truncation, zero-padding with rank weights, and rank-aware averaging by hand."""

from __future__ import annotations

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.config import PeftConfig
from fedpeft.errors import ConfigError
from fedpeft.methods.hetero_rank import RANK_WEIGHT, pad, rank_aware_mean, site_peft_config, truncate
from fedpeft.strategies import WeightedSum, build_rule

A, B, HEAD = "x.lora_A.weight", "x.lora_B.weight", "score.weight"


def _global(rank: int = 4) -> dict[str, torch.Tensor]:
    return {A: torch.arange(rank * 3, dtype=torch.float32).reshape(rank, 3),
            B: torch.arange(2 * rank, dtype=torch.float32).reshape(2, rank), HEAD: torch.ones(2, 2)}


def test_truncate_keeps_the_first_rank_slices():
    local = truncate(_global(), 2)
    assert torch.equal(local[A], _global()[A][:2]) and torch.equal(local[B], _global()[B][:, :2])
    assert torch.equal(local[HEAD], _global()[HEAD])


def test_pad_zero_fills_higher_ranks_and_marks_the_site_ranks():
    update = {A: torch.ones(2, 3), B: torch.ones(2, 2), HEAD: torch.full((2, 2), 3.0)}
    padded = pad(update, _global(), 2)
    assert padded[A].shape == (4, 3) and float(padded[A][2:].abs().sum()) == 0
    assert padded[B].shape == (2, 4) and float(padded[B][:, 2:].abs().sum()) == 0
    assert padded[RANK_WEIGHT].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_each_rank_slice_is_averaged_over_the_sites_that_have_it():
    # site 1: rank 2, weight 1, A rows = 1; site 2: rank 4, weight 3, A rows = 5; heads 2 and 6
    sites = [({A: torch.full((2, 3), 1.0), B: torch.full((2, 2), 1.0), HEAD: torch.full((2, 2), 2.0)}, 2, 1.0),
             ({A: torch.full((4, 3), 5.0), B: torch.full((2, 4), 5.0), HEAD: torch.full((2, 2), 6.0)}, 4, 3.0)]
    total = WeightedSum()
    for update, rank, weight in sites:
        total.add(pad(update, _global(), rank), weight)
    mean = rank_aware_mean(total.update_sum, total.weight_sum)
    assert mean[A][:2].unique().tolist() == [(1 * 1 + 5 * 3) / 4]  # ranks 0-1: both sites
    assert mean[A][2:].unique().tolist() == [5.0]  # ranks 2-3: only the rank-4 site, not diluted by zeros
    assert mean[B][:, 2:].unique().tolist() == [5.0]
    assert mean[HEAD].unique().tolist() == [(2 * 1 + 6 * 3) / 4]
    new = build_rule("fedavg").aggregate(_global(), mean, 1.0)
    assert torch.allclose(new[A][3], _global()[A][3] + 5.0)


def test_alpha_scales_with_rank_so_a_truncated_slice_means_the_same_delta():
    site = site_peft_config(PeftConfig(r=8, alpha=16.0), 2)
    assert (site.r, site.alpha / site.r) == (2, 16.0 / 8)


def test_site_ranks_are_validated():
    assert from_mapping({"peft": {"site_ranks": "2,4,8,8,8"}}).peft.rank_list() == [2, 4, 8, 8, 8]
    for bad in ("2,4", "2,4,8,8,9", "a,b,c,d,e"):
        with pytest.raises(ConfigError, match="peft.site_ranks"):
            from_mapping({"peft": {"site_ranks": bad}})
    with pytest.raises(ConfigError, match="ffa"):
        from_mapping({"peft": {"site_ranks": "2,4,8,8,8", "lora_mode": "ffa"}})
