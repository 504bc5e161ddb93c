"""Layer engines (window + MAC unit, pool, ReLU) against the golden model; engine_info,
choose_folding and the parameter checks."""

from dataclasses import replace

import numpy as np
import pytest
from conftest import lane_weights, shift_add_codebook, with_scale

from hwgen.errors import HwgenError
from hwgen.golden import layer_forward
from hwgen.hw.engine import choose_folding, engine_info, make_engine
from hwgen.hw.streams import run_stream
from hwgen.ir import (
    ROUNDINGS,
    ActFormat,
    AvgPool2d,
    Conv2d,
    Fixed,
    Flatten,
    GlobalAvgPool,
    Linear,
    MaxPool2d,
    Network,
    Pow2,
    ReLU,
)


def run_engine(net, index, pe, simd, x, stall_in=0.0, stall_out=0.0, seed=0):
    """Images (N, C, H, W) or (N, F) through layer ``index``'s engine; (NCHW out, cycles).

    Driven by hwgen.hw.streams.run_stream, which also checks the stream rules."""
    info = engine_info(net, index, pe, simd)
    dut = make_engine(net, index, pe, simd)
    hwc = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    beats = hwc.reshape(-1, info.in_lanes).tolist()
    n_out = info.out_beats * x.shape[0]
    out_beats, cycles = run_stream(dut, beats, n_out, stall_in, stall_out, seed)
    got = [v for beat in out_beats for v in beat]
    shape = net.shapes[net.layers[index].name]
    out = np.array(got).reshape(x.shape[0], *shape[1:], shape[0]) if len(shape) == 3 else None
    out = out.transpose(0, 3, 1, 2) if out is not None else np.array(got).reshape(x.shape[0], -1)
    return out, cycles


def _conv_net(rng, wfmt, cin, cout, hw, kernel, stride=1, padding=0):
    fin = ActFormat(8, 4)
    w = lane_weights(rng, wfmt, (cout, cin, *np.broadcast_to(kernel, 2)))
    out = ActFormat(8, min(fin.frac + wfmt.frac - 4, 32))
    layer = Conv2d(
        "conv",
        cin,
        cout,
        kernel,
        wfmt,
        out,
        w,
        rng.integers(-500, 500, cout),
        stride=stride,
        padding=padding,
        relu=True,
    )
    return Network((cin, *hw), fin, (layer,))


def _check(net, index, pe, simd, x, **kw):
    got, cycles = run_engine(net, index, pe, simd, x, **kw)
    assert np.array_equal(
        got, layer_forward(net.layers[index], x, net.in_format(net.layers[index]))
    )
    return cycles


@pytest.mark.parametrize(
    ("wfmt", "pe", "simd", "kernel", "stride", "padding"),
    [
        (Pow2(4, -1), 2, 2, 3, 1, 1),
        (Pow2(2, 0), 4, 1, (1, 3), (2, 1), (0, 1)),
        (Pow2(1, 0), 1, 4, (3, 2), 2, (1, 0)),
        (Fixed(8, 6), 2, 4, 2, 1, 0),
        (Pow2(5, 0), 2, 2, 1, 1, 1),
        (Fixed(6, 4), 4, 2, 3, 2, 3),
    ],
    ids=["pow2", "ternary", "binary", "fixed", "1x1_pad1", "3x3_pad3"],
)
def test_conv_engine_two_images_with_stalls(wfmt, pe, simd, kernel, stride, padding):
    rng = np.random.default_rng(pe + simd)
    net = _conv_net(rng, wfmt, 4, 4, (4, 5), kernel, stride, padding)
    x = rng.integers(-128, 128, size=(2, 4, 4, 5))
    _check(net, 0, pe, simd, x, stall_in=0.3, stall_out=0.3, seed=pe)


def test_dense_engine():
    rng = np.random.default_rng(1)
    fin = ActFormat(6, 3, signed=False)
    layer = Linear(
        "fc",
        12,
        6,
        Pow2(5, -2),
        ActFormat(8, 2),
        lane_weights(rng, Pow2(5, -2), (6, 12)),
        rng.integers(-99, 99, 6),
    )
    net = Network((12,), fin, (layer,))
    x = rng.integers(0, 64, size=(2, 12))
    _check(net, 0, 3, 4, x, stall_in=0.2, stall_out=0.2)


