"""Fixed-point encoding of floats into the ring Z_2^bits, where secure-aggregation sums are taken.

A float ``x`` in ``[-bound, bound]`` becomes the integer ``round(x * scale)`` (unbiased stochastic rounding), stored in
two's complement as an unsigned ``uint32`` (``bits=32``, 4 bytes a value on the wire) or ``uint64``. Ring sums wrap
modulo ``2**bits``; ``scale`` is chosen so that the signed sum of ``max_clients`` encodings never leaves
``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, hence decodes exactly despite the wraparound of the individual additions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from fedpeft.errors import SecAggError

SUPPORTED_BITS = (32, 64)
# Relative float64 rounding of encode (x * scale) and decode (int -> float, / scale); only visible for bits=64,
# where one unit of the ring (1 / scale) is far below float64 resolution of the values.
_FLOAT_SLACK = 2.0**-50


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def ring_dtype(bits: int) -> np.dtype:
    """The unsigned numpy dtype of a ``bits``-bit ring."""
    if not _is_int(bits) or bits not in SUPPORTED_BITS:
        raise SecAggError(f"bits={bits!r} is not supported; use 32 (4 bytes a value) or 64 (more headroom)")
    return np.dtype(np.uint32) if bits == 32 else np.dtype(np.uint64)


def _signed_dtype(bits: int) -> np.dtype:
    return np.dtype(np.int32) if bits == 32 else np.dtype(np.int64)


@dataclass(frozen=True)
class RingEncoding:
    """Fixed-point parameters shared by every party of a round (build it with :func:`ring_encoding`)."""

    bound: float  # every encoded value lies in [-bound, bound]; values outside are clipped to it
    max_clients: int  # the largest number of encodings that will be summed
    bits: int = 32

    def __post_init__(self) -> None:
        ring_dtype(self.bits)
        b = self.bound
        if not isinstance(b, numbers.Real) or isinstance(b, bool) or not math.isfinite(b) or b <= 0:
            raise SecAggError(f"bound={b!r} is invalid; it must be a finite number > 0 (the clipping norm bound)")
        if not _is_int(self.max_clients) or self.max_clients < 1:
            raise SecAggError(f"max_clients={self.max_clients!r} is invalid; it must be an integer >= 1")
        if self._integer_scale() < 1:
            raise SecAggError(
                f"bound={b!r} with max_clients={self.max_clients} does not fit a {self.bits}-bit ring: "
                f"{self.max_clients} x {b!r} exceeds 2**{self.bits - 1} - 1, so the sum would wrap around; "
                "lower the bound or the number of clients, or use bits=64"
            )

    def _integer_scale(self) -> int:
        # Exact rational arithmetic: a float quotient could round up and let n * bound * scale reach 2**(bits-1).
        top = Fraction((1 << (self.bits - 1)) - 1)
        return math.floor(top / (Fraction(float(self.bound)) * self.max_clients))

    @property
    def scale(self) -> float:
        """Ring units per unit of value: ``floor((2**(bits-1) - 1) / (max_clients * bound))``."""
        return float(self._integer_scale())

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    @property
    def max_level(self) -> int:
        """Largest magnitude (in ring units) of one encoded value: ``max_clients`` of them sum without wrapping."""
        return ((1 << (self.bits - 1)) - 1) // self.max_clients

    def sum_error_bound(self, num_clients: int) -> float:
        """Bound on ``|decode_sum(sum of encodings) - sum of the values|`` for values already within ±bound.

        Stochastic rounding moves each value by less than ``1 / scale``, so a sum of ``num_clients`` values is off by
        less than ``num_clients / scale``; the second term covers float64 rounding (negligible for bits=32).
        Clipping of out-of-range values is not counted.
        """
        if not _is_int(num_clients) or not 1 <= num_clients <= self.max_clients:
            raise SecAggError(
                f"num_clients={num_clients!r} is invalid; it must be an integer in [1, max_clients={self.max_clients}]"
                " (summing more than max_clients encodings may wrap around)"
            )
        return num_clients / self.scale + num_clients * float(self.bound) * _FLOAT_SLACK


def ring_encoding(bound: float, max_clients: int, bits: int = 32) -> RingEncoding:
    """Validated encoding parameters; :class:`SecAggError` if ``max_clients * bound`` would wrap the ring."""
    return RingEncoding(bound=bound, max_clients=max_clients, bits=bits)


def _largest_float_at_most(limit: int) -> float:
    value = float(limit)
    return value if int(value) <= limit else math.nextafter(value, 0.0)


def encode(values: np.ndarray, enc: RingEncoding, rng: np.random.Generator | None = None) -> np.ndarray:
    """Floats -> ring elements of ``enc.dtype`` (same shape): clip, scale, unbiased stochastic rounding.

    ``rng`` only drives the rounding, which must be unbiased but need not be secret (the masks hide the result).
    """
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SecAggError(f"encode: values cannot be read as float numbers ({exc}); pass a numeric array") from exc
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise SecAggError(
            f"encode: {bad} of {x.size} values are NaN or infinite; fix the update (e.g. lower the learning rate "
            "or enable clipping) before secure aggregation"
        )
    rng = np.random.default_rng() if rng is None else rng
    scaled = np.clip(x, -enc.bound, enc.bound) * enc.scale
    levels = np.floor(scaled)
    levels += rng.random(scaled.shape) < (scaled - levels)
    # Rounding up a value within one unit of bound * scale can pass max_level; clipping there keeps the
    # n-client sum inside the signed range (the error stays < 1 unit, only the unbiasedness at the very edge goes).
    limit = _largest_float_at_most(enc.max_level)
    np.clip(levels, -limit, limit, out=levels)
    return levels.astype(np.int64).astype(enc.dtype)


def decode_sum(ring_sum: np.ndarray, enc: RingEncoding) -> np.ndarray:
    """A ring sum of at most ``max_clients`` encodings -> float64 sum of the values (same shape)."""
    arr = _as_ring(ring_sum, "decode_sum: ring_sum")
    if arr.dtype != enc.dtype:
        raise SecAggError(
            f"decode_sum: ring_sum has dtype {arr.dtype} but the encoding uses bits={enc.bits} ({enc.dtype}); "
            "decode with the encoding the values were encoded with"
        )
    return arr.view(_signed_dtype(enc.bits)).astype(np.float64) / enc.scale


def _as_ring(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise SecAggError(
            f"{name} has dtype {arr.dtype}; ring arithmetic needs uint32 or uint64 arrays "
            "(produce them with encode() or expand_mask())"
        )
    return arr


def _ring_pair(a: Any, b: Any, op: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_ring(a, f"{op}: first operand"), _as_ring(b, f"{op}: second operand")
    if x.dtype != y.dtype or x.shape != y.shape:
        raise SecAggError(
            f"{op}: operands differ ({x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}); "
            "ring arrays must share dtype and shape (same bits, same vector length)"
        )
    return x, y


def ring_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a + b) mod 2**bits``."""
    x, y = _ring_pair(a, b, "ring_add")
    return np.add(x, y)


