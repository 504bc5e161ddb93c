"""The golden model against an independent oracle (DESIGN §2).

The oracle is PyTorch in float64 on integer-valued tensors, which is exact while every
partial sum stays below 2**53 (weights wider than that are split into 16-bit halves and
recombined in int64), with requantisation, rounding and saturation done here on Python
integers by floor division — never by calling hwgen.golden.
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    act_formats,
    array_modes,
    example_network,
    int_array,
    residual_network,
    rngs,
    shift_add_codebook,
    weight_array,
    weight_formats,
    with_roundings,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hwgen import golden as gm
from hwgen.errors import HwgenError
from hwgen.ir import (
    ACC_BITS_MAX,
    INPUT,
    ROUNDINGS,
    ActFormat,
    Add,
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
    SubsamplePad,
    acc_bits,
    add_range,
    requant_bits,
    signed_bits,
)

# ---------------------------------------------------------------- the oracle

roundings = st.sampled_from(ROUNDINGS)


@st.composite
def rounded_formats(draw: st.DrawFn, max_bits: int = 16) -> ActFormat:
    """Any activation format (conftest.act_formats) in any rounding."""
    return replace(draw(act_formats(max_bits=max_bits)), rounding=draw(roundings))


def oracle_round(v: Fraction, rounding: str) -> int:
    """An exact rational to an integer: Python's own rounding rules, not shifts."""
    if rounding == "half_up":
        return math.floor(v + Fraction(1, 2))
    if rounding == "half_even":
        return round(v)  # Fraction.__round__ rounds ties to even
    assert rounding == "floor"
    return math.floor(v)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _exact_mac(x: np.ndarray, w: np.ndarray, op) -> np.ndarray:
    """``op(x, w)`` (a torch conv/linear, bias-free) exactly, as int64."""
    bound = float(np.abs(w).reshape(len(w), -1).sum(1).max()) * float(np.abs(x).max(initial=0))
    if bound < 2.0**53:
        return op(_t(x), _t(w)).numpy().astype(np.int64)
    hi = w >> 16  # w = hi * 2**16 + lo, 0 <= lo < 2**16: each half is exact in float64
    lo = w - (hi << 16)
    for part in (hi, lo):
        assert float(np.abs(part).reshape(len(w), -1).sum(1).max()) * np.abs(x).max() < 2.0**53
    return (op(_t(x), _t(hi)).numpy().astype(np.int64) << 16) + op(_t(x), _t(lo)).numpy().astype(
        np.int64
    )


def oracle_conv_acc(x: np.ndarray, layer: Conv2d) -> np.ndarray:
    acc = _exact_mac(
        x, layer.weight, lambda a, w: F.conv2d(a, w, stride=layer.stride, padding=layer.padding)
    )
    return acc + layer.bias.reshape(1, -1, 1, 1)


def oracle_linear_acc(x: np.ndarray, layer: Linear) -> np.ndarray:
    return _exact_mac(x, layer.weight, F.linear) + layer.bias


def oracle_requant(acc: np.ndarray, s: int, fmt: ActFormat, relu: bool) -> np.ndarray:
    """``acc / 2**s`` as an exact rational, rounded in ``fmt.rounding``, then saturated."""
    lo, hi = (max(fmt.lo, 0) if relu else fmt.lo), fmt.hi

    def one(v: int) -> int:
        y = oracle_round(Fraction(int(v)) / Fraction(2) ** s, fmt.rounding)
        return min(max(y, lo), hi)

    return np.vectorize(one, otypes=[np.int64])(acc)


def oracle_add(
    a: np.ndarray, b: np.ndarray, fa: ActFormat, fb: ActFormat, layer: Add
) -> np.ndarray:
    """Exact rationals: ``round((a·2^-fa + b·2^-fb) · 2^fo)``, saturated (no shifts, no golden)."""
    fmt = layer.out_format
    lo, hi = (max(fmt.lo, 0) if layer.relu else fmt.lo), fmt.hi

    def one(x: int, y: int) -> int:
        two = Fraction(2)
        v = (int(x) * two**-fa.frac + int(y) * two**-fb.frac) * two**fmt.frac
        return min(max(oracle_round(v, fmt.rounding), lo), hi)

    return np.vectorize(one, otypes=[np.int64])(a, b)