@pytest.mark.parametrize("delta", [0, 8])
def test_scaled_conv_and_dense_engines_with_stalls(delta):
    """Per-channel scales at the Fixed extremes (min, max, 0, -1) through the window + MAC
    unit engine: a conv with 3 neuron folds and a dense layer with one, random stalls."""
    rng = np.random.default_rng(5)
    conv = _conv_net(rng, Pow2(4, -1), 4, 6, (4, 5), 3, 1, 1)
    layer = with_scale(conv.layers[0], conv.input_format, Fixed(16, 10), rng, delta)
    x = rng.integers(-128, 128, size=(2, 4, 4, 5))
    x[1] = np.where(rng.random(x[1].shape) < 0.5, -128, 127)
    _check(replace(conv, layers=(layer,)), 0, 2, 2, x, stall_in=0.3, stall_out=0.3, seed=3)
    fin = ActFormat(6, 3, signed=False)
    plain = Linear(
        "fc", 12, 4, Fixed(8, 6), ActFormat(8, 2), lane_weights(rng, Fixed(8, 6), (4, 12)),
        rng.integers(-99, 99, 4),
    )  # fmt: skip
    fc = with_scale(plain, fin, Fixed(6, 3), rng, delta)
    x = rng.integers(0, 64, size=(6, 12))
    x[:2] = [[0] * 12, [63] * 12]
    _check(Network((12,), fin, (fc,)), 0, 4, 3, x, stall_in=0.3, stall_out=0.3, seed=4)


@pytest.mark.parametrize(
    ("bits", "zero", "scaled"), [(3, True, False), (4, False, True), (5, True, True)]
)
def test_codebook_conv_and_dense_engines_with_stalls(bits, zero, scaled):
    """DQC-like codebooks (3..5 index bits, with and without 0, the entries at ±2**kmax and
    two-digit ones near them) through the window + MAC unit engine: a conv with 3 neuron
    folds and a dense layer, all-max and all-min images, random stalls, with and without a
    per-channel scale at its extremes."""
    rng = np.random.default_rng(bits)
    cb = shift_add_codebook(rng, bits, 6, 5, zero)
    conv = _conv_net(rng, cb, 4, 6, (4, 5), 3, 1, 1)
    layer = replace(conv.layers[0], out_format=ActFormat(8, 4 + cb.frac - 10))  # |e| <= 64
    if scaled:
        layer = with_scale(layer, conv.input_format, Fixed(12, 10), rng)
    x = rng.integers(-128, 128, size=(3, 4, 4, 5))
    x[1], x[2] = 127, -128
    _check(replace(conv, layers=(layer,)), 0, 2, 2, x, stall_in=0.3, stall_out=0.3, seed=bits)
    fin = ActFormat(6, 3, signed=False)
    fc = Linear(
        "fc", 12, 4, cb, ActFormat(8, 3 + cb.frac - 7), lane_weights(rng, cb, (4, 12)),
        rng.integers(-99, 99, 4),
    )  # fmt: skip
    if scaled:
        fc = with_scale(fc, fin, Fixed(6, 3), rng)
    x = rng.integers(0, 64, size=(6, 12))
    x[:2] = [[0] * 12, [63] * 12]
    _check(Network((12,), fin, (fc,)), 0, 2, 4, x, stall_in=0.3, stall_out=0.3, seed=bits)


@pytest.mark.parametrize(
    "layer", [MaxPool2d("pool", 2), AvgPool2d("pool", 2), ReLU("relu")], ids=["max", "avg", "relu"]
)
def test_pool_and_relu_dispatch(layer):
    rng = np.random.default_rng(2)
    net = Network((4, 4, 4), ActFormat(8, 0), (layer,))
    x = rng.integers(-128, 128, size=(1, 4, 4, 4))
    _check(net, 0, 2, 2, x, stall_in=0.2, stall_out=0.2)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize(
    "layer", [AvgPool2d("pool", 2), GlobalAvgPool("pool")], ids=["avg", "global"]
)
def test_average_engines_round_in_the_input_format(layer, rounding):
    """make_engine hands the input format's rounding to the average pool engines."""
    rng = np.random.default_rng(4)
    net = Network((4, 4, 4), ActFormat(5, 0, rounding=rounding), (layer,))
    x = rng.integers(-16, 16, size=(2, 4, 4, 4))
    _check(net, 0, 2, 2, x, stall_in=0.2, stall_out=0.2)


def test_cycles_close_to_ideal():
    """3x3 conv 8->8 on 6x6, PE=SIMD=4: cycles <= 1.05 * ideal + fill latency."""
    rng = np.random.default_rng(3)
    net = _conv_net(rng, Pow2(4, -1), 8, 8, (6, 6), 3, 1, 1)
    x = rng.integers(-128, 128, size=(1, 8, 6, 6))
    cycles = _check(net, 0, 4, 4, x)
    ideal = engine_info(net, 0, 4, 4).ideal_cycles
    fill = 2 * 6 * 8 // 4 + 16  # about two input rows before the first window, + pipeline
    assert ideal == 6 * 6 * 9 * 8 * 8 // 16
    assert cycles <= 1.05 * ideal + fill


