"""The requantiser: accumulator to output activation, exactly ``hwgen.golden.requantize``.

``y = sat(round(acc * 2**-s))`` in the output format's rounding: for ``s > 0`` that is
``(acc + 2**(s-1)) >> s`` (arithmetic) for ``half_up``, ``(acc + 2**(s-1) - 1 + acc[s]) >> s``
for ``half_even`` (bit ``s`` is the floor's parity: an exact tie goes to the even
neighbour) and ``acc >> s`` for ``floor``; for ``s <= 0`` it is ``acc << -s``. Then
saturation to the output format's range, whose lower bound is 0 with a fused ReLU.
Combinational; shifts are by constants (wiring only).
"""

from __future__ import annotations

import numpy as np
from amaranth import Module, Mux, Value, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hwgen import golden
from hwgen.ir import ActFormat


def act_shape(fmt: ActFormat) -> object:
    """The Amaranth shape of an activation format: signed(bits) or unsigned(bits)."""
    return signed(fmt.bits) if fmt.signed else unsigned(fmt.bits)


def round_shift(v: Value, s: int, rounding: str) -> Value:
    """``v * 2**-s`` rounded as ``rounding`` says, for ``s > 0``: ``hwgen.golden.round_shift``
    as one constant adder (none for ``floor``) and a shift by wiring."""
    if rounding == "floor":
        return v >> s
    half = 1 << (s - 1)
    if rounding == "half_even":
        return (v + (half - 1) + (v >> s)[0]) >> s
    return (v + half) >> s


class Requantizer(wiring.Component):
    """Combinational requantiser of one accumulator.

    Parameters
    ----------
    acc_bits : int
        Width of the signed accumulator.
    shift : int
        ``s = frac_acc - frac_out``; positive shifts right, rounding in ``fmt.rounding``;
        zero or negative shifts left.
    fmt : ActFormat
        The output format, with its rounding.
    relu : bool
        Fused ReLU: the lower saturation bound is 0.

    Members
    -------
    i : In(signed(acc_bits))
    o : Out(act_shape(fmt))
    """

    def __init__(self, acc_bits: int, shift: int, fmt: ActFormat, relu: bool = False) -> None:
        self.acc_bits, self.shift, self.fmt, self.relu = acc_bits, shift, fmt, relu
        super().__init__({"i": In(signed(acc_bits)), "o": Out(act_shape(fmt))})

    def elaborate(self, platform: object) -> Module:
        m = Module()
        lo, hi = (max(self.fmt.lo, 0) if self.relu else self.fmt.lo), self.fmt.hi
        acc, s = self.i, self.shift
        # Saturation compares the accumulator itself with constants, in parallel with the
        # rounding adder rather than after it: rounding is monotone, so ``y > hi`` and
        # ``y < lo`` are ``acc >= first(hi + 1)`` and ``acc < first(lo)``.
        if s > 0:
            # For s >= acc_bits every accumulator value rounds alike (0, or -1 for a negative
            # one in floor), as with s = acc_bits: capping s keeps the constant and adder narrow.
            s = min(s, self.acc_bits)
            y = round_shift(acc, s, self.fmt.rounding)
            over, under = (
                acc >= _first(hi + 1, s, self.fmt.rounding),
                acc < _first(lo, s, self.fmt.rounding),
            )
        else:
            # Past bits+1 every nonzero value saturates whatever the shift: cap the width.
            k = min(-s, self.fmt.bits + 1)
            y = acc << k
            over, under = acc > (hi >> k), acc < -((-lo) >> k)
        m.d.comb += self.o.eq(Mux(over, hi, Mux(under, lo, y)))
        return m


def _first(target: int, s: int, rounding: str) -> int:
    """The smallest ``v`` whose ``v * 2**-s`` rounds (``golden.round_shift``) to ``target``
    or more: ``target * 2**s`` less half a step, or one above it for a tie that rounds down."""
    base = (target << s) - (0 if rounding == "floor" else 1 << (s - 1))
    cands = np.array([base - 1, base, base + 1], dtype=object)  # exact Python integers
    reach = golden.round_shift(cands, s, rounding) >= target
    return int(cands[np.argmax(reach)])