def oracle_layer(layer, x: np.ndarray, fmt: ActFormat) -> tuple[np.ndarray, ActFormat]:
    """One layer by the oracle: (output, output format)."""
    if isinstance(layer, SubsamplePad):
        (sh, sw), (before, after) = layer.stride, layer.pad
        return F.pad(_t(x)[:, :, ::sh, ::sw], (0, 0, 0, 0, before, after)).numpy().astype(
            np.int64
        ), fmt
    if isinstance(layer, GlobalAvgPool):
        area = x.shape[2] * x.shape[3]
        total = (F.adaptive_avg_pool2d(_t(x), 1) * area).numpy().astype(np.int64)
        return oracle_mean(total, area, fmt), fmt
    if isinstance(layer, (Conv2d, Linear)):
        acc = (oracle_conv_acc if isinstance(layer, Conv2d) else oracle_linear_acc)(x, layer)
        s = fmt.frac + layer.weight_format.frac - layer.out_format.frac
        if layer.scale is not None:  # acc_c * m_c on Python integers, at frac F + frac_m
            m = layer.scale.astype(object).reshape((1, -1) + (1,) * (acc.ndim - 2))
            acc = acc.astype(object) * m
            s += layer.scale_format.frac
        return oracle_requant(acc, s, layer.out_format, layer.relu), layer.out_format
    if isinstance(layer, ReLU):
        return torch.relu(_t(x)).numpy().astype(np.int64), fmt
    if isinstance(layer, Flatten):
        return _t(x).permute(0, 2, 3, 1).reshape(len(x), -1).numpy().astype(np.int64), fmt
    if isinstance(layer, MaxPool2d):
        y = F.max_pool2d(_t(x), layer.kernel, layer.stride)
        return y.numpy().astype(np.int64), fmt
    area = layer.kernel[0] * layer.kernel[1]
    total = (F.avg_pool2d(_t(x), layer.kernel, layer.stride) * area).numpy().astype(np.int64)
    return oracle_mean(total, area, fmt), fmt


def oracle_mean(total: np.ndarray, area: int, fmt: ActFormat) -> np.ndarray:
    """``total / area`` rounded in the pool's (input) format's rounding."""
    return np.vectorize(
        lambda t: oracle_round(Fraction(int(t), area), fmt.rounding), otypes=[np.int64]
    )(total)


def typical_shift(w: np.ndarray, fmt: ActFormat, out_bits: int, delta: int) -> int:
    """A requantisation shift that maps a typical accumulator near the output range."""
    fan_in = w[0].size
    typical = max(1.0, float(np.abs(w).max()) * max(-fmt.lo, fmt.hi) * math.sqrt(fan_in))
    return int(math.log2(typical)) - out_bits + delta


def out_frac_for(in_fmt: ActFormat, wfrac: int, shift: int) -> int:
    return min(max(in_fmt.frac + wfrac - shift, -32), 32)


# ---------------------------------------------------------------- conv and linear


@st.composite
def conv_cases(draw: st.DrawFn):
    rng = draw(rngs())
    in_fmt, wfmt = draw(rounded_formats()), draw(weight_formats())
    small = st.integers(1, 4)
    cin, cout = (
        draw(st.one_of(small, st.integers(1, 64))),
        draw(st.one_of(small, st.integers(1, 64))),
    )
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + 6))
    w = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + 6))
    n = draw(st.integers(1, 2))
    weight = weight_array(rng, wfmt, (cout, cin, kh, kw), draw(array_modes))
    x = int_array(rng, in_fmt.lo, in_fmt.hi, (n, cin, h, w), draw(array_modes))
    mac = int(np.abs(weight).reshape(cout, -1).sum(1).max()) * max(-in_fmt.lo, in_fmt.hi)
    bias = int_array(rng, -mac, mac, (cout,), draw(array_modes))
    out_bits = draw(st.integers(2, 16))
    shift = typical_shift(weight, in_fmt, out_bits, draw(st.integers(-3, 3)))
    out_frac = draw(
        st.one_of(st.just(out_frac_for(in_fmt, wfmt.frac, shift)), st.integers(-32, 32))
    )
    out_fmt = ActFormat(out_bits, out_frac, draw(st.booleans()), draw(roundings))
    layer = Conv2d(
        "conv", cin, cout, (kh, kw), wfmt, out_fmt, weight, bias,
        stride=(sh, sw), padding=(ph, pw), relu=draw(st.booleans()),
    )  # fmt: skip
    return layer, in_fmt, x


@given(conv_cases())
def test_conv2d_matches_oracle(case):
    layer, in_fmt, x = case
    acc = gm.conv2d_acc(x, layer, in_fmt)
    assert np.array_equal(acc, oracle_conv_acc(x, layer))
    got = gm.layer_forward(layer, x, in_fmt)
    want, _ = oracle_layer(layer, x, in_fmt)
    assert got.dtype == np.int64
    assert np.array_equal(got, want)


@st.composite
def linear_cases(draw: st.DrawFn):
    rng = draw(rngs())
    in_fmt, wfmt = draw(rounded_formats()), draw(weight_formats())
    fin = draw(st.one_of(st.integers(1, 8), st.integers(1, 600)))
    fout = draw(st.integers(1, 40))
    weight = weight_array(rng, wfmt, (fout, fin), draw(array_modes))
    x = int_array(rng, in_fmt.lo, in_fmt.hi, (draw(st.integers(1, 3)), fin), draw(array_modes))
    mac = int(np.abs(weight).sum(1).max()) * max(-in_fmt.lo, in_fmt.hi)
    bias = int_array(rng, -mac, mac, (fout,), draw(array_modes))
    out_bits = draw(st.integers(2, 16))
    shift = typical_shift(weight, in_fmt, out_bits, draw(st.integers(-3, 3)))
    out_frac = draw(
        st.one_of(st.just(out_frac_for(in_fmt, wfmt.frac, shift)), st.integers(-32, 32))
    )
    out_fmt = ActFormat(out_bits, out_frac, draw(st.booleans()), draw(roundings))
    layer = Linear("fc", fin, fout, wfmt, out_fmt, weight, bias, relu=draw(st.booleans()))
    return layer, in_fmt, x


