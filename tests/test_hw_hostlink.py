"""The host protocol bridge: bytes to input beats, output beats to bytes (Amaranth simulator)."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from hwgen.errors import HwgenError
from hwgen.hw.hostlink import SYNC_IN, SYNC_OUT, HostLink


def _le_bytes(values, nbytes):
    out = []
    for v in values:
        v &= (1 << (8 * nbytes)) - 1
        out += [(v >> (8 * k)) & 0xFF for k in range(nbytes)]
    return out


def _run(link: HostLink, host_bytes, out_beats, stall=0.3, seed=0):
    """Feed host bytes and network output beats; collect input beats and bytes to the host."""
    rng = random.Random(seed)
    beats_in, bytes_out = [], []
    n_bytes_expected = 2 + 2 * link.n_out

    async def host(ctx):
        for b in host_bytes:
            ctx.set(link.rx.payload, b)
            ctx.set(link.rx.valid, 1)
            await ctx.tick()
            ctx.set(link.rx.valid, 0)
            for _ in range(rng.randrange(4)):
                await ctx.tick()

    async def network_in(ctx):
        while len(beats_in) < link.n_in // link.in_lanes:
            ctx.set(link.net_i.ready, rng.random() > stall)
            await ctx.tick()
        ctx.set(link.net_i.ready, 0)

    async def monitor_in(ctx):
        async for _clk, _rst, valid, ready, payload in ctx.tick().sample(
            link.net_i.valid, link.net_i.ready, link.net_i.payload
        ):
            if valid and ready:
                beats_in.append(
                    ([int(payload.data[k]) for k in range(link.in_lanes)], int(payload.last))
                )
            if len(beats_in) >= link.n_in // link.in_lanes:
                return

    async def network_out(ctx):
        for beat in out_beats:
            for k, v in enumerate(beat):
                ctx.set(link.net_o.payload[k], v)
            ctx.set(link.net_o.valid, 1)
            await ctx.tick().until(link.net_o.ready)
            ctx.set(link.net_o.valid, 0)

    async def uart_out(ctx):
        while len(bytes_out) < n_bytes_expected:
            ctx.set(link.tx.ready, rng.random() > stall)
            await ctx.tick()
        ctx.set(link.tx.ready, 0)

    async def monitor_out(ctx):
        async for _clk, _rst, valid, ready, payload in ctx.tick().sample(
            link.tx.valid, link.tx.ready, link.tx.payload
        ):
            if valid and ready:
                bytes_out.append(int(payload))
            if len(bytes_out) >= n_bytes_expected:
                return

    sim = Simulator(link)
    sim.add_clock(1e-6)
    for tb in (host, network_in, network_out, uart_out):
        sim.add_testbench(tb)
    sim.add_process(monitor_in)
    sim.add_process(monitor_out)
    sim.run()
    return beats_in, bytes_out


@pytest.mark.parametrize(
    ("bits", "is_signed", "lanes"), [(8, False, 1), (6, True, 2), (12, True, 4)]
)
def test_host_bytes_become_input_beats(bits, is_signed, lanes):
    rng = np.random.default_rng(bits)
    n_in = 16
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if is_signed else (0, (1 << bits) - 1)
    values = rng.integers(lo, hi + 1, n_in).tolist()
    link = HostLink(
        n_in=n_in,
        in_bits=bits,
        in_signed=is_signed,
        in_lanes=lanes,
        n_out=4,
        out_bits=8,
        out_signed=True,
        out_lanes=2,
    )
    nbytes = 1 if bits <= 8 else 2
    host = [
        0x00,
        0x13,
        SYNC_IN,
        *_le_bytes(values, nbytes),
    ]  # noise before the sync byte is ignored
    beats, _ = _run(link, host, [[1, 2], [3, 4]])
    got = [v for beat, _ in beats for v in beat]
    if is_signed:
        got = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in got]
    assert got == values
    assert [last for _, last in beats] == [0] * (n_in // lanes - 1) + [1]


@pytest.mark.parametrize(
    "logits",
    [[-5, 7, 7, -128], [127, -1, 3, 127], [-3, -3, -3, -3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
)
def test_results_go_back_as_bytes(logits):
    lanes = 2
    link = HostLink(
        n_in=2,
        in_bits=8,
        in_signed=True,
        in_lanes=2,
        n_out=len(logits),
        out_bits=8,
        out_signed=True,
        out_lanes=lanes,
    )
    beats = [[v & 0xFF for v in logits[i : i + lanes]] for i in range(0, len(logits), lanes)]
    _, out = _run(link, [SYNC_IN, 1, 2], beats)
    assert out == [SYNC_OUT, int(np.argmax(logits)), *_le_bytes(logits, 2)]


def test_too_many_classes():
    with pytest.raises(HwgenError, match="256"):
        HostLink(
            n_in=1,
            in_bits=8,
            in_signed=True,
            in_lanes=1,
            n_out=300,
            out_bits=8,
            out_signed=True,
            out_lanes=1,
        )
