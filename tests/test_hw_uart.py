"""UART receiver and transmitter at the serial-line level (Amaranth simulator)."""

import random

import pytest
from amaranth import Module
from amaranth.sim import Simulator

from hwgen.errors import HwgenError
from hwgen.hw.uart import UARTRx, UARTTx


def _line_bits(byte: int, stop: int = 1) -> list[int]:
    return [0, *((byte >> k) & 1 for k in range(8)), stop]


def _rx_run(frames: list[list[int]], bit_cycles: int, divisor: int) -> tuple[list[int], int]:
    """Drive ``frames`` of line bits, ``bit_cycles`` clocks per bit, into a receiver."""
    dut = UARTRx(divisor)
    got: list[int] = []
    flags = {}

    async def bench(ctx):
        ctx.set(dut.o.ready, 1)
        for _ in range(5):
            await ctx.tick()
        for frame in frames:
            for level in [*frame, 1, 1]:
                ctx.set(dut.rx, level)
                for _ in range(bit_cycles):
                    await ctx.tick()
                    if ctx.get(dut.o.valid):
                        got.append(ctx.get(dut.o.payload))
        for _ in range(3 * bit_cycles):
            await ctx.tick()
            if ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload))
        flags["frame_error"] = ctx.get(dut.frame_error)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return got, flags["frame_error"]


@pytest.mark.parametrize("bit_cycles", [32, 31, 33])  # exact baud, and ±3 % clock error
def test_rx_receives_bytes(bit_cycles):
    data = [0x00, 0xFF, 0x55, 0xAA, *random.Random(1).sample(range(256), 8)]
    got, ferr = _rx_run([_line_bits(b) for b in data], bit_cycles, divisor=32)
    assert got == data
    assert ferr == 0


def test_rx_flags_a_missing_stop_bit():
    got, ferr = _rx_run([_line_bits(0x3C, stop=0), _line_bits(0x81)], 16, divisor=16)
    assert ferr == 1
    assert got == [0x81]


def test_tx_rx_loopback():
    m = Module()
    m.submodules.tx = tx = UARTTx(8)
    m.submodules.rx = rx = UARTRx(8)
    m.d.comb += rx.rx.eq(tx.tx)
    data = list(range(0, 256, 17))
    got = []

    async def bench(ctx):
        ctx.set(rx.o.ready, 1)
        for byte in data:
            ctx.set(tx.i.payload, byte)
            ctx.set(tx.i.valid, 1)
            await ctx.tick().until(tx.i.ready)
        ctx.set(tx.i.valid, 0)

    async def monitor(ctx):
        while len(got) < len(data):
            await ctx.tick()
            if ctx.get(rx.o.valid):
                got.append(ctx.get(rx.o.payload))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.add_testbench(monitor)
    sim.run()
    assert got == data


def test_tx_frame_on_the_line():
    dut = UARTTx(4)
    levels = []

    async def bench(ctx):
        ctx.set(dut.i.payload, 0xA6)
        ctx.set(dut.i.valid, 1)
        await ctx.tick()
        ctx.set(dut.i.valid, 0)
        for _ in range(4 * 11):
            levels.append(ctx.get(dut.tx))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert levels[::4][:11] == [*_line_bits(0xA6), 1]


def test_divisor_checked():
    with pytest.raises(HwgenError, match="divisor"):
        UARTTx(2)