@given(linear_cases())
def test_linear_matches_oracle(case):
    layer, in_fmt, x = case
    assert np.array_equal(gm.linear_acc(x, layer, in_fmt), oracle_linear_acc(x, layer))
    assert np.array_equal(gm.layer_forward(layer, x, in_fmt), oracle_layer(layer, x, in_fmt)[0])


@st.composite
def scaled_cases(draw: st.DrawFn, cases: st.SearchStrategy):
    """A conv or linear case with a per-channel scale: any Fixed format, the scales from the
    array modes (all at the format's max or min, both ends, mostly zero) or with zeros and
    ±1 mixed in; the output frac near the scaled accumulator's typical size or anywhere."""
    layer, in_fmt, x = draw(cases)
    rng = draw(rngs())
    sfmt = Fixed(
        draw(st.integers(2, 16)), draw(st.one_of(st.integers(-4, 16), st.integers(-64, 64)))
    )
    cout = layer.bias.shape[0]
    m = int_array(rng, sfmt.lo, sfmt.hi, (cout,), draw(array_modes))
    if draw(st.booleans()):
        m = np.where(rng.random(cout) < 0.3, rng.choice([0, 1, -1], cout), m)
    out = layer.out_format
    shift = typical_shift(layer.weight, in_fmt, out.bits, draw(st.integers(-3, 3)))
    shift += int(np.abs(m).max()).bit_length()
    out_frac = draw(
        st.one_of(
            st.just(out_frac_for(in_fmt, layer.weight_format.frac + sfmt.frac, shift)),
            st.just(out.frac),
            st.integers(-32, 32),
        )
    )
    layer = replace(layer, out_format=replace(out, frac=out_frac), scale=m, scale_format=sfmt)
    assume(requant_bits(layer, in_fmt) <= ACC_BITS_MAX)  # what Network would refuse
    return layer, in_fmt, x


@given(st.one_of(scaled_cases(conv_cases()), scaled_cases(linear_cases())))
def test_scaled_layers_match_oracle(case):
    """``sat(round(acc_c * m_c * 2^-(F + frac_m - frac_o)))`` against exact rationals."""
    layer, in_fmt, x = case
    got = gm.layer_forward(layer, x, in_fmt)
    want, _ = oracle_layer(layer, x, in_fmt)
    assert got.dtype == np.int64
    assert np.array_equal(got, want)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_scale_extremes_saturate_and_tie(relu, rounding):
    """m at the Fixed min and max, 0 and ±1 on the four channels of a 1x1 conv: every output
    saturates high and low, and the ties of m = ±1 round as the format says."""
    sfmt = Fixed(16, 3)
    m = np.array([sfmt.lo, sfmt.hi, 0, -1])
    out = ActFormat(6, 0, rounding=rounding)
    layer = replace(
        _conv(Fixed(2, 0), out, np.ones((4, 1, 1, 1), dtype=int), padding=0, relu=relu),
        scale=m,
        scale_format=sfmt,
    )
    in_fmt = ActFormat(8, 0)
    x = np.array([-128, -20, -12, -4, 0, 4, 12, 20, 127]).reshape(1, 1, 1, 9)
    got = gm.layer_forward(layer, x, in_fmt)
    assert np.array_equal(got, oracle_layer(layer, x, in_fmt)[0])
    lo = 0 if relu else out.lo
    assert got[0, 0, 0, 0] == out.hi and got[0, 0, 0, -1] == lo  # m = -2^15: -128 -> high
    assert got[0, 1, 0, 0] == lo and got[0, 1, 0, -1] == out.hi
    assert np.all(got[0, 2] == 0)
    # m = -1: -x / 8 with x = ±4, ±12, ±20 are the ties ±0.5, ±1.5, ±2.5
    ties = oracle_requant(-x[0, 0, 0, 1:-1].astype(object), 3, out, relu)
    assert got[0, 3, 0, 1:-1].tolist() == ties.tolist()


@st.composite
def codebook_cases(draw: st.DrawFn, cases: st.SearchStrategy):
    """A conv or linear case with shift-add codebook weights as DQC and TTQ make them: 2 to
    256 entries, with or without 0, ``|e| <= 2**kmax`` with ``±2**kmax`` and two-digit ones
    at the top (``±(2**kmax - 1)``...), kmax up to 30; the indices from the array modes
    (all at the largest or smallest entry, both ends, mostly the first); returns the
    indices too."""
    layer, in_fmt, x = draw(cases)
    rng = draw(rngs())
    kmax = draw(st.one_of(st.integers(0, 8), st.integers(0, 30)))
    frac = draw(st.one_of(st.integers(-4, 12), st.integers(-64, 64)))
    cb = shift_add_codebook(rng, draw(st.integers(1, 8)), kmax, frac, draw(st.booleans()))
    idx = int_array(rng, 0, len(cb.entries) - 1, layer.weight.shape, draw(array_modes))
    weight = np.asarray(cb.entries, np.int64)[idx]
    out = layer.out_format
    shift = typical_shift(weight, in_fmt, out.bits, draw(st.integers(-3, 3)))
    out_frac = draw(st.one_of(st.just(out_frac_for(in_fmt, frac, shift)), st.integers(-32, 32)))
    layer = replace(layer, weight_format=cb, weight=weight, out_format=replace(out, frac=out_frac))
    assume(acc_bits(layer, in_fmt) <= ACC_BITS_MAX)  # what Network would refuse
    x = np.concatenate([x, np.full_like(x[:1], in_fmt.hi), np.full_like(x[:1], in_fmt.lo)])
    return layer, in_fmt, x, idx