def ring_sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) mod 2**bits``."""
    x, y = _ring_pair(a, b, "ring_sub")
    return np.subtract(x, y)


def ring_neg(a: np.ndarray) -> np.ndarray:
    """``(-a) mod 2**bits``."""
    return np.negative(_as_ring(a, "ring_neg: operand"))


def ring_sum(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of a non-empty sequence of ring arrays, modulo ``2**bits``."""
    if len(arrays) == 0:
        raise SecAggError("ring_sum: got no arrays; pass at least one ring array")
    total = _as_ring(arrays[0], "ring_sum: arrays[0]").copy()
    for i, arr in enumerate(arrays[1:], start=1):
        x, y = _ring_pair(total, arr, f"ring_sum: arrays[{i}]")
        np.add(x, y, out=total)
    return total


def pack_bits(ring: np.ndarray, bits: int) -> np.ndarray:
    """Ring values below ``2**bits`` as a byte array of ``bits`` bits each (little-endian bit order): what travels
    for an integer-valued upload (distributed DP), ``bits / 32`` of a 32-bit word's bytes."""
    values = np.asarray(ring, dtype=np.uint64)
    if not 1 <= bits <= 32:
        raise SecAggError(f"pack_bits: bits={bits!r}; use 1 to 32")
    if values.size and int(values.max()) >> bits:
        raise SecAggError(f"pack_bits: a value does not fit {bits} bits; reduce the ring values modulo 2**{bits}")
    planes = ((values[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``length`` ring values (uint32)."""
    expected = packed_size(length, bits)
    if packed.dtype != np.uint8 or packed.shape != (expected,):
        raise SecAggError(f"unpack_bits: {packed.dtype} {tuple(packed.shape)} received, expected uint8 ({expected},)")
    planes = np.unpackbits(packed, bitorder="little")[: length * bits].reshape(length, bits).astype(np.uint32)
    return (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def packed_size(length: int, bits: int) -> int:
    return (length * bits + 7) // 8


def low_bits(ring: np.ndarray, bits: int) -> np.ndarray:
    """``ring`` modulo ``2**bits`` (a sub-ring of Z_2^32: masks and sums reduce to it exactly)."""
    return np.asarray(ring, dtype=np.uint32) & np.uint32((1 << bits) - 1 if bits < 32 else 0xFFFFFFFF)
