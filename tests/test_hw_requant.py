"""The requantiser against hwgen.golden.requantize, exhaustively over small accumulators, in
every rounding mode."""

import numpy as np
import pytest
from amaranth import Module
from amaranth.sim import Simulator

from hwgen.golden import requantize
from hwgen.hw.requant import Requantizer
from hwgen.ir import ROUNDINGS, ActFormat

ACC_BITS = 7


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_every_accumulator_value(signed, rounding, relu):
    """Every value of a 7-bit accumulator: each tie of each shift, both saturations, and the
    all-max/all-min accumulators, against the golden model."""
    fmt = ActFormat(4, 0, rounding=rounding) if signed else ActFormat(3, 0, False, rounding)
    accs = np.arange(-(1 << (ACC_BITS - 1)), 1 << (ACC_BITS - 1))
    shifts = [-9, -3, -1, 0, 1, 2, 3, 6, 7, 8, 40]
    got: dict[int, list[int]] = {}

    async def bench(ctx):
        for s, dut in duts:
            got[s] = []
            for a in accs:
                ctx.set(dut.i, int(a))
                got[s].append(ctx.get(dut.o))

    duts = [(s, Requantizer(ACC_BITS, s, fmt, relu)) for s in shifts]
    m = Module()
    for k, (_, dut) in enumerate(duts):
        m.submodules[f"rq{k}"] = dut
    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    for s in shifts:
        assert np.array_equal(np.array(got[s]), requantize(accs, s, fmt, relu)), s
