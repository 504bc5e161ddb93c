"""Register replication: several copies of a register, each driving a share of its loads.

A register whose output reaches hundreds of LUTs (a ROM's address, a bank select, a MAC
array's accumulate enable) is one net spread over the area of everything it drives: on
ResNet-20's 70%-full ECP5 such nets were the critical paths. Synthesis merges identical
registers back into one, so each copy carries ``keep``: Vivado and Quartus keep such a
register, and hwgen's Yosys script (``hwgen.synth.yosys_prep``) marks the flip-flop
driving a ``keep`` wire as kept, which Yosys's ``opt_merge`` respects.
"""

from __future__ import annotations

from amaranth import Module, Signal, Value

# Loads a copy drives at most: a slice of this many bits of a ROM's read logic or select.
SLICE_BITS = 32


def slices(width: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` column slices of a ``width``-bit word, ``SLICE_BITS`` each (the last
    narrower)."""
    return [(lo, min(lo + SLICE_BITS, width)) for lo in range(0, width, SLICE_BITS)]


def copies(m: Module, value: Value, n: int, name: str) -> list[Signal]:
    """``n`` registers, each loaded with ``value`` on every clock (reset-less), kept apart
    through synthesis; one (an ordinary register) when ``n`` is 1."""
    if n == 1:
        reg = Signal(value.shape(), name=name, reset_less=True)
        m.d.sync += reg.eq(value)
        return [reg]
    regs = [
        Signal(value.shape(), name=f"{name}_c{k}", reset_less=True, attrs={"keep": 1})
        for k in range(n)
    ]
    m.d.sync += [r.eq(value) for r in regs]
    return regs
