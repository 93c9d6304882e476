"""Bit-exact fixed-point primitives: the arithmetic every hardware block implements.

All functions take and return NumPy ``int64`` arrays (or Python ints) holding exact
integers. docs/numerics.md states the same rules in prose.
"""

import numpy as np

__all__ = [
    "saturate", "rshift_round", "requantize", "imatmul",
    "Lfsr", "stochastic_rshift", "bit_length", "exp_table", "quantize_float",
]

# float64 represents every integer below 2**53 exactly, so an integer matrix product
# computed with BLAS in float64 is exact whenever every partial sum stays below that.
_EXACT = 2 ** 53


def saturate(v, bits):
    """Clamp to the signed range of ``bits`` bits."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(np.asarray(v, dtype=np.int64), lo, hi)


def rshift_round(v, shift):
    """Arithmetic shift right by ``shift`` with round-half-up; a negative shift is an
    exact left shift. This is the only rounding of the frozen network and the adapter
    forward path: ``(v + 2**(shift-1)) >> shift``."""
    v = np.asarray(v, dtype=np.int64)
    if shift > 0:
        return (v + (1 << (shift - 1))) >> shift
    return v << (-shift)


def requantize(acc, shift, bits):
    """Round-shift an accumulator and saturate it to ``bits`` bits."""
    return saturate(rshift_round(acc, shift), bits)


def imatmul(a, b):
    """Exact integer matrix product of int64 arrays, computed in float64.

    Raises if the worst case of any partial sum could reach 2**53, so an inexact result
    can never pass silently."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    k = a.shape[-1]
    bound = int(np.abs(a).max(initial=0)) * int(np.abs(b).max(initial=0)) * k
    if bound >= _EXACT:
        raise OverflowError(f"integer matmul bound {bound} is not exact in float64")
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


class Lfsr:
    """32-bit Galois LFSR, shifting right: ``s = (s >> 1) ^ (taps if s & 1 else 0)``.

    With the default taps 0x80200003 (x^32 + x^22 + x^2 + x + 1, primitive) its period
    is 2**32 - 1. A zero state is replaced by 1 so the register can never lock up."""

    def __init__(self, seed, taps=0x80200003):
        self.taps = taps
        self.state = (seed & 0xFFFFFFFF) or 1

    def step(self):
        s = self.state
        self.state = (s >> 1) ^ (self.taps if s & 1 else 0)
        return self.state

    def draws(self, n):
        """The next ``n`` states, one step each, as an int64 array."""
        out = np.empty(n, dtype=np.int64)
        s, taps = self.state, self.taps
        for i in range(n):
            s = (s >> 1) ^ (taps if s & 1 else 0)
            out[i] = s
        self.state = s
        return out


def stochastic_rshift(v, shift, rand32):
    """Stochastic rounding of ``v / 2**shift``: ``(v + r) >> shift``.

    ``r`` is uniform in [0, 2**shift): the top ``shift`` bits of the 32-bit LFSR state
    (``shift <= 32``). Unbiased for signed ``v``. ``shift`` may be an array; where it is
    zero or negative the result is the exact ``v << -shift``."""
    v = np.asarray(v, dtype=np.int64)
    rand32 = np.asarray(rand32, dtype=np.int64)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.int64), v.shape)
    if (shift > 32).any():
        raise ValueError("stochastic rounding takes shifts up to 32")
    pos = np.maximum(shift, 0)
    r = rand32 >> (32 - pos)
    rounded = (v + r) >> pos
    return np.where(shift > 0, rounded, v << np.maximum(-shift, 0))


def bit_length(v):
    """Position of the leading one plus one (0 for 0) of non-negative ints < 2**53."""
    return np.frexp(np.asarray(v, dtype=np.float64))[1].astype(np.int64)


def exp_table(entries, F_t, F_exp):
    """``EXP[t] = round(2**F_exp * exp(-t * 2**-F_t))`` as uint16 values."""
    t = np.arange(entries, dtype=np.float64) * 2.0 ** -F_t
    return np.floor(np.exp(-t) * 2.0 ** F_exp + 0.5).astype(np.int64)


def quantize_float(x, frac_bits, bits):
    """Nearest fixed-point value of a float array (round half up), saturated."""
    q = np.floor(np.asarray(x, dtype=np.float64) * 2.0 ** frac_bits + 0.5)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(q, lo, hi).astype(np.int64)
