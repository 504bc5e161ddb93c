"""The unrolled constant-weight engine against the golden model: dense, 1x1 and kxk convs,
Fixed and Pow2 weights, random stalls, extremes (all-max inputs and weights, saturation,
rounding ties), every rounding mode; full rate; the datapath's pipeline knob; whole networks
with unrolled layers, and the engine in a build's manifest and folding.toml."""

import numpy as np
import pytest
from amaranth.back import rtlil, verilog
from conftest import example_network, lane_weights, residual_network, with_scale

from hwgen import golden
from hwgen.emit import BuildOptions, build, choose_build, load_engines, load_folding
from hwgen.errors import HwgenError
from hwgen.golden import layer_forward
from hwgen.hw.engine import engine_info, make_engine
from hwgen.hw.network import NetworkTop
from hwgen.hw.streams import run_stream
from hwgen.hw.unrolled import MatVec, layer_matrix, scaled_matrix
from hwgen.ir import ROUNDINGS, ActFormat, Codebook, Conv2d, Fixed, Linear, Network, Pow2


def run_unrolled(net, x, stall=0.0, seed=0):
    """Inputs (N, C, H, W) or (N, F) through layer 0's unrolled engine: (NCHW out, cycles)."""
    layer = net.layers[0]
    cin = layer.in_features if isinstance(layer, Linear) else layer.in_channels
    cout = layer.bias.shape[0]
    info = engine_info(net, 0, cout, cin, "unrolled")
    assert (info.engine, info.roms, info.in_lanes, info.out_lanes) == ("unrolled", [], cin, cout)
    dut = make_engine(net, 0, cout, cin, engine="unrolled")
    hwc = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    beats = hwc.reshape(-1, cin).tolist()
    out, cycles = run_stream(dut, beats, info.out_beats * len(x), stall, stall, seed)
    shape = net.shapes[layer.name]
    got = np.array(out).reshape(len(x), *shape[1:], shape[0])
    return (got.transpose(0, 3, 1, 2) if got.ndim == 4 else got), cycles


def dense_net(rng, wfmt, fin, fout, cin=12, cout=6, w=None, bias=None):
    w = lane_weights(rng, wfmt, (cout, cin)) if w is None else w
    bias = rng.integers(-500, 500, cout) if bias is None else bias
    return Network((cin,), fin, (Linear("fc", cin, cout, wfmt, fout, w, bias),))


def check(net, x, **kw):
    got, cycles = run_unrolled(net, x, **kw)
    assert np.array_equal(got, layer_forward(net.layers[0], x, net.in_format(net.layers[0])))
    return cycles


@pytest.mark.parametrize(
    ("wfmt", "fin"),
    [
        (Pow2(5, 0), ActFormat(8, 8, signed=False)),
        (Pow2(2, -1), ActFormat(6, 3)),
        (Pow2(1, 0), ActFormat(4, 0)),
        (Fixed(8, 7), ActFormat(8, 8, signed=False)),
        (Fixed(3, 1), ActFormat(7, 2)),
    ],
    ids=["pow2", "ternary", "binary", "fixed8", "fixed3"],
)
def test_dense_with_stalls(wfmt, fin):
    rng = np.random.default_rng(wfmt.bits)
    net = dense_net(rng, wfmt, fin, ActFormat(8, 5))
    x = rng.integers(fin.lo, fin.hi, size=(40, 12), endpoint=True)
    check(net, x, stall=0.3, seed=wfmt.bits)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("relu", [False, True])
def test_extremes_saturation_and_ties(rounding, relu):
    """All-max and all-min inputs against all-max weights (saturation both ways), and
    accumulators exactly halfway between two outputs (ties) in every rounding mode."""
    rng = np.random.default_rng(7)
    wfmt, fin = Fixed(8, 4), ActFormat(8, 0)
    w = np.full((4, 12), wfmt.hi)
    w[1], w[2, :6], w[3] = wfmt.lo, 0, 0
    w[3, 0] = 1  # output 3 is x0 + bias: its ties come from x0
    layer = Linear("fc", 12, 4, wfmt, ActFormat(6, 0, rounding=rounding), w, [0, 5, -7, 0], relu)
    net = Network((12,), fin, (layer,))
    x = np.concatenate(
        [
            np.full((1, 12), fin.hi),
            np.full((1, 12), fin.lo),
            rng.integers(fin.lo, fin.hi, size=(6, 12), endpoint=True),
        ]
    )
    x[2:, 0] = np.arange(-24, 24, 8)  # x0 / 16 hits .5 on the odd multiples of 8
    check(net, x, stall=0.2)


