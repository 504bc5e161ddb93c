"""Stream plumbing (width converter, FIFO) under random stalls, and the simulation helpers."""

import random

import pytest
from amaranth import Module, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hwgen.errors import HwgenError
from hwgen.hw.streams import (
    RegisterSlice,
    StreamFIFO,
    WidthConverter,
    run_stream,
    stream_get,
    stream_put,
)


def _beats(rng, n, lanes, bits=8):
    lo, hi = -(1 << bits - 1), (1 << bits - 1) - 1
    return [[rng.randint(lo, hi) for _ in range(lanes)] for _ in range(n)]


@pytest.mark.parametrize(("a", "b"), [(2, 6), (6, 2), (3, 3), (1, 4), (4, 1)])
@pytest.mark.parametrize("stalls", [(0.0, 0.0), (0.4, 0.4)], ids=["free", "stalls"])
def test_width_converter_keeps_order(a, b, stalls):
    rng = random.Random(a * 10 + b)
    beats = _beats(rng, 3 * 12 // a, a)
    got, cycles = run_stream(WidthConverter(signed(8), a, b), beats, len(beats) * a // b, *stalls)
    assert [v for beat in got for v in beat] == [v for beat in beats for v in beat]
    if stalls == (0.0, 0.0):  # one output beat per cycle once started
        assert cycles <= max(len(beats), len(got)) + 1


def test_width_converter_rejects_non_divisors():
    with pytest.raises(HwgenError, match="one of input lanes 4 and output lanes 6 must divide"):
        WidthConverter(signed(8), 4, 6)
    with pytest.raises(HwgenError, match="output lanes must be a positive integer, not 0"):
        WidthConverter(signed(8), 4, 0)


@pytest.mark.parametrize("depth", [1, 4, 1500])
def test_fifo_under_stalls(depth):
    # 1500 beats of 16 bits: banks of 1024 and 476; the pointers go round twice
    rng = random.Random(depth)
    beats = _beats(rng, max(40, 2 * depth), 2)
    fifo = StreamFIFO(data.ArrayLayout(signed(8), 2), depth)
    got, _ = run_stream(fifo, beats, len(beats), 0.3, 0.5, seed=depth, never=[fifo.rw_collision])
    assert got == beats


@pytest.mark.parametrize("depth", [1, 2, 16])
def test_fifo_holds_depth_plus_three_and_moves_a_beat_per_cycle(depth):
    fifo = StreamFIFO(unsigned(8), depth)
    sim = Simulator(fifo)
    sim.add_clock(1e-6)
    taken = []

    async def fill(ctx):
        # the output never ready: offer beats in order for a while, count those taken
        ctx.set(fifo.i.valid, 1)
        for _ in range(depth + 8):
            ctx.set(fifo.i.payload, len(taken))
            _, _, ready = await ctx.tick().sample(fifo.i.ready)
            if ready:
                taken.append(len(taken))
        ctx.set(fifo.i.valid, 0)

    sim.add_testbench(fill)
    sim.run()
    assert taken == list(range(depth + 3))
    beats = list(range(50))
    got, cycles = run_stream(StreamFIFO(unsigned(8), depth), beats, len(beats))
    # one beat per cycle from depth 2 (i.ready is a register: at depth 1 every other cycle)
    assert got == beats and cycles <= (len(beats) if depth > 1 else 2 * len(beats)) + 4


def test_fifo_of_struct_beats():
    layout = data.StructLayout({"data": data.ArrayLayout(unsigned(4), 2), "last": 1})
    beats = [{"data": [k % 16, 15 - k % 16], "last": int(k % 3 == 2)} for k in range(12)]
    got, _ = run_stream(StreamFIFO(layout, 2), beats, len(beats), 0.5, 0.5)
    assert got == beats


class _Repeater(wiring.Component):
    """Broken on purpose: drops ``valid`` while its output waits (a stream rule violation)."""

    i: In(stream.Signature(8))
    o: Out(stream.Signature(8))

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.o.payload.eq(self.i.payload), self.i.ready.eq(1)]
        m.d.sync += self.o.valid.eq(self.i.valid & ~self.o.valid)
        return m


def test_run_stream_catches_rule_violations():
    with pytest.raises(AssertionError, match="waiting output beat changed"):
        run_stream(_Repeater(), list(range(10)), 10, stall_out=0.5, seed=3)
    with pytest.raises(AssertionError, match="extra output beat"):
        run_stream(StreamFIFO(unsigned(8), 4), list(range(10)), 9)
    with pytest.raises(AssertionError, match="no output after 50 cycles"):
        run_stream(StreamFIFO(unsigned(8), 4), list(range(10)), 11, max_cycles=50)


def test_stream_put_and_get():
    dut = WidthConverter(signed(6), 1, 2)
    got = []

    async def producer(ctx):
        for v in (-32, 31, 5, -1):
            await stream_put(ctx, dut.i, [v])

    async def consumer(ctx):
        for _ in range(2):
            got.append(await stream_get(ctx, dut.o))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    assert got == [[-32, 31], [5, -1]]


@pytest.mark.parametrize("stalls", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.7), (0.4, 0.4)])
def test_register_slice_keeps_order_a_beat_per_cycle(stalls):
    rng = random.Random(7)
    beats = _beats(rng, 60, 3)
    got, cycles = run_stream(RegisterSlice(data.ArrayLayout(signed(8), 3)), beats, 60, *stalls)
    assert got == beats
    if stalls == (0.0, 0.0):
        assert cycles == len(beats) + 1  # its register, then one beat a cycle


def test_register_slice_outputs_are_registers():
    """Neither i.ready nor o.valid nor o.payload moves between clock edges, whatever the
    consumer and producer do: every output is a flip-flop."""
    dut = RegisterSlice(unsigned(8))
    seen = []

    async def bench(ctx):
        rng = random.Random(3)
        for _ in range(200):
            ctx.set(dut.i.valid, rng.random() < 0.7)
            ctx.set(dut.i.payload, rng.randrange(256))
            ctx.set(dut.o.ready, 0)
            before = (ctx.get(dut.i.ready), ctx.get(dut.o.valid), ctx.get(dut.o.payload))
            ctx.set(dut.o.ready, 1)
            ctx.set(dut.i.valid, not ctx.get(dut.i.valid))
            after = (ctx.get(dut.i.ready), ctx.get(dut.o.valid), ctx.get(dut.o.payload))
            seen.append(before == after)
            ctx.set(dut.o.ready, rng.random() < 0.5)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert all(seen)
