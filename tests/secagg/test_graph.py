"""SecAgg+ neighbour graph: regular, symmetric, deterministic from the public seed; thresholds validated."""

from __future__ import annotations

import pytest

from fedpeft.errors import SecAggError
from fedpeft.secagg.graph import default_degree, default_threshold, neighbours, validate


def _check_regular_symmetric(graph: dict[int, tuple[int, ...]], ids: list[int], degree: int) -> None:
    assert set(graph) == set(ids)
    for node, near in graph.items():
        assert len(near) == len(set(near)) == degree
        assert node not in near
        assert all(node in graph[other] for other in near)


@pytest.mark.parametrize("n", [2, 3, 4, 20, 21, 50, 200, 1000])
def test_default_graph_is_regular_and_symmetric(n: int) -> None:
    ids = [1000 + 37 * i for i in range(n)]
    degree = default_degree(n)
    _check_regular_symmetric(neighbours(ids, degree, b"seed"), ids, degree)
    validate(n, degree, default_threshold(degree))


def test_default_degree_values() -> None:
    assert [default_degree(n) for n in (2, 10, 20)] == [1, 9, 19]
    assert default_degree(21) == 2 * 5 + 2
    assert default_degree(1000) == 2 * 10 + 2
    assert default_degree(100_000) == 2 * 17 + 2
    assert all(default_degree(n) % 2 == 0 for n in range(21, 5000))
    with pytest.raises(SecAggError, match="num_clients=1"):
        default_degree(1)


def test_default_threshold_needs_a_strict_majority_of_the_degree_plus_one_holders() -> None:
    for degree in range(1, 60):
        t = default_threshold(degree)
        assert 2 * t > degree + 1 and 2 * (t - 1) <= degree + 1
    assert [default_threshold(d) for d in (1, 2, 3, 4, 12, 22)] == [2, 2, 3, 3, 7, 12]


def test_small_federations_get_the_complete_graph() -> None:
    ids = [5, 3, 9, 1]
    graph = neighbours(ids, 3, b"any seed")
    assert graph == {1: (3, 5, 9), 3: (1, 5, 9), 5: (1, 3, 9), 9: (1, 3, 5)}


def test_graph_is_deterministic_and_independent_of_input_order() -> None:
    ids = list(range(1, 101))
    graph = neighbours(ids, 8, b"public seed")
    assert graph == neighbours(list(reversed(ids)), 8, b"public seed")


def test_another_seed_gives_another_graph() -> None:
    ids = list(range(1, 101))
    a, b = neighbours(ids, 8, b"seed-a"), neighbours(ids, 8, b"seed-b")
    assert a != b
    shared = sum(len(set(a[i]) & set(b[i])) for i in ids) / (8 * len(ids))
    assert shared < 0.3  # two random 8-regular graphs on 100 nodes share ~8% of edges


def test_sparse_graph_is_not_the_id_order_cycle() -> None:
    ids = list(range(1, 101))
    graph = neighbours(ids, 4, b"seed")
    adjacent_in_id_order = sum((i + 1 in graph[i]) for i in ids[:-1])
    assert adjacent_in_id_order < 20


@pytest.mark.parametrize(
    ("n", "degree", "threshold", "message"),
    [
        (1, 1, 2, "num_clients=1"),
        (10, 0, 1, "degree=0"),
        (10, 10, 6, "degree=10"),
        (50, 7, 5, "degree=7 is odd"),
        (50, 8, 4, r"threshold=4 is invalid for degree=8.*default_threshold\(8\) = 5"),
        (50, 8, 10, "threshold=10"),
        (4, 3, 2, "threshold=2 is invalid for degree=3"),
        (50, 8, 4.5, "threshold=4.5"),
    ],
)
def test_validate_refuses_bad_parameters(n: int, degree: int, threshold: int, message: str) -> None:
    with pytest.raises(SecAggError, match=message):
        validate(n, degree, threshold)


def test_validate_accepts_the_whole_legal_range() -> None:
    validate(50, 8, 5)
    validate(50, 8, 9)
    validate(4, 3, 3)
    validate(4, 3, 4)
    validate(2, 1, 2)
    validate(50, 49, 26)


def test_neighbours_refuses_bad_input() -> None:
    with pytest.raises(SecAggError, match="duplicates"):
        neighbours([1, 2, 2, 3], 2, b"s")
    with pytest.raises(SecAggError, match="odd"):
        neighbours(list(range(30)), 5, b"s")
    with pytest.raises(SecAggError, match="seed must be bytes"):
        neighbours(list(range(30)), 4, "s")
    with pytest.raises(SecAggError, match="not an integer"):
        neighbours([1, 2, "3"], 2, b"s")