@pytest.mark.parametrize("simd", [1, 4], ids=["simd1", "simd4"])
def test_a_result_per_beat_flows_at_full_rate(simd):
    """1x1 conv with SIMD = Cin: every beat ends a repetition, and once full the engine
    still takes a beat and gives a result every cycle (the credit covers every stage
    between a last beat and the output FIFO's pop, as the MAC unit's docstring counts)."""
    rng = np.random.default_rng(simd)
    net = _conv_net(rng, Pow2(4, -1), simd, 4, (8, 8), 1)
    x = rng.integers(-128, 128, size=(2, simd, 8, 8))
    info = engine_info(net, 0, 4, simd)
    dut = make_engine(net, 0, 4, simd)
    beats = x.transpose(0, 2, 3, 1).reshape(-1, info.in_lanes).tolist()
    times = []
    run_stream(dut, beats, len(beats), times=times)
    assert times[-1] - times[0] + 1 == len(times) == 2 * 8 * 8


def test_engine_info_and_folding():
    rng = np.random.default_rng(4)
    conv = _conv_net(rng, Pow2(4, 0), 6, 8, (5, 5), 3, padding=1).layers[0]
    net = Network(
        (6, 5, 5),
        ActFormat(8, 4),
        (
            conv,
            MaxPool2d("pool", 2),
            Flatten("flat"),
            Linear(
                "fc",
                32,
                3,
                Fixed(4, 0),
                ActFormat(8, 0),
                rng.integers(-8, 8, (3, 32)),
                np.zeros(3, int),
            ),
        ),
    )
    info = engine_info(net, 0, 4, 3)
    assert (info.kind, info.in_lanes, info.out_lanes, info.in_bits, info.out_bits) == (
        "conv",
        3,
        4,
        8,
        8,
    )
    assert info.in_beats == 5 * 5 * 6 // 3 and info.out_beats == 5 * 5 * 8 // 4
    assert info.rom_depth == 9 * 6 // 3 * 8 // 4 and info.rom_width == 4 * 3 * 4
    assert info.macs == 25 * 8 * 9 * 6 and info.ideal_cycles == info.macs // 12
    assert len(info.roms) == 1 and len(info.roms[0]) == info.rom_depth
    pool = engine_info(net, 1, 2, 2)
    assert (pool.kind, pool.in_beats, pool.out_beats, pool.roms) == ("maxpool", 100, 16, [])
    assert engine_info(net, 3, 3, 8).kind == "dense"
    assert choose_folding(net, 0, 4, 4) == (4, 3)
    assert choose_folding(net, 0, 5, 1) == (4, 1)
    assert choose_folding(net, 1, 3, 3) == (2, 2)
    assert choose_folding(net, 3, 16, 16) == (3, 16)


@pytest.mark.parametrize(
    ("index", "pe", "simd", "msg"),
    [
        (0, 3, 1, "layer conv: PE must divide output channels = 8, not 3"),
        (0, 2, 4, "layer conv: SIMD must divide input channels = 6, not 4"),
        (1, 5, 1, "layer pool: PE must divide channels = 8, not 5"),
        (2, 1, 1, "layer flat: Flatten has no engine"),
        (7, 1, 1, "layer index must be in"),
    ],
)
def test_bad_parameters(index, pe, simd, msg):
    rng = np.random.default_rng(5)
    conv = _conv_net(rng, Pow2(4, 0), 6, 8, (4, 4), 3).layers[0]
    net = Network((6, 4, 4), ActFormat(8, 4), (conv, MaxPool2d("pool", 2), Flatten("flat")))
    with pytest.raises(HwgenError, match=msg):
        make_engine(net, index, pe, simd)
    with pytest.raises(HwgenError, match=msg):
        engine_info(net, index, pe, simd)


def test_too_wide_and_bad_rom_style():
    rng = np.random.default_rng(6)
    layer = Linear(
        "fc",
        2048,
        2,
        Pow2(2, 0),
        ActFormat(8, 0),
        lane_weights(rng, Pow2(2, 0), (2, 2048)),
        np.zeros(2, int),
    )
    net = Network((2048,), ActFormat(8, 0), (layer,))
    with pytest.raises(HwgenError, match=r"layer fc: 4096 lanes \(PE=2, SIMD=2048\) is too wide"):
        make_engine(net, 0, 2, 2048)
    with pytest.raises(HwgenError, match="ROM style must be one of inline, file, not 'x'"):
        make_engine(net, 0, 1, 1, rom_style="x")
