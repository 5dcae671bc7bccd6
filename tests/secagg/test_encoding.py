"""Fixed-point ring encoding: exact sums within the rounding bound, unbiased rounding, no wraparound at the limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpeft.errors import SecAggError
from fedpeft.secagg.encoding import (
    decode_sum,
    encode,
    ring_add,
    ring_encoding,
    ring_neg,
    ring_sub,
    ring_sum,
)


def _exact_column_sums(rows: np.ndarray) -> np.ndarray:
    return np.array([math.fsum(col) for col in rows.T])


@pytest.mark.parametrize(("bound", "n", "bits"), [(1.0, 20, 32), (0.37, 7, 32), (3.5, 1000, 32), (1.0, 20, 64)])
def test_sum_of_encodings_is_within_the_stated_error_bound(bound: float, n: int, bits: int) -> None:
    enc = ring_encoding(bound, n, bits)
    rng = np.random.default_rng(0)
    rows = rng.uniform(-bound, bound, size=(n, 2_000))
    total = ring_sum([encode(row, enc, rng) for row in rows])
    error = np.abs(decode_sum(total, enc) - _exact_column_sums(rows))
    # Each value is off by < 1/scale after stochastic rounding, so the sum is off by < n/scale (+ float64 slack).
    assert error.max() < enc.sum_error_bound(n)
    if bits == 32:  # the float64 slack term only matters for 64-bit rings
        assert enc.sum_error_bound(n) == pytest.approx(n / enc.scale, rel=1e-3)


def test_scale_keeps_the_largest_signed_sum_inside_the_ring() -> None:
    enc = ring_encoding(2.5, 100)
    assert enc.scale == math.floor((2**31 - 1) / (100 * 2.5))
    assert 100 * 2.5 * enc.scale < 2**31
    assert enc.modulus == 2**32


def test_stochastic_rounding_is_unbiased() -> None:
    enc = ring_encoding(1.0, 10)
    rng = np.random.default_rng(1)
    for units in (0.3, 12.7, -4.45):
        value = units / enc.scale
        n = 200_000
        levels = decode_sum(encode(np.full(n, value), enc, rng), enc) * enc.scale
        frac = units - math.floor(units)
        sigma = math.sqrt(frac * (1 - frac) / n)  # std of the mean of n Bernoulli(frac) round-ups
        assert set(np.unique(np.round(levels))) == {math.floor(units), math.floor(units) + 1}
        assert abs(levels.mean() - units) < 5 * sigma


def test_values_outside_the_bound_are_clipped() -> None:
    enc = ring_encoding(1.0, 4)
    decoded = decode_sum(encode(np.array([5.0, -7.0, 0.5, 1.0, -1.0]), enc), enc)
    np.testing.assert_allclose(decoded, [1.0, -1.0, 0.5, 1.0, -1.0], atol=1 / enc.scale)


@pytest.mark.parametrize(("bound", "n"), [(1.0, 1), (1.0, 3), (0.725, 50), (10.0, 1000)])
def test_all_clients_at_the_bound_do_not_wrap(bound: float, n: int) -> None:
    # (0.725, 50): bound * scale = 42949672.8, so rounding every value up would give 50 * 42949673 > 2**31 - 1;
    # encode caps each value at max_level to keep the sum in range.
    enc = ring_encoding(bound, n)
    rng = np.random.default_rng(2)
    for sign in (1.0, -1.0):
        encoded = [encode(np.full(1_000, sign * bound), enc, rng) for _ in range(n)]
        assert max(int(np.abs(e.view(np.int32).astype(np.int64)).max()) for e in encoded) <= enc.max_level
        decoded = decode_sum(ring_sum(encoded), enc)
        np.testing.assert_allclose(decoded, sign * n * bound, atol=enc.sum_error_bound(n))


def test_overflowing_parameters_are_refused_with_the_numbers() -> None:
    message = r"bound=1000000\.0 with max_clients=10000 does not fit a 32-bit ring"
    with pytest.raises(SecAggError, match=message) as info:
        ring_encoding(1e6, 10_000)
    assert "wrap" in str(info.value) and "bits=64" in str(info.value)
    assert ring_encoding(1e6, 10_000, bits=64).scale >= 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bound": 0.0, "max_clients": 2},
        {"bound": -1.0, "max_clients": 2},
        {"bound": float("nan"), "max_clients": 2},
        {"bound": float("inf"), "max_clients": 2},
        {"bound": 1.0, "max_clients": 0},
        {"bound": 1.0, "max_clients": 2.5},
        {"bound": 1.0, "max_clients": 2, "bits": 16},
        {"bound": True, "max_clients": 2},
    ],
)
def test_invalid_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(SecAggError):
        ring_encoding(**kwargs)


def test_sum_error_bound_refuses_more_clients_than_planned() -> None:
    with pytest.raises(SecAggError, match="num_clients=11"):
        ring_encoding(1.0, 10).sum_error_bound(11)


def test_non_finite_values_are_rejected_with_a_count() -> None:
    with pytest.raises(SecAggError, match="2 of 4 values are NaN or infinite"):
        encode(np.array([1.0, np.nan, np.inf, 0.0]), ring_encoding(1.0, 2))


def test_wire_dtype_is_four_bytes_per_value() -> None:
    values = np.linspace(-1, 1, 1001, dtype=np.float32)
    out = encode(values, ring_encoding(1.0, 5))
    assert out.dtype == np.uint32 and out.itemsize == 4 and out.nbytes == 4 * values.size
    assert out.shape == values.shape
    assert encode(values.reshape(7, 143), ring_encoding(1.0, 5, bits=64)).dtype == np.uint64


def test_ring_arithmetic_wraps_modulo_two_to_the_bits() -> None:
    a = np.array([2**32 - 1, 5, 0], dtype=np.uint32)
    b = np.array([2, 7, 0], dtype=np.uint32)
    np.testing.assert_array_equal(ring_add(a, b), [1, 12, 0])
    np.testing.assert_array_equal(ring_sub(b, a), [3, 2, 0])
    np.testing.assert_array_equal(ring_neg(b), [2**32 - 2, 2**32 - 7, 0])
    np.testing.assert_array_equal(ring_sum([a, b, a]), [0, 17, 0])
    assert ring_sum([a]) is not a


def test_ring_arithmetic_refuses_mismatched_or_non_ring_arrays() -> None:
    a = np.zeros(3, dtype=np.uint32)
    with pytest.raises(SecAggError, match="uint32 or uint64"):
        ring_add(a, np.zeros(3, dtype=np.int64))
    with pytest.raises(SecAggError, match="share dtype and shape"):
        ring_add(a, np.zeros(4, dtype=np.uint32))
    with pytest.raises(SecAggError, match="share dtype and shape"):
        ring_sum([a, np.zeros(3, dtype=np.uint64)])
    with pytest.raises(SecAggError, match="no arrays"):
        ring_sum([])
    with pytest.raises(SecAggError, match="bits=64"):
        decode_sum(a, ring_encoding(1.0, 2, bits=64))
