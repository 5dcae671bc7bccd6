"""ChaCha20 masks: deterministic per (seed, label), uniform-looking, cancelling in pairs, and fast."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fedpeft.errors import SecAggError
from fedpeft.secagg.encoding import encode, ring_add, ring_encoding, ring_sum
from fedpeft.secagg.masks import expand_mask, pairwise_mask

SEED = bytes(range(32))
N = 1_000_000
# expand_mask(bytes(32), 4): ChaCha20, zero key, nonce = 0^4 || SHA-256(b"fedpeft/secagg/mask/v1:")[:12], little-endian.
KNOWN_ZERO_SEED_WORDS = [3063715329, 3322521851, 4097477467, 2871463003]


def _chi2_pvalue(statistic: float, dof: int) -> float:
    # Wilson-Hilferty normal approximation of the chi-square upper tail (accurate to ~1e-3 relative for dof=255).
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_mask_is_deterministic_for_a_seed_and_label() -> None:
    a = expand_mask(SEED, 1000, label=b"round-1")
    np.testing.assert_array_equal(a, expand_mask(bytearray(SEED), 1000, label=b"round-1"))
    assert a.dtype == np.uint32 and a.flags.writeable
    np.testing.assert_array_equal(expand_mask(SEED, 10, label=b"round-1"), a[:10])
    assert expand_mask(SEED, 1000, bits=64).dtype == np.uint64


def test_other_seed_or_label_gives_an_unrelated_mask() -> None:
    base = expand_mask(SEED, 1000)
    other_seed = expand_mask(bytes(31) + b"\x01", 1000)
    other_label = expand_mask(SEED, 1000, label=b"x")
    for other in (other_seed, other_label):
        assert np.mean(base == other) < 0.01


def test_known_answer_is_stable_across_versions() -> None:
    # Every party must derive the same mask: pin the first words for the all-zero seed and empty label.
    assert expand_mask(bytes(32), 4).tolist() == KNOWN_ZERO_SEED_WORDS


def test_masked_encoding_looks_uniform_and_uncorrelated_with_the_input() -> None:
    enc = ring_encoding(1.0, 100)
    x = np.random.default_rng(3).normal(0.0, 0.3, size=N)
    masked = ring_add(encode(x, enc, np.random.default_rng(4)), expand_mask(SEED, N, label=b"uniformity"))
    counts = np.bincount(masked >> np.uint32(24), minlength=256)
    expected = N / 256
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert _chi2_pvalue(statistic, 255) > 1e-3
    r = np.corrcoef(x, masked.astype(np.float64))[0, 1]
    assert abs(r) < 5 / math.sqrt(N)  # five standard errors of a null correlation


def test_pairwise_masks_cancel_exactly() -> None:
    seed = bytes(reversed(range(32)))
    a = pairwise_mask(seed, 7, 42, 10_000, label=b"r3")
    b = pairwise_mask(seed, 42, 7, 10_000, label=b"r3")
    assert not np.all(a == 0)
    np.testing.assert_array_equal(ring_add(a, b), np.zeros(10_000, dtype=np.uint32))
    enc = ring_encoding(1.0, 2)
    xa, xb = encode(np.full(5, 0.25), enc), encode(np.full(5, -0.5), enc)
    masked = ring_sum([ring_add(xa, a[:5]), ring_add(xb, b[:5])])
    np.testing.assert_array_equal(masked, ring_add(xa, xb))


def test_pairwise_masks_cancel_in_the_64_bit_ring() -> None:
    a = pairwise_mask(SEED, 1, 2, 100, bits=64)
    b = pairwise_mask(SEED, 2, 1, 100, bits=64)
    np.testing.assert_array_equal(ring_add(a, b), np.zeros(100, dtype=np.uint64))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((b"short", 10), "exactly 32 bytes, got 5 bytes"),
        (("x" * 32, 10), "exactly 32 bytes, got str"),
        ((SEED, -1), "length=-1"),
        ((SEED, 1.5), "length=1.5"),
        ((SEED, 10, 16), "bits=16"),
    ],
)
def test_invalid_mask_requests_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(SecAggError, match=message):
        expand_mask(*args)


def test_label_must_be_bytes_and_ids_must_differ() -> None:
    with pytest.raises(SecAggError, match="label must be bytes"):
        expand_mask(SEED, 10, label="round-1")
    with pytest.raises(SecAggError, match="self_id == peer_id"):
        pairwise_mask(SEED, 3, 3, 10)


def test_expanding_a_million_values_is_fast() -> None:
    expand_mask(SEED, 1000)
    start = time.perf_counter()
    expand_mask(SEED, N)
    assert time.perf_counter() - start < 0.5