@pytest.mark.parametrize(
    ("wfmt", "kernel", "stride", "padding"),
    [
        (Pow2(4, -1), 3, 1, 1),
        (Fixed(6, 4), (2, 3), (2, 1), (0, 1)),
        (Pow2(3, 0), 1, 1, 0),
        (Fixed(5, 3), 1, 2, 1),
    ],
    ids=["3x3", "2x3_stride", "1x1", "1x1_stride_pad"],
)
def test_conv_with_stalls(wfmt, kernel, stride, padding):
    rng = np.random.default_rng(3)
    fin = ActFormat(8, 4)
    k = np.broadcast_to(kernel, 2)
    w = lane_weights(rng, wfmt, (5, 3, *k))
    layer = Conv2d(
        "conv",
        3,
        5,
        tuple(k),
        wfmt,
        ActFormat(8, 3),
        w,
        rng.integers(-300, 300, 5),
        stride=stride,
        padding=padding,
        relu=True,
    )
    net = Network((3, 5, 6), fin, (layer,))
    x = rng.integers(-128, 128, size=(2, 3, 5, 6))
    check(net, x, stall=0.3, seed=1)


@pytest.mark.parametrize(
    ("entries", "scaled"),
    [((-40, -17, -6, 0, 5, 16, 34, 64), False), ((-21, -5, 3, 7), True), ((-13, 0, 11), False)],
    ids=["dqc3", "dqc2_no_zero_scaled", "any_integers"],
)
def test_codebook_conv_and_dense_with_stalls(entries, scaled):
    """Codebook weights are integer constants to the unrolled engine: DQC-like entries,
    with a per-channel scale folded in, and entries of three signed digits (13 = 16 - 4 + 1,
    11 = 8 + 4 - 1), which the folded engine refuses, all == golden."""
    rng = np.random.default_rng(len(entries))
    cb, fin = Codebook(entries, 5), ActFormat(8, 4)
    w = lane_weights(rng, cb, (5, 3, 3, 3))
    w[0, 0, 0, :] = cb.lo, cb.hi, cb.entries[1]
    layer = Conv2d(
        "conv", 3, 5, 3, cb, ActFormat(8, 4 + 5 - 9), w, rng.integers(-300, 300, 5), padding=1,
        relu=True,
    )  # fmt: skip
    if scaled:
        layer = with_scale(layer, fin, Fixed(7, 5), rng)
    x = rng.integers(-128, 128, size=(3, 3, 5, 6))
    x[1], x[2] = 127, -128
    check(Network((3, 5, 6), fin, (layer,)), x, stall=0.3, seed=2)
    fc = dense_net(rng, cb, ActFormat(6, 3, signed=False), ActFormat(8, 3 + 5 - 6))
    check(fc, rng.integers(0, 64, size=(20, 12)), stall=0.3, seed=3)


