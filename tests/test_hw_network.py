"""The whole network in hardware (Amaranth simulator): rtl(x) == golden(x), image after image."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from hwgen import golden
from hwgen.hw.board import AxiNetwork
from hwgen.hw.engine import choose_folding
from hwgen.hw.network import NetworkTop
from hwgen.hw.streams import run_stream
from hwgen.ir import Flatten, Network
from tests.conftest import example_network


def _foldings(net: Network, max_pe: int, max_simd: int) -> dict[str, tuple[int, int]]:
    return {
        layer.name: choose_folding(net, i, max_pe, max_simd)
        for i, layer in enumerate(net.layers)
        if not isinstance(layer, Flatten)
    }


def _hwc_beats(x: np.ndarray, lanes: int) -> list[list[int]]:
    flat = golden.flatten_hwc(x).reshape(-1).tolist()
    return [flat[k : k + lanes] for k in range(0, len(flat), lanes)]


def _inputs(net: Network, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fmt = net.input_format
    x = rng.integers(fmt.lo, fmt.hi + 1, size=(n, *net.input_shape))
    x[0] = fmt.hi  # all-max image
    return x


@pytest.mark.parametrize(("max_pe", "max_simd", "stalls"), [(1, 1, 0.0), (2, 2, 0.3), (4, 4, 0.5)])
def test_network_top_equals_golden(max_pe, max_simd, stalls):
    net = example_network(seed=3)
    top = NetworkTop(net, _foldings(net, max_pe, max_simd))
    x = _inputs(net, 2, seed=max_pe)
    beats = [b for img in x for b in _hwc_beats(img[None], top.infos[0].in_lanes)]
    out_lanes = top.infos[-1].out_lanes
    n_out = 2 * int(np.prod(net.output_shape)) // out_lanes
    got, _ = run_stream(top, beats, n_out, stall_in=stalls, stall_out=stalls, seed=7)
    rtl = np.array([v for beat in got for v in beat]).reshape(2, -1)
    assert np.array_equal(rtl, golden.forward(net, x)[-1])


def test_axi_network_tlast_and_error_flag():
    net = example_network(seed=4)
    axi = AxiNetwork(net, _foldings(net, 2, 2))
    x = _inputs(net, 2, seed=1)
    in_lanes, bits = axi.top.infos[0].in_lanes, net.input_format.bits
    words = []
    for img in x:
        beats = _hwc_beats(img[None], in_lanes)
        for k, beat in enumerate(beats):
            word = sum((v & ((1 << bits) - 1)) << (bits * j) for j, v in enumerate(beat))
            words.append((word, k == len(beats) - 1))
    words[3] = (words[3][0], True)  # a misplaced tlast in image 0 must raise the error flag
    lasts, error = [], []

    async def bench(ctx):
        ctx.set(axi.m_axis_tready, 1)
        for word, last in words:
            ctx.set(axi.s_axis_tdata, word)
            ctx.set(axi.s_axis_tlast, last)
            ctx.set(axi.s_axis_tvalid, 1)
            await ctx.tick().until(axi.s_axis_tready)
        ctx.set(axi.s_axis_tvalid, 0)

    async def monitor(ctx):
        while len(lasts) < 2 * axi.out_beats:
            await ctx.tick()
            if ctx.get(axi.m_axis_tvalid):
                lasts.append(ctx.get(axi.m_axis_tlast))
        error.append(ctx.get(axi.s_axis_error))

    sim = Simulator(axi)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.add_testbench(monitor)
    sim.run()
    expected = ([0] * (axi.out_beats - 1) + [1]) * 2
    assert lasts == expected
    assert error == [1]
