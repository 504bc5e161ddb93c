"""The whole network in hardware (Amaranth simulator): rtl(x) == golden(x), image after image."""

from dataclasses import replace

import numpy as np
import pytest
from amaranth.sim import Simulator

from hwgen import golden, hwq
from hwgen.cli import main
from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.hw.board import AxiNetwork
from hwgen.hw.engine import choose_folding
from hwgen.hw.network import NetworkTop, layer_fifo_depths, skip_fifo_depths
from hwgen.hw.streams import run_stream
from hwgen.ir import ActFormat, Codebook, Conv2d, Flatten, Network, Pow2, ReLU
from hwgen.quant.activations import ActSpec, greedy_network
from hwgen.quant.codebook import CodebookOptions, dqc
from tests.conftest import example_network, residual_network


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


def _run_network(net, foldings, n, stalls, seed, **kw):
    top = NetworkTop(net, foldings, **kw)
    x = _inputs(net, n, seed=seed)
    beats = [b for img in x for b in _hwc_beats(img[None], top.infos[0].in_lanes)]
    n_out = n * int(np.prod(net.output_shape)) // top.infos[-1].out_lanes
    # The first image passes every layer in turn: bound the run by the layers' total work.
    limit = int(4 * (n + 1) * sum(i.ideal_cycles for i in top.infos) / (1 - stalls) ** 2) + 5000
    got, cycles = run_stream(
        top, beats, n_out, stall_in=stalls, stall_out=stalls, seed=seed, max_cycles=limit
    )
    return np.array([v for beat in got for v in beat]).reshape(n, -1), x, cycles


@pytest.mark.parametrize(
    ("max_pe", "max_simd", "stalls"), [(1, 1, 0.0), (2, 2, 0.4), (4, 4, 0.2), (8, 1, 0.6)]
)
def test_residual_network_equals_golden(max_pe, max_simd, stalls):
    net = residual_network(seed=max_pe)
    rtl, x, _ = _run_network(net, _foldings(net, max_pe, max_simd), 3, stalls, seed=max_simd)
    assert np.array_equal(rtl, golden.forward(net, x)[-1])


@pytest.mark.parametrize(("max_pe", "max_simd", "stalls"), [(1, 1, 0.0), (2, 2, 0.5), (4, 4, 0.3)])
def test_option_b_shortcut_network_equals_golden(max_pe, max_simd, stalls):
    """A 1x1 stride-2 conv shortcut: both branches have windows, the FIFO sits on the short one."""
    net = residual_network(seed=max_pe, shortcut="B")
    rtl, x, _ = _run_network(net, _foldings(net, max_pe, max_simd), 3, stalls, seed=max_simd)
    assert np.array_equal(rtl, golden.forward(net, x)[-1])


def test_residual_network_skip_fifos():
    net = residual_network()
    depths = skip_fifo_depths(net, _foldings(net, 2, 2))
    # The identity and the option-A shortcut get a FIFO; the conv branches do not. The
    # forked tensors are 4 x 8 x 8 at 2 lanes: 2 beats per pixel. For output row r a 3x3
    # window (stride 1, padding 1) has taken input rows down to r + 2 at full rate, so block
    # 1's two convs are 4 rows and 7 pixels ahead of the identity: 39 pixels, + 1, + margin
    # 8. Block 2's stride-2 conv takes rows down to 2r + 4: at r = 0 the branch has taken
    # all 64 pixels while the shortcut reads pixel (0, 0).
    assert depths == {("b1_add", 1): (39 + 1) * 2 + 8, ("b2_short", 0): (63 + 1) * 2 + 8}


def test_residual_network_deadlocks_with_small_skip_fifos():
    # What the sizing rule prevents: with 2-beat skip FIFOs the fork blocks on the full skip
    # branch while the add waits for the conv branch, which waits for the fork.
    net = residual_network()
    small = dict.fromkeys(skip_fifo_depths(net, _foldings(net, 2, 2)), 2)
    with pytest.raises(AssertionError, match="no output after"):
        _run_network(net, _foldings(net, 2, 2), 1, 0.0, 0, skip_depths=small)