@pytest.mark.parametrize(
    ("wfmt", "sfmt", "kernel", "rounding"),
    [
        (Pow2(4, -1), Fixed(16, 12), 3, "half_up"),
        (Fixed(6, 4), Fixed(5, -2), 1, "half_even"),
        (Pow2(2, 0), Fixed(2, 0), (2, 1), "floor"),
    ],
    ids=["pow2_3x3", "fixed_1x1", "ternary_2x1"],
)
@pytest.mark.parametrize("delta", [0, 8])
def test_scaled_conv_with_stalls(wfmt, sfmt, kernel, rounding, delta):
    """A per-channel scale folded into the constants (m at its min and max, 0 and -1):
    outputs equal the golden model's, in range (delta 0) and saturating both ways (8)."""
    rng = np.random.default_rng(8)
    fin = ActFormat(8, 4)
    k = tuple(np.broadcast_to(kernel, 2))
    plain = Conv2d(
        "conv", 3, 5, k, wfmt, ActFormat(8, 3, rounding=rounding),
        lane_weights(rng, wfmt, (5, 3, *k)), rng.integers(-300, 300, 5),
        padding=(k[0] // 2, k[1] // 2), relu=True,
    )  # fmt: skip
    layer = with_scale(plain, fin, sfmt, rng, delta)
    net = Network((3, 5, 6), fin, (layer,))
    x = rng.integers(-128, 128, size=(2, 3, 5, 6))
    x[1] = np.where(rng.random(x[1].shape) < 0.5, -128, 127)
    out = layer_forward(layer, x, fin)
    if delta:
        assert out.max() == 127 and out.min() == 0
    else:
        assert len(np.unique(out)) > 4
    check(net, x, stall=0.3, seed=2)
    matrix, bias = scaled_matrix(layer)
    core = make_engine(net, 0, 5, 3, engine="unrolled").matvec
    assert "cell $mul" not in rtlil.convert(core, emit_src=False)  # folded into constants
    m = layer.scale[:, None]
    assert np.array_equal(matrix, layer_matrix(layer) * m) and np.array_equal(
        bias, layer.bias * m[:, 0]
    )


def test_full_rate_without_stalls():
    """One input vector per cycle: cycles = vectors + the datapath's latency + the FIFO."""
    rng = np.random.default_rng(5)
    net = dense_net(rng, Pow2(4, 0), ActFormat(8, 0), ActFormat(8, 0), cin=16, cout=8)
    x = rng.integers(-128, 128, size=(64, 16))
    cycles = check(net, x)
    assert cycles <= 64 + 8


def test_matrix_in_window_order():
    rng = np.random.default_rng(6)
    w = rng.integers(-4, 4, size=(2, 3, 2, 2))
    layer = Conv2d("c", 3, 2, (2, 2), Fixed(4, 0), ActFormat(8, 0), w, np.zeros(2, int))
    assert layer_matrix(layer)[1, 2 * 3 + 1 * 3 + 2] == w[1, 2, 1, 1]  # kh=1, kw=1, c=2


@pytest.mark.parametrize("levels", [1, 3, 8])
def test_levels_trade_latency_not_results(levels):
    rng = np.random.default_rng(levels)
    w = rng.integers(-128, 128, size=(4, 10))
    mv = MatVec(w, [0, 1, 2, 3], ActFormat(8, 0), ActFormat(8, 0), 4, False, 24, levels)
    deep = max(mv.graph.depths())
    assert mv.latency == max(1, -(-deep // levels)) + 2


def test_bad_unrolled_parameters():
    rng = np.random.default_rng(0)
    net = dense_net(rng, Pow2(4, 0), ActFormat(8, 0), ActFormat(8, 0))
    with pytest.raises(HwgenError, match=r"layer fc: the unrolled engine has PE = 6 and SIMD = 12"):
        engine_info(net, 0, 3, 12, "unrolled")
    with pytest.raises(
        HwgenError, match=r"layer fc: engine must be one of folded, unrolled, not 'x'"
    ):
        make_engine(net, 0, 6, 12, engine="x")
    with pytest.raises(HwgenError, match=r"adder levels .* must be a positive integer, not 0"):
        MatVec(np.ones((1, 1), int), [0], ActFormat(8, 0), ActFormat(8, 0), 0, False, 9, 0)
    big = dense_net(rng, Pow2(4, 0), ActFormat(8, 0), ActFormat(8, 0), cin=256, cout=17)
    with pytest.raises(HwgenError, match=r"layer fc: 4352 weights is too many to unroll"):
        engine_info(big, 0, 17, 256, "unrolled")


def _network_run(net, foldings, engines, x, stalls):
    top = NetworkTop(net, foldings, engines=engines)
    beats = []
    for img in x:
        hwc = img.transpose(1, 2, 0) if img.ndim == 3 else img
        beats += hwc.reshape(-1, top.infos[0].in_lanes).tolist()
    n_out = len(x) * int(np.prod(net.output_shape)) // top.infos[-1].out_lanes
    got, _ = run_stream(top, beats, n_out, stall_in=stalls, stall_out=stalls, seed=3)
    return np.array([v for beat in got for v in beat]).reshape(len(x), -1)


@pytest.mark.parametrize("net_fn", [example_network, residual_network], ids=["chain", "resnet"])
def test_network_with_unrolled_layers_equals_golden(net_fn):
    """Every conv and dense layer unrolled, the others folded, random stalls."""
    net = net_fn(seed=2)
    foldings, engines = choose_build(net, BuildOptions(engine="unrolled"))
    assert set(engines) == {la.name for la in net.layers if isinstance(la, (Conv2d, Linear))}
    x = np.random.default_rng(1).integers(-128, 128, size=(2, *net.input_shape))
    assert np.array_equal(_network_run(net, foldings, engines, x, 0.3), golden.forward(net, x)[-1])


def test_build_writes_and_reads_the_engine(tmp_path):
    net = example_network(seed=1)
    first = next(la.name for la in net.layers if isinstance(la, Conv2d))
    manifest = build(net, tmp_path / "b", BuildOptions(engines={first: "unrolled"}, vectors=1))
    assert manifest["engines"] == {first: "unrolled"}
    entry = next(e for e in manifest["layers"] if e["name"] == first)
    assert entry["rom_depth"] == 0
    # Deterministic Verilog: the layer's engine made again gives the same file.
    cout, cin = net.layer(first).weight.shape[:2]
    again = make_engine(net, net.index(first), cout, cin, engine="unrolled")
    module = entry["module"]
    rtl = (tmp_path / "b" / "rtl" / f"{module}.v").read_text()
    assert rtl == verilog.convert(again, name=module, emit_src=False)
    path = tmp_path / "b" / "folding.toml"
    assert load_engines(path) == {first: "unrolled"}
    assert load_folding(path)[first] == (cout, cin)
    path.write_text(path.read_text().replace('"unrolled"', '"wide"'))
    with pytest.raises(
        HwgenError, match=rf"\[layers.{first}\] engine must be one of folded, unrolled, not 'wide'"
    ):
        load_engines(path)
