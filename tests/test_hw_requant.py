"""The requantiser against hwgen.golden.requantize, exhaustively over small accumulators."""

import numpy as np
import pytest
from amaranth import Module
from amaranth.sim import Simulator

from hwgen.golden import requantize
from hwgen.hw.requant import Requantizer
from hwgen.ir import ActFormat

ACC_BITS = 7


@pytest.mark.parametrize("fmt", [ActFormat(4, 0), ActFormat(3, 0, signed=False)], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_every_accumulator_value(fmt, relu):
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
