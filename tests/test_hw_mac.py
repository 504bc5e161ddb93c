"""The MAC unit (ROMs + MAC array + requantisers) against the golden model.

The window stream is generated here by a NumPy model of the window order (neuron fold, kh,
kw, channel group per output pixel), so these tests do not depend on the window unit.
"""

from dataclasses import replace

import numpy as np
import pytest
from amaranth.back import rtlil
from conftest import lane_weights, plane_format, plane_weights, shift_add_codebook, with_scale

from hwgen.errors import HwgenError
from hwgen.golden import conv2d_acc, layer_forward
from hwgen.hw.cmvm import csd
from hwgen.hw.mac import MACArray, MACUnit, _lane_range, plane_range, shares_products, tree_stages
from hwgen.hw.rom import rom_latency
from hwgen.hw.sparse import fold_schedule
from hwgen.hw.streams import run_stream
from hwgen.ir import (
    ROUNDINGS,
    ActFormat,
    Codebook,
    Conv2d,
    Fixed,
    Linear,
    Planes,
    Pow2,
    acc_bits,
    acc_frac,
    acc_range,
    signed_bits,
)


def window_beats(x: np.ndarray, layer: Conv2d, simd: int, pe: int) -> list[tuple[list, int]]:
    """(lanes, last) beats of the window stream for one (C, H, W) image: each neuron fold's
    scheduled beats (hwgen.hw.sparse: its zero blocks skipped, as the ROM is)."""
    c = x.shape[0]
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    window = [(a, b, g) for a in range(kh) for b in range(kw) for g in range(c // simd)]
    beats = []
    for oy in range(oh):
        for ox in range(ow):
            for taken in fold_schedule(layer, pe, simd):
                for n, (a, b, g) in enumerate((window[i] for i in taken), 1):
                    lanes = list(xp[g * simd : (g + 1) * simd, oy * sh + a, ox * sw + b])
                    beats.append((lanes, int(n == len(taken))))
    return beats


def run_mac(dut: MACUnit, beats, n_out: int, stall_in=0.0, stall_out=0.0, seed=0):
    """Feed window beats, collect ``n_out`` output beats; returns (beats, cycles)."""
    window = [{"data": [int(v) for v in lanes], "last": last} for lanes, last in beats]
    return run_stream(dut, window, n_out, stall_in, stall_out, seed)


def check_conv(layer: Conv2d, fin: ActFormat, x: np.ndarray, pe: int, simd: int, **stalls):
    """Run one image through a MAC unit and compare with the golden model."""
    expected = layer_forward(layer, x[None], fin)[0]
    oc, oh, ow = expected.shape
    dut = MACUnit(layer, fin, pe, simd)
    got, cycles = run_mac(dut, window_beats(x, layer, simd, pe), oh * ow * oc // pe, **stalls)
    hw = np.array(got).reshape(oh, ow, oc).transpose(2, 0, 1)
    assert np.array_equal(hw, expected)
    return cycles


def random_weights(rng, fmt, shape):
    if isinstance(fmt, Fixed):
        return rng.integers(fmt.lo, fmt.hi, size=shape, endpoint=True)
    mag = np.left_shift(1, rng.integers(0, fmt.max_shift + 1, size=shape))
    sign = rng.choice([-1, 1], size=shape)
    zero = rng.random(shape) < 0.3 if fmt.has_zero else np.zeros(shape, bool)
    return np.where(zero, 0, sign * mag)


WEIGHT_FORMATS = [
    Pow2(1, 0),
    Pow2(2, -1),
    Pow2(3, 0),
    Pow2(4, -1),
    Pow2(5, -3),
    Pow2(6, -3),
    Pow2(7, 0),
    Fixed(2, 0),
    Fixed(5, 3),
    Fixed(8, 6),
    Fixed(16, 14),
]


@pytest.mark.parametrize("wfmt", WEIGHT_FORMATS, ids=str)
def test_conv_formats_with_stalls(wfmt):
    rng = np.random.default_rng(wfmt.bits)
    fin = ActFormat(6, 4, signed=bool(wfmt.bits % 2))
    w = random_weights(rng, wfmt, (4, 4, 2, 2))
    # Output frac chosen so requantisation shifts right by a few bits: rounding is exercised.
    out = ActFormat(8, min(fin.frac + wfmt.frac - 3, 32))
    layer = Conv2d("c", 4, 4, 2, wfmt, out, w, rng.integers(-300, 300, 4), padding=1, relu=True)
    x = rng.integers(fin.lo, fin.hi, size=(4, 3, 3), endpoint=True)
    check_conv(layer, fin, x, pe=2, simd=2, stall_in=0.3, stall_out=0.3, seed=wfmt.bits)


@pytest.mark.parametrize(
    ("pe", "simd", "kernel", "stride", "padding"),
    [
        (1, 1, (3, 1), (1, 2), (1, 0)),
        (4, 1, (1, 3), (2, 1), (0, 2)),
        (1, 4, (2, 3), (2, 2), (1, 1)),
    ],
)
def test_conv_foldings_and_geometry(pe, simd, kernel, stride, padding):
    rng = np.random.default_rng(pe * 10 + simd)
    fin, wfmt = ActFormat(8, 4), Pow2(4, 0)
    layer = Conv2d(
        "c",
        4,
        4,
        kernel,
        wfmt,
        ActFormat(8, 2),
        random_weights(rng, wfmt, (4, 4, *kernel)),
        rng.integers(-100, 100, 4),
        stride=stride,
        padding=padding,
    )
    x = rng.integers(fin.lo, fin.hi, size=(4, 4, 5), endpoint=True)
    check_conv(layer, fin, x, pe, simd, stall_in=0.2, stall_out=0.4, seed=pe)


def test_dense():
    rng = np.random.default_rng(7)
    fin, wfmt = ActFormat(8, 5, signed=False), Fixed(6, 5)
    w = random_weights(rng, wfmt, (6, 12))
    layer = Linear("fc", 12, 6, wfmt, ActFormat(8, 4), w, rng.integers(-999, 999, 6))
    x = rng.integers(fin.lo, fin.hi, size=(2, 12), endpoint=True)
    expected = layer_forward(layer, x, fin)
    for img in range(2):
        dut = MACUnit(layer, fin, 3, 4)
        beats = window_beats(x[img][:, None, None], as_conv(layer), 4, 3)
        got, _ = run_mac(dut, beats, 2, stall_in=0.3, stall_out=0.3, seed=img)
        assert np.array_equal(np.array(got).reshape(-1), expected[img])


@pytest.mark.parametrize(("simd", "wfmt"), [(3, Pow2(5, -3)), (5, Pow2(2, 0)), (5, Pow2(1, 0))])
def test_odd_simd_with_negative_lanes(simd, wfmt):
    """Trees of 3 and 5 lanes: every negative lane's "+1" is a carry-in, the last one the
    accumulator's; one neuron has only negative weights, one only zeros."""
    rng = np.random.default_rng(simd)
    fin = ActFormat(7, 3, signed=simd == 3)
    w = random_weights(rng, wfmt, (4, 15))
    w[0] = -np.left_shift(1, rng.integers(0, wfmt.max_shift + 1, 15))
    w[1] = 0 if wfmt.has_zero else w[1]
    # The output is the accumulator itself (no shift): an error of 1 would show.
    out = ActFormat(24, fin.frac + wfmt.frac)
    layer = Linear("fc", 15, 4, wfmt, out, w, rng.integers(-99, 99, 4))
    x = rng.integers(fin.lo, fin.hi, size=(3, 15), endpoint=True)
    x[0] = fin.lo
    expected = layer_forward(layer, x, fin)
    for img in range(3):
        dut = MACUnit(layer, fin, 2, simd)
        beats = window_beats(x[img][:, None, None], as_conv(layer), simd, 2)
        got, _ = run_mac(dut, beats, 2, stall_in=0.3, seed=img)
        assert np.array_equal(np.array(got).reshape(-1), expected[img])


@pytest.mark.parametrize("wfmt", WEIGHT_FORMATS, ids=str)
@pytest.mark.parametrize("signed", [False, True])
def test_lane_range_holds_every_term(wfmt, signed):
    """A lane's register is as wide as its range: every weight level times every extreme
    activation fits (a negative Pow2 lane holds the one's complement, ``a*w - 1``)."""
    fin = ActFormat(6, 0, signed=signed)
    if isinstance(wfmt, Fixed):
        levels = range(wfmt.lo, wfmt.hi + 1)
    else:
        mags = [1 << s for s in range(wfmt.max_shift + 1)]
        levels = [*mags, *(-v for v in mags), *([0] if wfmt.has_zero else [])]
    pow2 = not isinstance(wfmt, Fixed)
    terms = [a * w - (pow2 and w < 0) for a in (fin.lo, fin.hi) for w in levels]
    lo, hi = _lane_range(wfmt, fin)
    assert lo <= min(terms) and max(terms) <= hi
    assert signed_bits(lo, hi) == signed_bits(min(*terms, 0), max(*terms, 0))


def as_conv(layer: Linear) -> Conv2d:
    """The 1x1 convolution that streams like ``layer`` (for the window model only)."""
    return Conv2d(
        layer.name,
        layer.in_features,
        layer.out_features,
        1,
        layer.weight_format,
        layer.out_format,
        layer.weight[:, :, None, None],
        layer.bias,
    )


@pytest.mark.parametrize("wfmt", [Fixed(8, 0), Pow2(4, 0), Pow2(2, 0)], ids=str)
@pytest.mark.parametrize("sign", [1, -1])
def test_accumulator_at_its_bound(wfmt, sign):
    """All-extreme activations against all-extreme weights: the accumulator reaches the
    exact bound of acc_range, and the output shows it unshifted (s = 0, wide format)."""
    fin = ActFormat(8, 0)
    top = wfmt.lo if isinstance(wfmt, Fixed) else wfmt.hi
    w = np.full((2, 8, 3, 3), top)
    bias = np.full(2, sign * 10_000)
    layer = Conv2d("c", 8, 2, 3, wfmt, ActFormat(24, wfmt.frac), w, bias)
    x = np.full((8, 3, 3), fin.lo if (top < 0) == (sign > 0) else fin.hi)
    acc = conv2d_acc(x[None], layer, fin)[0, :, 0, 0]
    lo, hi = acc_range(layer, fin)
    assert acc.tolist() == (hi if sign > 0 else lo).tolist()
    assert acc_frac(layer, fin) == layer.out_format.frac
    assert acc_bits(layer, fin) <= 24
    check_conv(layer, fin, x, pe=2, simd=4)


@pytest.mark.parametrize("relu", [False, True])
def test_saturation_high_and_low(relu):
    rng = np.random.default_rng(3)
    fin, wfmt = ActFormat(8, 0), Fixed(8, 0)
    w = rng.integers(-128, 128, size=(4, 4, 1, 1))
    layer = Conv2d("c", 4, 4, 1, wfmt, ActFormat(4, -4), w, np.zeros(4, int), relu=relu)
    x = rng.integers(-128, 128, size=(4, 4, 4))
    out = layer_forward(layer, x[None], fin)
    lo = 0 if relu else -8
    assert (out == 7).any() and (out == lo).any()  # both bounds are hit
    check_conv(layer, fin, x, pe=4, simd=2, stall_out=0.5)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_requantisation_ties_in_every_rounding(rounding):
    fin, wfmt = ActFormat(8, 0), Fixed(4, 0)
    rng = np.random.default_rng(5)
    w = rng.integers(-8, 8, size=(2, 2, 1, 1))
    out = ActFormat(8, -2, rounding=rounding)
    layer = Conv2d("c", 2, 2, 1, wfmt, out, w, np.array([2, -2]))
    x = rng.integers(-128, 128, size=(2, 6, 6))
    acc = conv2d_acc(x[None], layer, fin)
    ties = acc % 4 == 2
    assert ties.sum() >= 10 and (acc[ties] < 0).any() and (acc[ties] > 0).any()
    check_conv(layer, fin, x, pe=1, simd=2)


def test_left_shift_saturates():
    """s < 0: the accumulator is shifted left; large values saturate, small ones do not."""
    fin, wfmt = ActFormat(6, 0), Pow2(3, 0)
    rng = np.random.default_rng(9)
    w = random_weights(rng, wfmt, (2, 2, 1, 1))
    layer = Conv2d("c", 2, 2, 1, wfmt, ActFormat(10, 4), w, np.array([0, 1]))
    assert acc_frac(layer, fin) - layer.out_format.frac == -3
    x = rng.integers(-32, 32, size=(2, 5, 5))
    out = layer_forward(layer, x[None], fin)
    assert (np.abs(out) == 511).any() or (out == -512).any()
    assert ((out > -512) & (out < 511) & (out != 0)).any()
    check_conv(layer, fin, x, pe=2, simd=1, stall_in=0.3)


def test_one_beat_per_cycle():
    """Without stalls, a window beat is consumed every cycle: cycles = beats + fill."""
    rng = np.random.default_rng(11)
    fin, wfmt = ActFormat(8, 4), Pow2(4, 0)
    layer = Conv2d(
        "c",
        8,
        8,
        3,
        wfmt,
        ActFormat(8, 2),
        random_weights(rng, wfmt, (8, 8, 3, 3)),
        np.zeros(8, int),
        padding=1,
    )
    x = rng.integers(-128, 128, size=(8, 4, 4))
    cycles = check_conv(layer, fin, x, pe=2, simd=4)
    beats = 16 * 9 * 8 * 8 // (2 * 4)
    # the ROM's beat stage, input register, the array's 4 stages, requantiser, FIFO
    assert beats <= cycles <= beats + 8


@pytest.mark.parametrize("simd", [4, 16, 32])
def test_a_result_per_cycle_through_deep_trees(simd):
    """1x1 kernel, SIMD = Cin: every beat is a result. Trees of 16 and 32 lanes have one and
    two more register stages, and the output FIFO as many more words: still one a cycle."""
    rng = np.random.default_rng(simd)
    fin, wfmt = ActFormat(8, 4), Pow2(5, -2)
    w = random_weights(rng, wfmt, (4, simd, 1, 1))
    layer = Conv2d("c", simd, 4, 1, wfmt, ActFormat(12, 4), w, rng.integers(-99, 99, 4))
    x = rng.integers(fin.lo, fin.hi, size=(simd, 5, 6), endpoint=True)
    cycles = check_conv(layer, fin, x, pe=2, simd=simd)
    beats = 5 * 6 * 2
    assert tree_stages(simd) == {4: 1, 16: 2, 32: 3}[simd]
    assert beats <= cycles <= beats + 6 + tree_stages(simd) + rom_latency("logic") - 1


def test_block_rom_of_several_banks_with_stalls():
    """A ROM deeper than 128 words is in block RAM, in banks of 512 words here (20-bit
    words), with registered bank outputs: its data arrives a cycle later, the beat waits."""
    rng = np.random.default_rng(5)
    fin, wfmt = ActFormat(6, 2), Pow2(5, -2)
    w = random_weights(rng, wfmt, (32, 8, 3, 3))
    w[w == 0] = 1  # no zero block: every one of the 576 words is stored
    layer = Conv2d("c", 8, 32, 3, wfmt, ActFormat(8, 1), w, rng.integers(-50, 50, 32), padding=1)
    dut = MACUnit(layer, fin, 2, 2)
    assert (dut.depth, dut.rom_stages) == (576, 2)
    x = rng.integers(fin.lo, fin.hi, size=(8, 3, 3), endpoint=True)
    check_conv(layer, fin, x, pe=2, simd=2, stall_in=0.3, stall_out=0.3, seed=2)


def test_a_result_per_cycle_from_a_banked_rom():
    """1x1 kernel, SIMD = Cin, 520 output channels at PE = 1: a 520-word ROM in two banks,
    every beat a result, and still one a cycle (the FIFO has words more for the ROM)."""
    rng = np.random.default_rng(8)
    fin, wfmt = ActFormat(8, 4), Pow2(5, -2)
    layer = Conv2d(
        "c",
        4,
        520,
        1,
        wfmt,
        ActFormat(8, 2),
        random_weights(rng, wfmt, (520, 4, 1, 1)),
        rng.integers(-99, 99, 520),
    )
    x = rng.integers(fin.lo, fin.hi, size=(4, 2, 2), endpoint=True)
    cycles = check_conv(layer, fin, x, pe=1, simd=4)
    beats = 2 * 2 * 520
    assert beats <= cycles <= beats + 5 + rom_latency("block") + tree_stages(4)


# ---------------------------------------------------------------- per-channel scale


@pytest.mark.parametrize(
    ("wfmt", "sfmt", "cout", "pe", "simd", "rounding"),
    [
        (Pow2(4, -1), Fixed(16, 12), 8, 2, 2, "half_up"),  # 4 folds: the m table per PE
        (Fixed(8, 6), Fixed(16, -3), 4, 4, 1, "half_even"),  # one fold: constant m per PE
        (Pow2(1, 0), Fixed(2, 0), 6, 1, 3, "floor"),  # m in {-2, -1, 0, 1}, 6 folds
        (Pow2(2, 0), Fixed(9, 4), 4, 2, 4, "half_up"),
    ],
    ids=["pow2", "fixed", "binary", "ternary"],
)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("delta", [0, 8])
def test_scaled_results_with_stalls(wfmt, sfmt, cout, pe, simd, rounding, relu, delta):
    """acc_c * m_c with m at the Fixed min and max, 0 and -1 among the channels; delta = 8
    saturates both ways."""
    rng = np.random.default_rng(cout * pe + simd)
    fin = ActFormat(7, 3, signed=wfmt.bits != 1)
    cin = 4 if simd != 3 else 3
    w = random_weights(rng, wfmt, (cout, cin, 3, 3))
    plain = Conv2d(
        "c", cin, cout, 3, wfmt, ActFormat(8, 0, rounding=rounding), w,
        rng.integers(-300, 300, cout), padding=1, relu=relu,
    )  # fmt: skip
    layer = with_scale(plain, fin, sfmt, rng, delta)
    x = rng.integers(fin.lo, fin.hi, size=(cin, 4, 3), endpoint=True)
    x[:, 0] = fin.hi  # the accumulators' ends
    x[:, -1] = fin.lo
    out = layer_forward(layer, x[None], fin)
    if delta:
        assert out.max() == layer.out_format.hi and out.min() == (0 if relu else -128)
    else:
        assert len(np.unique(out)) > 4
    check_conv(layer, fin, x, pe=pe, simd=simd, stall_in=0.3, stall_out=0.3, seed=cout)


@pytest.mark.parametrize("simd", [4, 16])
def test_a_scaled_result_per_cycle(simd):
    """The scale's register stage has its output FIFO word: a result per beat still flows."""
    rng = np.random.default_rng(simd)
    fin, wfmt = ActFormat(8, 4), Pow2(5, -2)
    w = random_weights(rng, wfmt, (4, simd, 1, 1))
    plain = Conv2d("c", simd, 4, 1, wfmt, ActFormat(12, 4), w, rng.integers(-99, 99, 4))
    layer = with_scale(plain, fin, Fixed(12, 8), rng)
    x = rng.integers(fin.lo, fin.hi, size=(simd, 5, 6), endpoint=True)
    dut = MACUnit(layer, fin, 2, simd)
    assert dut.out_depth == MACUnit(plain, fin, 2, simd).out_depth + 1
    cycles = check_conv(layer, fin, x, pe=2, simd=simd)
    beats = 5 * 6 * 2
    assert beats <= cycles <= beats + 7 + tree_stages(simd) + dut.rom_stages


def test_the_scale_is_one_multiplier_per_pe():
    """Pow2 lanes have no multiplier; a scale adds exactly one per PE (none without)."""
    rng = np.random.default_rng(9)
    fin, wfmt = ActFormat(8, 4), Pow2(4, -1)
    w = random_weights(rng, wfmt, (6, 4, 3, 3))
    plain = Conv2d("c", 4, 6, 3, wfmt, ActFormat(8, 2), w, np.zeros(6, int), padding=1)
    scaled = with_scale(plain, fin, Fixed(16, 10), rng)
    for layer, pe, muls in ((plain, 3, 0), (scaled, 3, 3), (scaled, 6, 6), (scaled, 1, 1)):
        text = rtlil.convert(MACUnit(layer, fin, pe, 2), emit_src=False)
        assert text.count("cell $mul") == muls


# ---------------------------------------------------------------- codebook lanes


@pytest.mark.parametrize(
    ("bits", "kmax", "zero", "signed", "pe", "simd", "rounding"),
    [
        (3, 6, True, True, 2, 2, "half_up"),  # DQC 3-bit with 0
        (3, 6, False, False, 4, 1, "half_even"),  # without 0, unsigned activations
        (4, 6, True, False, 1, 4, "floor"),
        (5, 7, False, True, 2, 4, "half_up"),  # 32 entries: two terms up to 2**7
        (5, 5, True, True, 4, 2, "half_even"),
        (1, 0, False, True, 2, 2, "half_up"),  # {±1} or {0, ±1}: one term, no lane adder
    ],
)
def test_codebook_lanes_with_stalls(bits, kmax, zero, signed, pe, simd, rounding):
    """Codebook lanes (the index decoded to one or two signed shifts) == golden, with the
    extremes ``±2**kmax`` and two-term entries near them, all-max and all-min activations."""
    rng = np.random.default_rng(bits * 10 + kmax)
    cb = shift_add_codebook(rng, bits, kmax, frac=kmax - 1, zero=zero)
    assert shares_products(cb) == (bits < 5)  # both lane designs
    fin = ActFormat(7, 3, signed=signed)
    w = lane_weights(rng, cb, (4, 4, 3, 3))
    w[0, 0, 0, :] = cb.lo, cb.hi, cb.entries[1]
    out = ActFormat(8, fin.frac + cb.frac - kmax - 4, rounding=rounding)  # mostly in range
    layer = Conv2d("c", 4, 4, 3, cb, out, w, rng.integers(-300, 300, 4), padding=1, relu=True)
    x = rng.integers(fin.lo, fin.hi, size=(4, 4, 3), endpoint=True)
    x[:, 0], x[:, -1] = fin.hi, fin.lo
    check_conv(layer, fin, x, pe=pe, simd=simd, stall_in=0.3, stall_out=0.3, seed=bits)


@pytest.mark.parametrize(
    "entries",
    [(-12, 0, 20), (-64, -63, -33, 0, 3, 48, 63, 64), (-80, -1, 2, 96), (1, 3), (-5, -4)],
    ids=str,
)
def test_codebook_dense_with_scale_and_stalls(entries):
    """TTQ's {-Wn, 0, Wp} and DQC-like codebooks in a dense layer, with a per-channel scale
    at its extremes: the lanes' carries and the scale's multiplier together."""
    rng = np.random.default_rng(len(entries))
    cb = Codebook(entries, 4)
    fin = ActFormat(8, 4)
    w = lane_weights(rng, cb, (6, 8))
    plain = Linear("fc", 8, 6, cb, ActFormat(8, 2), w, rng.integers(-999, 999, 6))
    layer = as_conv(with_scale(plain, fin, Fixed(9, 7), rng))
    x = rng.integers(fin.lo, fin.hi, size=(8, 5, 1), endpoint=True)
    x[:, 0], x[:, 1] = fin.hi, fin.lo
    check_conv(layer, fin, x, pe=3, simd=4, stall_in=0.3, stall_out=0.3, seed=2)


BIG_CODEBOOK = tuple(
    sorted({s * ((1 << j) + (1 << k)) for j in range(7) for k in range(j) for s in (1, -1)})
)


@pytest.mark.parametrize(
    "entries",
    [(-64, -63, -33, 0, 3, 48, 63, 64), (-8, 0, 4), (-96, -1), (2, 6, 7), BIG_CODEBOOK],
    ids=str,
)
@pytest.mark.parametrize("signed", [False, True])
def test_codebook_lane_range_holds_every_term(entries, signed):
    """Every entry times every extreme activation, less the "+1" left to the tree (a
    negative entry's with shared products, else a negative second digit's), fits the lane's
    register, which is no wider than that."""
    fin = ActFormat(5, 0, signed=signed)
    cb = Codebook(entries, 0)
    assert shares_products(cb) == (entries != BIG_CODEBOOK)
    if shares_products(cb):
        left = [e < 0 for e in entries]
    else:
        left = [len(d) == 2 and d[0][1] for d in map(csd, entries)]  # csd: lowest first
    terms = [a * e - c for e, c in zip(entries, left, strict=True) for a in (fin.lo, fin.hi)]
    lo, hi = _lane_range(cb, fin)
    assert signed_bits(lo, hi) == signed_bits(min(*terms, 0), max(*terms, 0))


def test_codebook_lanes_have_no_multiplier_and_refuse_three_digit_entries():
    rng = np.random.default_rng(3)
    fin = ActFormat(8, 4)
    cb = shift_add_codebook(rng, 3, 6, 5, zero=True)
    layer = Conv2d("c", 4, 6, 3, cb, ActFormat(8, 2), lane_weights(rng, cb, (6, 4, 3, 3)),
                   np.zeros(6, int), padding=1)  # fmt: skip
    assert rtlil.convert(MACUnit(layer, fin, 3, 2), emit_src=False).count("cell $mul") == 0
    bad = Codebook((-9, 0, 11, 64), 5)  # 11 = 8 + 2 + 1, -9 = -8 - 1 is fine
    w = np.array(bad.entries)[rng.integers(0, 4, (6, 4, 3, 3))]
    with pytest.raises(HwgenError) as e:
        MACUnit(replace(layer, weight_format=bad, weight=w), fin, 3, 2)
    assert str(e.value) == (
        "layer c: codebook entry 11 is not 0, ±2^k or ±2^j ± 2^k (it has 3 signed digits), "
        "which a shift-add lane cannot multiply by; use --engine unrolled for this layer or a "
        "codebook of such entries"
    )


# ---------------------------------------------------------------- binary planes (amq)


@pytest.mark.parametrize(
    ("planes", "bits", "cin", "cout", "pe", "simd", "signed", "rounding"),
    [
        (1, 8, 4, 4, 2, 2, True, "half_up"),
        (2, 8, 4, 6, 3, 4, False, "half_even"),
        (3, 16, 3, 4, 1, 3, True, "floor"),  # m at the 16-bit ends
        (4, 8, 4, 4, 4, 1, False, "half_up"),
        (2, 6, 8, 32, 2, 2, True, "half_up"),  # 576 ROM words: block RAM, latency 3
    ],
)
def test_plane_lanes_with_stalls(planes, bits, cin, cout, pe, simd, signed, rounding):
    """M binary planes per channel (random sign codes, m at its min, max, 0 and 1), their
    plane sums combined by the channel's scales after the array == golden, with all-max and
    all-min activations on the edges of the image."""
    rng = np.random.default_rng(planes * 100 + cout)
    fmt = plane_format(rng, cout, planes, bits, frac=bits - 2)
    fin = ActFormat(7, 3, signed=signed)
    w = plane_weights(rng, fmt, (cout, cin, 3, 3))
    out = ActFormat(8, fin.frac + fmt.frac - bits + 1, rounding=rounding)
    bias = rng.integers(-3000, 3000, cout)
    layer = Conv2d("c", cin, cout, 3, fmt, out, w, bias, padding=1, relu=not signed)
    x = rng.integers(fin.lo, fin.hi, size=(cin, 4, 3), endpoint=True)
    x[:, 0], x[:, -1] = fin.hi, fin.lo
    assert len(np.unique(layer_forward(layer, x[None], fin))) > 4
    dut = MACUnit(layer, fin, pe, simd)
    assert dut.rom_stages == rom_latency("block" if cout == 32 else "logic") - 1
    check_conv(layer, fin, x, pe, simd, stall_in=0.3, stall_out=0.3, seed=planes)


@pytest.mark.parametrize("planes", [1, 4])
@pytest.mark.parametrize("top", [True, False])
def test_planes_at_their_bound(planes, top):
    """All-max activations against all +1 planes at the largest scale, and all-min ones at
    the smallest: the plane sums reach plane_range's ends, the accumulator acc_range's, and
    the output shows it unshifted."""
    fin = ActFormat(5, 0)
    m = (1 << 15) - 1 if top else -(1 << 15)
    fmt = Planes(((m,) * planes,) * 2, 0)
    w = np.full((2, 2, 1, 1), m * planes)  # every sign +1
    layer = Conv2d("c", 2, 2, 1, fmt, ActFormat(24, 0), w, np.array([5, -5]))
    x = np.full((2, 1, 2), fin.hi if top else fin.lo)
    lo, hi = plane_range(layer, fin)
    assert (lo == 2 * fin.lo).all() and (hi == 2 * fin.hi).all()
    acc = conv2d_acc(x[None], layer, fin)[0, :, 0, 0]
    assert acc.tolist() == acc_range(layer, fin)[1].tolist()
    assert acc_bits(layer, fin) <= 24
    check_conv(layer, fin, x, pe=2, simd=2, stall_in=0.3, stall_out=0.3)
    check_conv(layer, fin, x, pe=1, simd=1)


def test_a_plane_result_per_cycle():
    """The planes' two combine stages have their output FIFO words: a result per beat
    (1x1 kernel, SIMD = Cin) still flows, with a scale after them too."""
    rng = np.random.default_rng(4)
    fin = ActFormat(8, 4)
    fmt = plane_format(rng, 4, 3, 8, 6)
    w = plane_weights(rng, fmt, (4, 8, 1, 1))
    layer = Conv2d("c", 8, 4, 1, fmt, ActFormat(12, 4), w, rng.integers(-99, 99, 4))
    scaled = with_scale(layer, fin, Fixed(12, 8), rng)
    x = rng.integers(fin.lo, fin.hi, size=(8, 5, 6), endpoint=True)
    binary = replace(layer, weight_format=Pow2(1, 0), weight=np.sign(w) | 1)
    base = MACUnit(binary, fin, 2, 8).out_depth
    assert MACUnit(layer, fin, 2, 8).out_depth == base + 2
    assert MACUnit(scaled, fin, 2, 8).out_depth == base + 3
    for lyr, extra in ((layer, 2), (scaled, 3)):
        cycles = check_conv(lyr, fin, x, pe=2, simd=8)
        assert 60 <= cycles <= 60 + 6 + tree_stages(8) + extra + rom_latency("logic") - 1


def test_plane_lanes_have_no_multiplier():
    """The array's plane lanes add or subtract: no $mul; the MAC unit has M multipliers per
    PE (the plane scales, once per output), and one more per PE with a scale."""
    rng = np.random.default_rng(6)
    fin = ActFormat(8, 4)
    fmt = plane_format(rng, 6, 3, 8, 6)
    w = plane_weights(rng, fmt, (6, 4, 3, 3))
    layer = Conv2d("c", 4, 6, 3, fmt, ActFormat(8, 2), w, np.zeros(6, int), padding=1)
    array = MACArray(fmt, fin, 3, 2, 20, np.zeros((2, 9), int))
    assert rtlil.convert(array, emit_src=False).count("cell $mul") == 0
    scaled = with_scale(layer, fin, Fixed(10, 6), rng)
    for lyr, pe, muls in ((layer, 3, 9), (layer, 1, 3), (scaled, 2, 8)):
        text = rtlil.convert(MACUnit(lyr, fin, pe, 2), emit_src=False)
        assert text.count("cell $mul") == muls


def test_plane_range_from_the_codes():
    """A +1 sign adds ``[lo, hi]`` to a plane sum, a -1 ``[-hi, -lo]``: from the codes the
    ROM holds (the lowest of equal sums)."""
    fmt = Planes(((3, 1), (2, 2)), 0)
    w = np.array([[4, 2, -4], [0, 4, -4]])  # codes 0, 2, 3 / 1 (lowest of 1, 2), 0, 3
    layer = Linear("fc", 3, 2, fmt, ActFormat(8, 0), w, np.zeros(2, int))
    lo, hi = plane_range(layer, ActFormat(4, 0, signed=False))
    # negative signs per (channel, plane): (1, 2), (2, 1)
    assert lo.tolist() == [[-15, -30], [-30, -15]]
    assert hi.tolist() == [[30, 15], [15, 30]]


def test_planes_skip_zero_blocks_exactly():
    """A zero weight of planes whose scales cancel (``m_0 = ±m_1``) has nonzero signs, but a
    skipped zero block drops ``Σ_i m_i·b_i·a = 0`` from the combination: still == golden."""
    rng = np.random.default_rng(12)
    fin = ActFormat(6, 2)
    fmt = Planes(((3, 3), (5, -5), (7, 7), (2, -2)), 4)
    # signs all + or all -: channel 0's weights are ±6, channel 1's all 5 - 5 = 0
    w = plane_weights(rng, fmt, (4, 4, 3, 3), "extremes")
    w[:2, :2, 0, :] = 0  # fold 0's first channel group at kh = 0: a zero block in both PEs
    w[2:] = 0  # fold 1 all zeros: one beat of plane sums that cancel
    layer = Conv2d("c", 4, 4, 3, fmt, ActFormat(8, 3), w, rng.integers(-50, 50, 4), padding=1)
    dut = MACUnit(layer, fin, 2, 2)
    assert dut.depth == 18 - 3 + 1 < 36
    x = rng.integers(fin.lo, fin.hi, size=(4, 3, 4), endpoint=True)
    check_conv(layer, fin, x, pe=2, simd=2, stall_in=0.3, stall_out=0.3, seed=12)