@given(st.one_of(codebook_cases(conv_cases()), codebook_cases(linear_cases())))
def test_codebook_layers_match_oracle(case):
    """Golden == the oracle built from the indices: ``bias + Σ_i e_i · mac(x, [index == i])``
    (a 0/1 torch float64 conv or linear per entry, exact Python integers between), then
    exact rational rounding and saturation; all-max and all-min images included."""
    layer, in_fmt, x, idx = case
    if isinstance(layer, Conv2d):
        op = lambda a, w: F.conv2d(a, w, stride=layer.stride, padding=layer.padding)  # noqa: E731
        bias = layer.bias.reshape(1, -1, 1, 1).astype(object)
    else:
        op, bias = F.linear, layer.bias.astype(object)
    acc = bias + sum(
        e * _exact_mac(x, (idx == i).astype(np.int64), op).astype(object)
        for i, e in enumerate(layer.weight_format.entries)
    )
    s = in_fmt.frac + layer.weight_format.frac - layer.out_format.frac
    want = oracle_requant(acc, s, layer.out_format, layer.relu)
    assert np.array_equal(gm.layer_forward(layer, x, in_fmt), want)


def _conv(wfmt, out_fmt, weight, bias=0, **kw) -> Conv2d:
    cout, cin, kh, kw_ = weight.shape
    return Conv2d("c", cin, cout, (kh, kw_), wfmt, out_fmt, weight, np.full(cout, bias), **kw)


@pytest.mark.parametrize("wfmt", [Fixed(16, 0), Fixed(2, 3), Pow2(7, 0), Pow2(1, -2), Pow2(2, 4)])
@pytest.mark.parametrize(
    "in_fmt", [ActFormat(16, 0), ActFormat(16, 0, signed=False), ActFormat(2, 5)]
)
def test_all_max_inputs_against_all_max_weights(wfmt, in_fmt):
    """Every product at its extreme: the accumulator has a closed form, nothing overflows."""
    cin, k = 64, 7
    x_max, w_max = (in_fmt.lo, in_fmt.hi), (wfmt.lo, wfmt.hi)
    for a in x_max:
        for w in w_max:
            weight = np.full((3, cin, k, k), w)
            bias = -(1 << 20)
            layer = _conv(wfmt, ActFormat(16, 0), weight, bias)
            x = np.full((1, cin, k + 2, k + 2), a)
            acc = gm.conv2d_acc(x, layer, in_fmt)
            assert np.array_equal(acc, np.full((1, 3, 3, 3), cin * k * k * a * w + bias))
            assert np.array_equal(acc, oracle_conv_acc(x, layer))


@pytest.mark.parametrize("relu", [False, True])
def test_every_output_saturates_high_and_low(relu):
    in_fmt, out_fmt = ActFormat(8, 0), ActFormat(4, 0)
    weight = np.full((2, 3, 3, 3), 7)
    layer = _conv(Fixed(4, 0), out_fmt, weight, padding=1, relu=relu)
    hi = gm.layer_forward(layer, np.full((2, 3, 5, 5), 127), in_fmt)
    lo = gm.layer_forward(layer, np.full((2, 3, 5, 5), -128), in_fmt)
    assert np.all(hi == 7)
    assert np.all(lo == (0 if relu else -8))


# Halves -3.5 ... 3.5: half_up goes up for either sign (not half-away from zero), half_even
# to the even neighbour (torch.round, QONNX ROUND), floor down (QONNX FLOOR).
TIES = {
    "half_up": [-3, -2, -1, 0, 1, 2, 3, 4],
    "half_even": [-4, -2, -2, 0, 0, 2, 2, 4],
    "floor": [-4, -3, -2, -1, 0, 1, 2, 3],
}


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_requantisation_ties(rounding):
    fmt = ActFormat(8, 0, rounding=rounding)
    acc = np.array([-7, -5, -3, -1, 1, 3, 5, 7])
    assert gm.requantize(acc, 1, fmt).tolist() == TIES[rounding]
    assert oracle_requant(acc, 1, fmt, False).tolist() == TIES[rounding]
    # Through a layer: a 1x1 conv with weight 1 and bias 4 gives acc = x + 4, and s = 3.
    out = ActFormat(8, -3, rounding=rounding)
    layer = _conv(Fixed(2, 0), out, np.ones((1, 1, 1, 1), dtype=int), bias=4)
    acc = np.array([-28, -20, -12, -4, 4, 12, 20, 28])  # acc / 8 = -3.5 ... 3.5
    got = gm.layer_forward(layer, (acc - 4).reshape(1, 1, 1, 8), ActFormat(8, 0))
    assert got.ravel().tolist() == TIES[rounding]


