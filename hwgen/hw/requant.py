"""The requantiser: accumulator to output activation, exactly ``hwgen.golden.requantize``.

``y = sat(rhu(acc * 2**-s))``: for ``s > 0`` that is ``(acc + 2**(s-1)) >> s`` (arithmetic),
for ``s <= 0`` it is ``acc << -s``; then saturation to the output format's range, whose lower
bound is 0 with a fused ReLU. Combinational; shifts are by constants (wiring only).
"""

from __future__ import annotations

from amaranth import Module, Mux, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hwgen.ir import ActFormat


def act_shape(fmt: ActFormat) -> object:
    """The Amaranth shape of an activation format: signed(bits) or unsigned(bits)."""
    return signed(fmt.bits) if fmt.signed else unsigned(fmt.bits)


class Requantizer(wiring.Component):
    """Combinational requantiser of one accumulator.

    Parameters
    ----------
    acc_bits : int
        Width of the signed accumulator.
    shift : int
        ``s = frac_acc - frac_out``; positive shifts right with round half up, zero or
        negative shifts left.
    fmt : ActFormat
        The output format.
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
        if s > 0:
            # For s >= acc_bits every accumulator value rounds to 0, as with s = acc_bits:
            # capping s keeps the constant and the adder narrow.
            s = min(s, self.acc_bits)
            y = (acc + (1 << (s - 1))) >> s
        else:
            # Past bits+1 every nonzero value saturates whatever the shift: cap the width.
            y = acc << min(-s, self.fmt.bits + 1)
        m.d.comb += self.o.eq(Mux(y > hi, hi, Mux(y < lo, lo, y)))
        return m