def _steady_cycles(net, foldings, n, **kw) -> float:
    """Cycles per image once the pipeline is full (no stalls), from the output beat times."""
    top = NetworkTop(net, foldings, **kw)
    x = _inputs(net, n, seed=0)
    beats = [b for img in x for b in _hwc_beats(img[None], top.infos[0].in_lanes)]
    per = int(np.prod(net.output_shape)) // top.infos[-1].out_lanes
    times: list[int] = []
    got, _ = run_stream(top, beats, n * per, times=times)
    rtl = np.array([v for beat in got for v in beat]).reshape(n, -1)
    assert np.array_equal(rtl, golden.flatten_hwc(golden.forward(net, x)[-1]).reshape(n, -1))
    return (times[n * per - 1] - times[per - 1]) / (n - 1)


@pytest.mark.parametrize("net", [example_network(seed=3), residual_network(seed=2)])
def test_layer_fifos_keep_the_ideal_rate(net):
    """One-register FIFOs where a layer's beats come at most every other cycle: cycles per
    image stay at the slowest engine's ideal."""
    foldings = _foldings(net, 4, 4)
    assert set(layer_fifo_depths(net, foldings).values()) == {1}
    ideal = max(info.ideal_cycles for info in NetworkTop(net, foldings).infos)
    assert _steady_cycles(net, foldings, 3) == ideal


def test_full_rate_layer_gets_a_three_beat_fifo():
    """1x1 convs with SIMD = Cin emit a beat every cycle: their FIFOs take three beats (a
    one-register FIFO would halve the rate)."""
    rng = np.random.default_rng(0)
    fmt, w = ActFormat(8, 4), Pow2(4, 0)

    def conv(name: str) -> Conv2d:
        weight = rng.choice([-2, -1, 0, 1, 2], size=(4, 4, 1, 1))
        return Conv2d(name, 4, 4, 1, w, fmt, weight, rng.integers(-9, 9, 4))

    net = Network((4, 4, 6), fmt, (conv("c1"), ReLU("r1"), conv("c2")))
    foldings = {"c1": (1, 4), "r1": (1, 1), "c2": (1, 4)}
    assert layer_fifo_depths(net, foldings) == {"c1": 3, "r1": 3}
    ideal = 4 * 6 * 4
    assert _steady_cycles(net, foldings, 4) == ideal
    halved = _steady_cycles(net, foldings, 4, fifo_depths={"c1": 1, "r1": 1})
    assert halved == 2 * ideal


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


def test_a_layer_named_like_another_layers_fifo_is_refused():
    net = example_network()
    clash = Network(
        net.input_shape,
        net.input_format,
        tuple(
            replace(la, inputs=(), name="conv1_fifo" if la.name == "pool1" else la.name)
            for la in net.layers
        ),
    )
    with pytest.raises(HwgenError, match="layer conv1_fifo: its name clashes with the FIFOs"):
        NetworkTop(clash, _foldings(clash, 2, 2))


@pytest.mark.slow
def test_dqc_digits_network_rtl_equals_golden(tmp_path, capsys):
    """DQC 3-bit codebooks with 0 on digits (4 retraining epochs), activation formats by the
    greedy search -> .hwq -> ``hwgen build`` -> ``hwgen sim --network`` on all 360 test
    images and the all-max/all-min ones: RTL == golden (about 3 minutes)."""
    fnet, data = digits_float_net()
    train = (data.x_train, data.y_train)
    qnet, books = dqc(fnet, 3, train, options=CodebookOptions(epochs=4), progress=False)
    weights = {n: (Codebook(cb.entries, cb.frac), cb.integers) for n, cb in books.items()}
    net, _ = greedy_network(qnet, weights, ActSpec(8), {n: ActSpec(8) for n in books}, train[0])
    macs = [lyr for lyr in net.layers if hasattr(lyr, "weight_format")]
    assert [len(lyr.weight_format.entries) for lyr in macs] == [8, 8, 8]
    assert all(0 in lyr.weight_format.entries for lyr in macs)
    x = golden.quantize_input(data.x_test, net.input_format)
    assert np.mean(golden.forward(net, x)[-1].argmax(1) == data.y_test) > 0.9
    path, build = tmp_path / "dqc3.hwq", tmp_path / "build"
    hwq.save(net, path, meta={"scheme": "dqc", "source": "digits"})
    for args in (
        ["build", str(path), "-o", str(build), "--vectors", "360"],
        ["sim", str(build), "--network"],
    ):
        try:
            code = main(args)
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        assert code == 0, out + err
    assert "RTL == golden: 362/362 images" in out