@given(
    st.one_of(st.integers(-(2**61) + 1, 2**61 - 1), st.integers(-64, 64)),
    st.integers(1, 70),
    st.integers(-(2**20), 2**20),
    roundings,
)
def test_round_shift_matches_exact_rationals(v, s, k, rounding):
    """Any value and shift, and the exact tie (2k + 1) * 2^(s-1) next to it."""
    tie = (2 * k + 1) << (s - 1)
    for x in (v, tie) if abs(tie) < 2**61 else (v,):
        want = oracle_round(Fraction(x, 2**s), rounding)
        assert gm.round_shift(np.array([x]), s, rounding).tolist() == [want]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("s", [-60, -41, -40, -39, -8, -1, 0])
def test_requantize_left_shift(s, rounding):
    fmt = ActFormat(16, 0, rounding=rounding)
    acc = np.array([-(2**40), -3, -1, 0, 1, 2, 2**40, 2**60])
    assert np.array_equal(gm.requantize(acc, s, fmt), oracle_requant(acc, s, fmt, False))
    assert np.array_equal(gm.requantize(acc, s, fmt, relu=True), oracle_requant(acc, s, fmt, True))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("s", [1, 2, 30, 60, 61, 62, 63, 100, 128])
def test_requantize_right_shift_up_to_accumulator_limits(s, rounding):
    fmt = ActFormat(24, 0, rounding=rounding)
    acc = np.array([-(2**61), -(2**61) + 1, -(2**60), -1, 0, 1, 2**60, 2**61 - 1])
    assert np.array_equal(gm.requantize(acc, s, fmt), oracle_requant(acc, s, fmt, False))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_requantize_saturates_after_rounding(rounding):
    """s4.f0 from s = 2: 29/4 = 7.25 and 30/4 = 7.5 and -34/4 = -8.5 at the range edges."""
    fmt = ActFormat(4, 0, rounding=rounding)
    acc = np.array([29, 30, 31, 2**40, -32, -33, -34, -35, -(2**40)])
    want = oracle_requant(acc, 2, fmt, False)
    assert gm.requantize(acc, 2, fmt).tolist() == want.tolist()
    assert want.max() == 7 and want.min() == -8 and want[0] == 7
    relu = gm.requantize(acc, 2, fmt, relu=True)
    assert relu.tolist() == oracle_requant(acc, 2, fmt, True).tolist() and relu.min() == 0


@pytest.mark.parametrize(("fmt", "limit"), [(Fixed(16, 0), 2**24), (Pow2(7, 0), 2**53)])
def test_accumulators_past_float_precision_stay_exact(fmt, limit):
    """Odd sums just above 2**24 (2**53): a float32 (float64) path would round them."""
    weight = np.full((1, 1, 3, 3), fmt.hi)
    weight[0, 0, 0, 0] = 1
    bits = next(b for b in range(1, 25) if ((1 << b) - 1) * (8 * fmt.hi + 1) > limit)
    in_fmt = ActFormat(bits, 0, signed=False)
    x = np.full((1, 1, 3, 3), in_fmt.hi)
    want = in_fmt.hi * (8 * fmt.hi + 1)
    assert limit < want < 2 * limit and want % 2 == 1
    layer = _conv(fmt, ActFormat(24, 0), weight)
    assert gm.conv2d_acc(x, layer, in_fmt).item() == want
    lin = Linear("l", 9, 1, fmt, ActFormat(24, 0), weight.reshape(1, 9), np.zeros(1, int))
    assert gm.linear_acc(x.reshape(1, 9), lin, in_fmt).item() == want


# ---------------------------------------------------------------- pools, ReLU, Flatten


@st.composite
def pool_cases(draw: st.DrawFn, avg: bool):
    rng = draw(rngs())
    fmt = draw(rounded_formats(max_bits=24))
    if avg:
        ek = draw(st.integers(0, 4))
        e0 = draw(st.integers(0, ek))
        kernel = (1 << e0, 1 << (ek - e0))
    else:
        kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    h = draw(st.integers(kernel[0], kernel[0] + 7))
    w = draw(st.integers(kernel[1], kernel[1] + 7))
    x = int_array(
        rng,
        fmt.lo,
        fmt.hi,
        (draw(st.integers(1, 2)), draw(st.integers(1, 5)), h, w),
        draw(array_modes),
    )
    layer = (AvgPool2d if avg else MaxPool2d)("pool", kernel, stride)
    return layer, fmt, x


@given(pool_cases(avg=False))
def test_maxpool_matches_oracle(case):
    layer, fmt, x = case
    assert np.array_equal(gm.layer_forward(layer, x, fmt), oracle_layer(layer, x, fmt)[0])


@given(pool_cases(avg=True))
def test_avgpool_matches_oracle(case):
    layer, fmt, x = case
    got = gm.layer_forward(layer, x, fmt)
    assert np.array_equal(got, oracle_layer(layer, x, fmt)[0])
    assert got.min(initial=fmt.lo) >= fmt.lo and got.max(initial=fmt.hi) <= fmt.hi


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_avgpool_ties_round_in_the_input_format(rounding):
    x = np.array([-7, 0, -5, 0, -3, 0, -1, 0, 1, 0, 3, 0, 5, 0, 7, 0]).reshape(1, 8, 1, 2)
    got = gm.layer_forward(AvgPool2d("p", (1, 2)), x, ActFormat(8, 0, rounding=rounding))
    assert got.ravel().tolist() == TIES[rounding]  # -3.5 ... 3.5


