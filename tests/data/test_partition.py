"""Tests for fedpeft.data.partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.data import (
    label_skew,
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    train_eval_split,
)
from fedpeft.errors import DataError

LABELS = [i % 5 for i in range(500)]


def _assert_valid(partitions: list[list[int]], num_items: int) -> None:
    flat = [i for p in partitions for i in p]
    assert sorted(flat) == list(range(num_items)), "partitions must be disjoint and cover every row"
    assert all(p == sorted(p) and p for p in partitions)
    assert all(isinstance(i, int) for i in flat)


def test_iid_valid_deterministic_and_balanced() -> None:
    parts = partition_iid(103, 4, seed=1)
    _assert_valid(parts, 103)
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    assert parts == partition_iid(103, 4, seed=1)
    assert parts != partition_iid(103, 4, seed=2)


def test_dirichlet_valid_and_deterministic() -> None:
    parts = partition_dirichlet(LABELS, 6, alpha=0.5, seed=0)
    _assert_valid(parts, len(LABELS))
    assert parts == partition_dirichlet(LABELS, 6, alpha=0.5, seed=0)
    assert parts != partition_dirichlet(LABELS, 6, alpha=0.5, seed=1)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skewed = label_skew(LABELS, partition_dirichlet(LABELS, 5, alpha=0.1, seed=0))
    mild = label_skew(LABELS, partition_dirichlet(LABELS, 5, alpha=100.0, seed=0))
    iid = label_skew(LABELS, partition_iid(len(LABELS), 5, seed=0))
    assert skewed > 0.4
    assert skewed > 3 * mild and skewed > 3 * iid
    assert iid < 0.15 and mild < 0.15


def test_dirichlet_respects_min_partition_size() -> None:
    parts = partition_dirichlet(LABELS, 5, alpha=0.3, seed=2, min_partition_size=20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_min_size_failure_message() -> None:
    with pytest.raises(DataError, match="raise alpha, lower num_partitions or add data"):
        partition_dirichlet(LABELS, 10, alpha=0.01, seed=0, min_partition_size=45)


def test_dirichlet_not_enough_rows() -> None:
    with pytest.raises(DataError, match="add data"):
        partition_dirichlet([0, 1, 0], 4, alpha=1.0, seed=0)


def test_by_column_sorted_groups() -> None:
    groups = ["h2", "h1", "h2", "h3", "h1"]
    parts = partition_by_column(groups)
    assert parts == [[1, 4], [0, 2], [3]]
    _assert_valid(parts, len(groups))
    assert partition_by_column(groups, num_partitions=3) == parts


def test_by_column_mismatch() -> None:
    pattern = r"3 distinct values.*num_partitions is 2.*set federation.num_sites to 3"
    with pytest.raises(DataError, match=pattern):
        partition_by_column(["a", "b", "c", "a"], num_partitions=2)


def test_train_eval_split_properties() -> None:
    indices = list(range(10, 60))
    train, evaluation = train_eval_split(indices, 0.2, seed=0)
    assert len(evaluation) == 10 and len(train) == 40
    assert sorted(train + evaluation) == indices
    assert train == sorted(train) and evaluation == sorted(evaluation)
    assert (train, evaluation) == train_eval_split(indices, 0.2, seed=0)
    assert evaluation != train_eval_split(indices, 0.2, seed=1)[1]


def test_train_eval_split_edge_cases() -> None:
    assert train_eval_split([7, 8], 0.1, seed=0)[1] in ([7], [8])  # at least one eval row
    assert train_eval_split([3, 4, 5], 0.0, seed=0) == ([3, 4, 5], [])
    assert train_eval_split([3], 0.1, seed=0) == ([3], [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_train_eval_split_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match=r"eval_fraction=.*\[0, 1\)"):
        train_eval_split([1, 2, 3], fraction, seed=0)


def test_train_eval_split_no_train_rows() -> None:
    with pytest.raises(DataError, match="leaves no training rows"):
        train_eval_split([1, 2], 0.9, seed=0)
    with pytest.raises(DataError, match="leaves no training rows"):
        train_eval_split([], 0.2, seed=0)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: partition_iid(10, 0, seed=0), "num_partitions=0"),
        (lambda: partition_iid(3, 4, seed=0), "num_items=3"),
        (lambda: partition_dirichlet(LABELS, 3, alpha=0.0, seed=0), "alpha=0.0"),
        (
            lambda: partition_dirichlet(LABELS, 3, alpha=1.0, seed=0, min_partition_size=0),
            "min_partition_size=0",
        ),
        (lambda: partition_dirichlet([], 3, alpha=1.0, seed=0), "labels is empty"),
        (lambda: partition_by_column([]), "partition column is empty"),
        (lambda: label_skew(LABELS, [[0, 1], []]), "partition 1 is empty"),
    ],
)
def test_argument_errors(call, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        call()


def test_label_skew_bounds() -> None:
    labels = [0, 0, 1, 1]
    assert label_skew(labels, [[0, 2], [1, 3]]) == pytest.approx(0.0)
    assert label_skew(labels, [[0, 1], [2, 3]]) == pytest.approx(0.5)
    assert np.isfinite(label_skew(LABELS, [list(range(len(LABELS)))]))