@pytest.mark.parametrize("kernel", [3, (1, 3), (2, 3), (3, 3), (5, 1)])
def test_avgpool_area_must_be_a_power_of_two(kernel):
    with pytest.raises(HwgenError, match=r"layer p: average pool window area \d+ .* power of two"):
        AvgPool2d("p", kernel)


@given(rngs(), act_formats(), array_modes)
def test_relu_and_flatten_match_oracle(rng, fmt, mode):
    x = int_array(rng, fmt.lo, fmt.hi, (2, 3, 4, 5), mode)
    assert np.array_equal(gm.layer_forward(ReLU("r"), x, fmt), oracle_layer(ReLU("r"), x, fmt)[0])
    flat = gm.layer_forward(Flatten("f"), x, fmt)
    assert np.array_equal(flat, oracle_layer(Flatten("f"), x, fmt)[0])


def test_flatten_is_h_w_c_order():
    x = np.arange(3 * 2 * 2).reshape(1, 3, 2, 2)  # value = c*4 + h*2 + w
    assert gm.flatten_hwc(x).ravel().tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


# ---------------------------------------------------------------- whole network


@st.composite
def networks(draw: st.DrawFn):
    """conv[+relu] -> [ReLU] -> [pool] -> [conv] -> Flatten -> linear -> linear."""
    rng = draw(rngs())
    in_fmt = draw(rounded_formats(max_bits=12))
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(4, 10)), draw(st.integers(4, 10))
    layers, fmt, shape = [], in_fmt, (c, h, w)

    def mac(name: str, cin_shape) -> None:
        nonlocal fmt, shape
        wfmt = draw(weight_formats())
        out_bits = draw(st.integers(2, 12))
        if len(cin_shape) == 3:
            pad = draw(st.integers(0, 1))
            k = draw(st.integers(1, min(3, min(cin_shape[1:]) + 2 * pad)))
            cout = draw(st.integers(1, 6))
            weight = weight_array(rng, wfmt, (cout, cin_shape[0], k, k), draw(array_modes))
        else:
            cout = draw(st.integers(1, 12))
            weight = weight_array(rng, wfmt, (cout, cin_shape[0]), draw(array_modes))
        span = int(np.abs(weight).reshape(cout, -1).sum(1).max()) * max(-fmt.lo, fmt.hi)
        bias = int_array(rng, -span, span, (cout,), "random")
        shift = typical_shift(weight, fmt, out_bits, draw(st.integers(-2, 2)))
        frac = out_frac_for(fmt, wfmt.frac, shift)
        out = ActFormat(out_bits, frac, draw(st.booleans()), draw(roundings))
        relu = draw(st.booleans())
        if len(cin_shape) == 3:
            layer = Conv2d(
                name, cin_shape[0], cout, k, wfmt, out, weight, bias, padding=pad, relu=relu
            )
            shape = (cout, cin_shape[1] + 2 * pad - k + 1, cin_shape[2] + 2 * pad - k + 1)
        else:
            layer = Linear(name, cin_shape[0], cout, wfmt, out, weight, bias, relu=relu)
            shape = (cout,)
        layers.append(layer)
        fmt = out

    mac("conv1", shape)
    if draw(st.booleans()):
        layers.append(ReLU("relu1"))
    pool = draw(st.sampled_from([None, MaxPool2d, AvgPool2d]))
    if pool is not None and min(shape[1:]) >= 2:
        layers.append(pool("pool1", 2))
        shape = (shape[0], shape[1] // 2, shape[2] // 2)
    if draw(st.booleans()):
        mac("conv2", shape)
    layers.append(Flatten("flat"))
    shape = (int(np.prod(shape)),)
    mac("fc1", shape)
    mac("fc2", shape)
    net = Network((c, h, w), in_fmt, tuple(layers))
    x = int_array(rng, in_fmt.lo, in_fmt.hi, (draw(st.integers(1, 3)), c, h, w), draw(array_modes))
    return net, x


@given(networks())
def test_forward_matches_chain_of_oracle_layers(case):
    net, x = case
    outs = gm.forward(net, x)
    assert len(outs) == len(net.layers)
    y, fmt = x, net.input_format
    for layer, got in zip(net.layers, outs, strict=True):
        y, fmt = oracle_layer(layer, y, fmt)
        assert np.array_equal(got, y), layer.name
        assert fmt.lo <= got.min() and got.max() <= fmt.hi
    assert np.array_equal(gm.predict(net, x), torch.argmax(_t(y), dim=1).numpy())


def _tiny_net(in_fmt: ActFormat | None = None) -> Network:
    in_fmt = in_fmt or ActFormat(8, 0)
    lin = Linear("fc", 3, 3, Fixed(2, 0), ActFormat(8, 0), np.eye(3, dtype=int), np.zeros(3, int))
    return Network((3,), in_fmt, (lin,))


def test_predict_takes_the_first_maximum():
    x = np.array([[1, 5, 5], [7, 7, 7], [-1, -2, 0]])
    assert gm.predict(_tiny_net(), x).tolist() == [1, 0, 2]


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_quantize_input_ties_and_saturation(rounding):
    fmt = ActFormat(4, 1, rounding=rounding)  # step 0.5, range [-8, 7]
    x = np.arange(-7, 9, 2) / 4  # -1.75 ... 1.75: x * 2 = -3.5 ... 3.5
    assert gm.quantize_input(x, fmt).tolist() == TIES[rounding]
    assert gm.quantize_input(np.array([3.75, 3.5, 1e300, -4.25, -4.0, -1e300]), fmt).tolist() == [
        7, 7, 7, -8, -8, -8,
    ]  # fmt: skip


@given(
    st.lists(st.integers(-(2**30), 2**30), min_size=1, max_size=20),
    st.integers(0, 20),
    rounded_formats(max_bits=24),
)
def test_quantize_input_matches_exact_rationals(ks, e, fmt):
    """Dyadic floats k / 2^e (exact in float64, ties included) rounded by the oracle."""
    x = np.array(ks, dtype=np.float64) / 2.0**e
    want = [
        min(
            max(oracle_round(Fraction(k, 2**e) * Fraction(2) ** fmt.frac, fmt.rounding), fmt.lo),
            fmt.hi,
        )
        for k in ks
    ]
    assert gm.quantize_input(x, fmt).tolist() == want


def test_quantize_input_rounds_half_up_and_saturates():
    fmt = ActFormat(4, 2)  # step 0.25, range [-8, 7]
    x = np.array([-0.375, -0.125, 0.125, 0.375, 0.1, -0.1, 100.0, -100.0, 1.874, -2.0])
    want = [-1, 0, 1, 2, 0, 0, 7, -8, 7, -8]
    assert gm.quantize_input(x, fmt).tolist() == want
    assert gm.quantize_input(x, fmt).dtype == np.int64
    assert gm.quantize_input(np.array([0.5, 1.5, 2.5]), ActFormat(3, 0, signed=False)).tolist() == [
        1,
        2,
        3,
    ]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_input_rejects_nan_and_inf(bad):
    with pytest.raises(HwgenError, match="NaN or Inf"):
        gm.quantize_input(np.array([0.0, bad]), ActFormat(8, 0))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((2, 3), dtype=np.float32), "integer array, not dtype float32"),
        (np.zeros((2, 4), dtype=np.int8), r"shape \(2, 4\), expected \(N, 3\)"),
        (np.zeros(3, dtype=np.int8), r"shape \(3,\), expected \(N, 3\)"),
        (
            np.array([[0, 128, 0]]),
            r"input value 128 is outside the input format s8.f0 \[-128, 127\]",
        ),
        (np.array([[0, -129, 0]], dtype=np.int16), "input value -129 is outside"),
        (np.array([[0, 2**64 - 1, 0]], dtype=np.uint64), "input value 18446744073709551615"),
    ],
)
def test_forward_rejects_bad_input(x, message):
    with pytest.raises(HwgenError, match=message):
        gm.forward(_tiny_net(), x)


def test_forward_accepts_any_integer_dtype():
    net = _tiny_net(ActFormat(8, 0, signed=False))
    x = np.array([[0, 255, 3]], dtype=np.uint8)
    want = gm.forward(net, x.astype(np.int64))
    for dt in (np.uint8, np.uint16, np.int16, np.int32, np.uint64):
        got = gm.forward(net, x.astype(dt))
        assert all(
            np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(got, want, strict=True)
        )


# ---------------------------------------------------------------- graphs


@st.composite
def add_cases(draw: st.DrawFn):
    """Two inputs of any formats (fracs far apart too) whose aligned sum fits 62 bits."""
    rng = draw(rngs())
    fa, fb = draw(rounded_formats(max_bits=24)), draw(rounded_formats(max_bits=24))
    assume(signed_bits(*add_range(fa, fb)) <= 62)
    fine = max(fa.frac, fb.frac)
    frac_o = min(max(fine - draw(st.integers(-3, 12)), -32), 32)
    fo = ActFormat(draw(st.integers(2, 16)), frac_o, draw(st.booleans()), draw(roundings))
    layer = Add("s", fo, ("a", "b"), relu=draw(st.booleans()))
    shape = (draw(st.integers(1, 3)), 2, draw(st.integers(1, 4)), 3)
    a = int_array(rng, fa.lo, fa.hi, shape, draw(array_modes))
    b = int_array(rng, fb.lo, fb.hi, shape, draw(array_modes))
    return a, b, fa, fb, layer


@given(add_cases())
def test_add_matches_oracle(case):
    a, b, fa, fb, layer = case
    assert np.array_equal(gm.add_forward(a, b, fa, fb, layer), oracle_add(a, b, fa, fb, layer))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_add_ties_in_the_output_rounding(rounding):
    # s8.f1 + s8.f0 to s8.f0: (a + 2b) / 2 hits every tie -3.5 ... 3.5.
    layer = Add("s", ActFormat(8, 0, rounding=rounding), ("a", "b"))
    a = np.array([-7, -5, -3, -1, 1, 3, 5, 7])
    b = np.array([1, 0, -1, 1, 0, -1, 1, 0])
    got = gm.add_forward(a + 2 * -b, b, ActFormat(8, 1), ActFormat(8, 0), layer)
    assert got.tolist() == TIES[rounding]


@pytest.mark.parametrize("relu", [False, True])
def test_add_ties_round_half_up_and_saturates(relu):
    # s8.f1 + s8.f1 to s8.f0: (a + b) / 2 rounds half up; all-max and all-min saturate.
    fmt = ActFormat(8, 1)
    layer = Add("s", ActFormat(8, 0), ("a", "b"), relu=relu)
    a = np.array([1, -1, 3, -3, 127, -128, 127, -128, 0])
    b = np.array([0, 0, 0, 0, 127, -128, 126, -127, -1])
    want = [1, 0, 2, -1, 127, -128, 127, -127, 0]
    want = [max(v, 0) for v in want] if relu else want
    assert gm.add_forward(a, b, fmt, fmt, layer).tolist() == want
    assert oracle_add(a, b, fmt, fmt, layer).tolist() == want


def test_add_of_very_different_fracs_is_exact():
    """u8 at frac -20 (steps of 2^20) plus s16 at frac 24: sum aligned to 2^-24, 62 bits."""
    fa, fb = ActFormat(8, -20, signed=False), ActFormat(16, 24)
    layer = Add("s", ActFormat(24, 2), ("a", "b"))
    a, b = np.array([[255, 1, 0, 1]]), np.array([[-32768, 32767, -1, 2**22]])
    got = gm.add_forward(a, b, fa, fb, layer)
    assert np.array_equal(got, oracle_add(a, b, fa, fb, layer))
    assert got.tolist() == [[ActFormat(24, 2).hi, 2**22, 0, 2**22 + 1]]


@given(
    rngs(),
    rounded_formats(max_bits=16),
    array_modes,
    st.sampled_from([(1, 1), (2, 2), (4, 2), (1, 8)]),
)
def test_global_avgpool_and_subsample_pad_match_oracle(rng, fmt, mode, hw):
    x = int_array(rng, fmt.lo, fmt.hi, (2, 3, *hw), mode)
    for layer in (
        GlobalAvgPool("g"),
        SubsamplePad("s", (2, 3), (1, 2)),
        SubsamplePad("t", 1, (0, 5)),
    ):
        assert np.array_equal(gm.layer_forward(layer, x, fmt), oracle_layer(layer, x, fmt)[0])


def test_global_avgpool_rounds_half_up():
    x = np.array([1, 1, 0, 0, -1, -1, 0, 0, 3, 2, 2, 2]).reshape(3, 1, 2, 2)
    assert gm.layer_forward(GlobalAvgPool("g"), x, ActFormat(8, 0)).ravel().tolist() == [1, 0, 2]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_global_avgpool_ties_round_in_the_input_format(rounding):
    sums = np.array([-14, -10, -6, -2, 2, 6, 10, 14])  # / 4 = -3.5 ... 3.5
    x = np.stack([sums // 4, sums // 4, sums // 4, sums - 3 * (sums // 4)], axis=-1)
    got = gm.layer_forward(
        GlobalAvgPool("g"), x.reshape(1, 8, 2, 2), ActFormat(8, 0, True, rounding)
    )
    assert got.ravel().tolist() == TIES[rounding]


def _oracle_graph(net: Network, x: np.ndarray) -> dict[str, np.ndarray]:
    acts = {INPUT: x}
    for layer in net.layers:
        if isinstance(layer, Add):
            a, b = layer.inputs
            acts[layer.name] = oracle_add(acts[a], acts[b], net.formats[a], net.formats[b], layer)
        else:
            acts[layer.name] = oracle_layer(layer, acts[layer.inputs[0]], net.in_format(layer))[0]
    return acts


@given(rngs(), array_modes, st.integers(0, 3), st.lists(roundings, min_size=12, max_size=12))
def test_residual_forward_matches_oracle_graph(rng, mode, seed, modes):
    net = residual_network(seed)
    net = with_roundings(net, lambda name: modes[(["input", *net.names]).index(name)])
    fmt = net.input_format
    x = int_array(rng, fmt.lo, fmt.hi, (2, *net.input_shape), mode)
    want = _oracle_graph(net, x)
    for layer, got in zip(net.layers, gm.forward(net, x), strict=True):
        assert np.array_equal(got, want[layer.name]), layer.name


@pytest.mark.slow
@settings(max_examples=1500)
@given(
    conv_cases(), networks(), add_cases(), scaled_cases(conv_cases()), codebook_cases(conv_cases())
)
def test_long_campaign(conv_case, net_case, add_case, scaled_case, codebook_case):
    """``pytest -m slow``: the conv, whole-network, add, per-channel scale and codebook
    properties on many more examples."""
    test_conv2d_matches_oracle.hypothesis.inner_test(conv_case)
    test_scaled_layers_match_oracle.hypothesis.inner_test(scaled_case)
    test_codebook_layers_match_oracle.hypothesis.inner_test(codebook_case)
    test_forward_matches_chain_of_oracle_layers.hypothesis.inner_test(net_case)
    test_add_matches_oracle.hypothesis.inner_test(add_case)


def test_forward_on_an_empty_batch():
    net = example_network()
    outs = gm.forward(net, np.zeros((0, *net.input_shape), dtype=np.int8))
    assert [o.shape for o in outs] == [(0, *net.shapes[n]) for n in net.names]
    assert gm.predict(net, np.zeros((0, *net.input_shape), dtype=np.int8)).shape == (0,)
