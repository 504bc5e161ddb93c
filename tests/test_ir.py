"""The IR: format semantics, accumulator bounds, constructor errors naming layer and value."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import example_network, residual_network

from hwgen.errors import HwgenError
from hwgen.ir import (
    ACC_BITS_MAX,
    INPUT,
    ROUNDINGS,
    ActFormat,
    Add,
    AvgPool2d,
    Codebook,
    Conv2d,
    Fixed,
    Flatten,
    GlobalAvgPool,
    Linear,
    MaxPool2d,
    Network,
    Planes,
    Pow2,
    ReLU,
    SubsamplePad,
    acc_bits,
    acc_frac,
    acc_range,
    add_range,
    requant_bits,
    requant_frac,
    requant_range,
    signed_bits,
)

# ---------------------------------------------------------------- formats


def test_act_format_ranges():
    assert (ActFormat(8, 3).lo, ActFormat(8, 3).hi) == (-128, 127)
    assert (ActFormat(8, 3, signed=False).lo, ActFormat(8, 3, signed=False).hi) == (0, 255)
    assert (ActFormat(1, 0, signed=False).lo, ActFormat(1, 0, signed=False).hi) == (0, 1)
    assert str(ActFormat(8, -2)) == "s8.f-2" and str(ActFormat(4, 1, False)) == "u4.f1"


def test_act_format_rounding():
    assert ActFormat(8, 4).rounding == "half_up" and ROUNDINGS == ("half_up", "half_even", "floor")
    assert str(ActFormat(8, 4, rounding="half_up")) == "s8.f4"
    assert str(ActFormat(8, 4, rounding="half_even")) == "s8.f4.even"
    assert str(ActFormat(8, -1, False, "floor")) == "u8.f-1.floor"
    assert ActFormat(8, 4, rounding="floor") != ActFormat(8, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 0), r"activation bits must be an integer in \[2, 24\], not 1"),
        ((0, 0, False), r"activation bits must be an integer in \[1, 24\], not 0"),
        ((25, 0), r"not 25"),
        ((8, 33), r"activation frac must be an integer in \[-32, 32\], not 33"),
        ((8, -33), r"not -33"),
        ((8.0, 0), r"not 8.0"),
        ((True, 0), r"not True"),
        ((8, 0, True, "even"), r"rounding must be one of half_up, half_even, floor, not 'even'"),
        ((8, 0, True, None), r"rounding must be one of .*, not None"),
    ],
)
def test_act_format_errors(args, message):
    with pytest.raises(HwgenError, match=message):
        ActFormat(*args)


def test_fixed_range_and_grid():
    f = Fixed(4, 2)
    assert (f.lo, f.hi, f.frac) == (-8, 7, 2)
    assert f.on_grid(np.arange(-10, 10)).tolist() == [v in range(-8, 8) for v in range(-10, 10)]
    with pytest.raises(
        HwgenError, match=r"Fixed weight bits must be an integer in \[2, 16\], not 1"
    ):
        Fixed(1, 0)
    with pytest.raises(HwgenError, match=r"Fixed weight frac .*\[-64, 64\], not 65"):
        Fixed(8, 65)


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize("emax", [-3, 0, 5])
def test_pow2_levels(bits, emax):
    """emin = emax + 1 - 2**(bits-2) (bits >= 3), else emax; integers ±2**(e - emin) and 0."""
    f = Pow2(bits, emax)
    emin = emax + 1 - 2 ** (bits - 2) if bits >= 3 else emax
    assert (f.emin, f.frac, f.max_shift) == (emin, -emin, emax - emin)
    ints = {s * 2 ** (e - emin) for e in range(emin, emax + 1) for s in (-1, 1)}
    if bits >= 2:
        ints.add(0)
    # 2**(bits-2) magnitudes per sign plus zero (bits >= 3): the code fills its bits but one.
    assert len(ints) == {1: 2, 2: 3}.get(bits, 2 ** (bits - 1) + 1)
    near = {v + d for v in ints for d in (-1, 1)} | {2 * f.hi, -2 * f.hi} | set(range(-20, 21))
    candidates = np.array(sorted(ints | near))
    assert set(candidates[f.on_grid(candidates)].tolist()) == ints
    assert (f.lo, f.hi) == (-(2**f.max_shift), 2**f.max_shift)
    # Real values: integer * 2**-frac are exactly the levels of DESIGN §2.
    assert {v * 2.0**-f.frac for v in ints} - {0.0} == {
        s * 2.0**e for e in range(emin, emax + 1) for s in (-1, 1)
    }


def test_pow2_names_and_errors():
    assert str(Pow2(1, 0)) == "binary.emax0" and str(Pow2(2, 0)) == "ternary.emax0"
    assert str(Pow2(5, -2)) == "pow2_5.emax-2"
    with pytest.raises(HwgenError, match=r"Pow2 weight bits must be an integer in \[1, 7\], not 8"):
        Pow2(8, 0)
    with pytest.raises(HwgenError, match=r"Pow2\(7, emax=-40\) has weight frac 71, outside"):
        Pow2(7, -40)


# ---------------------------------------------------------------- layers


def _lin(weight, bias=None, wfmt=None, name="fc", **kw) -> Linear:
    weight = np.asarray(weight)
    bias = np.zeros(weight.shape[0], int) if bias is None else bias
    out, inp = weight.shape
    return Linear(name, inp, out, wfmt or Fixed(8, 0), ActFormat(8, 0), weight, bias, **kw)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _lin([[1, 2]], name="1x"), r"layer name must be an identifier .*, not '1x'"),
        (lambda: _lin([[1, 200]]), r"layer fc: weight\[0, 1\] = 200 is not in fixed8.f0"),
        (lambda: _lin([[1, 3]], wfmt=Pow2(3, 0)), r"layer fc: weight\[0, 1\] = 3 is not in pow2_3"),
        (lambda: _lin([[0, 1]], wfmt=Pow2(1, 0)), r"layer fc: weight\[0, 0\] = 0 is not in binary"),
        (
            lambda: _lin([[1.0, 2.0]]),
            "layer fc: weight must be an integer array, not dtype float64",
        ),
        (lambda: _lin([[1, 2]], bias=[0, 0]), r"layer fc: bias has shape \(2,\), expected \(1,\)"),
        (lambda: _lin([[1, 2]], bias=[0.5]), "layer fc: bias must be an integer array"),
        (
            lambda: _lin(np.array([[1, 2**64 - 1]], dtype=np.uint64)),
            "layer fc: weight holds 18446744073709551615, outside the int64 range",
        ),
        (
            lambda: Linear("fc", 2, 1, "s8", ActFormat(8, 0), [[1, 1]], [0]),
            "layer fc: weight_format must be Fixed, Pow2, Codebook or Planes",
        ),
        (
            lambda: Conv2d("c", 1, 1, 0, Fixed(4, 0), ActFormat(8, 0), [], [0]),
            r"layer c: kernel must be an integer in \[1, 65536\], not 0",
        ),
        (
            lambda: Conv2d("c", 1, 1, (3, 3, 3), Fixed(4, 0), ActFormat(8, 0), [], [0]),
            r"layer c: kernel must be an int or a pair of ints, not \(3, 3, 3\)",
        ),
        (
            lambda: Conv2d("c", 1, 1, 1, Fixed(4, 0), ActFormat(8, 0), [[[[1]]]], [0], padding=-1),
            r"layer c: padding must be an integer in \[0, 65536\], not -1",
        ),
        (lambda: MaxPool2d("p", 2, stride=0), r"layer p: stride .*, not 0"),
        (lambda: AvgPool2d("p", (2, 3)), r"layer p: average pool window area 6 \(2x3\) is not"),
        (lambda: ReLU("a-b"), "not 'a-b'"),
    ],
)
def test_layer_errors_name_layer_and_value(make, message):
    with pytest.raises(HwgenError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_layers_are_frozen_and_weights_read_only():
    layer = _lin([[1, 2]])
    assert layer.weight.dtype == np.int64
    with pytest.raises(AttributeError):
        layer.name = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        layer.weight[0, 0] = 3
    conv = Conv2d(
        "c", 1, 2, 3, Pow2(2, 0), ActFormat(4, 0), np.zeros((2, 1, 3, 3), np.int8), [1, 2]
    )
    assert conv.kernel == (3, 3) and conv.stride == (1, 1) and conv.padding == (0, 0)
    assert conv.weight.dtype == np.int64 and conv.fan_in == 9
    assert MaxPool2d("p", 3).stride == (3, 3) and MaxPool2d("p", 3, 1).stride == (1, 1)


# ---------------------------------------------------------------- accumulators


@pytest.mark.parametrize(("lo", "hi"), [(-5, 5), (-8, 7), (-128, 0), (0, 255), (0, 0), (-1, 0)])
def test_signed_bits_is_the_narrowest_width(lo, hi):
    bits = signed_bits(lo, hi)
    assert -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1
    if bits > 1:
        assert lo < -(2 ** (bits - 2)) or hi > 2 ** (bits - 2) - 1


def test_acc_range_is_reached_by_brute_force():
    """The bounds are the true min/max of bias + Σ a w over every input in range."""
    fmt = ActFormat(3, 0)
    weight = np.array([[3, -2, 0], [-1, -1, 2]])
    layer = _lin(weight, bias=np.array([5, -7]))
    sums = [weight @ np.array(a) + layer.bias for a in itertools.product(range(-4, 4), repeat=3)]
    lo, hi = acc_range(layer, fmt)
    assert lo.tolist() == np.min(sums, axis=0).tolist()
    assert hi.tolist() == np.max(sums, axis=0).tolist()
    assert acc_bits(layer, fmt) == signed_bits(min(lo), max(hi))
    assert (
        acc_frac(layer, ActFormat(3, 2)) == 2 and acc_frac(_lin(weight, wfmt=Fixed(4, 3)), fmt) == 3
    )


def test_acc_range_exact_past_int64():
    """Worst cases past 2**62 are computed on Python integers, not wrapped."""
    w = np.full((1, 4), 2**31)
    layer = _lin(w, bias=np.array([2**62]), wfmt=Pow2(7, 0))
    lo, hi = acc_range(layer, ActFormat(24, 0))
    assert int(hi[0]) == 2**62 + 4 * 2**31 * (2**23 - 1)
    assert int(lo[0]) == 2**62 - 4 * 2**31 * 2**23


def test_network_rejects_accumulators_wider_than_the_limit():
    layer = _lin(np.full((1, 1), 1), bias=np.array([2**61 - 128]))
    Network((1,), ActFormat(8, 0), (layer,))  # hi = 2**61 - 1: 62 bits, allowed
    layer = _lin(np.full((1, 1), 1), bias=np.array([-(2**61) + 128]))
    Network((1,), ActFormat(8, 0), (layer,))  # lo = -2**61: 62 bits, allowed
    for bias in (2**61, -(2**61) + 127, -(2**63)):
        layer = _lin(np.array([[1], [1]]), bias=np.array([bias, 0]))
        with pytest.raises(
            HwgenError, match=rf"layer fc: accumulator needs \d+ bits \(max {ACC_BITS_MAX}\)"
        ):
            Network((1,), ActFormat(8, 0), (layer,))


# ---------------------------------------------------------------- codebook weights


def test_codebook_entries_bits_grid_and_name():
    cb = Codebook([-96, -8, 0, 3, np.int64(12)], 5)
    assert cb.entries == (-96, -8, 0, 3, 12) and all(type(e) is int for e in cb.entries)
    assert (cb.bits, cb.lo, cb.hi, cb.frac) == (3, -96, 12, 5)
    assert [Codebook(tuple(range(n)), 0).bits for n in (2, 3, 4, 5, 8, 9, 256)] == [
        1, 2, 2, 3, 3, 4, 8,
    ]  # fmt: skip
    w = np.array([[-96, -7], [0, 12]])
    assert cb.on_grid(w).tolist() == [[True, False], [True, True]]
    assert cb.indices(np.array([[-96, 3], [0, 12]])).tolist() == [[0, 3], [2, 4]]
    assert str(cb) == "codebook5[-96,-8,0,3,12].f5"
    assert str(Codebook(tuple(range(-10, 10)), -2)) == "codebook20[-10,-9,-8,...,7,8,9].f-2"
    assert cb == Codebook((-96, -8, 0, 3, 12), 5) != Codebook((-96, -8, 0, 3, 12), 4)
    big = Codebook((-(2**31) + 1, 2**31 - 1), 64)
    assert big.bits == 1 and big.on_grid(np.array([2**31 - 1])).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((3,), 0), r"codebook entries must be 2 to 256 integers, not \(3,\)"),
        ((tuple(range(257)), 0), "codebook entries must be 2 to 256 integers"),
        (((0, 1.5), 0), r"codebook entries must be 2 to 256 integers, not \(0, 1.5\)"),
        (((0, True), 0), "codebook entries must be 2 to 256 integers"),
        ((7, 0), "codebook entries must be 2 to 256 integers, not 7"),
        (((1, 1), 0), r"codebook entries must be distinct and increasing, not \[1, 1\]"),
        (((2, -1), 0), r"distinct and increasing, not \[2, -1\]"),
        (((0, 2**31), 0), r"codebook entry 2147483648 is outside \(-2\^31, 2\^31\)"),
        (((-(2**31), 0), 0), "codebook entry -2147483648 is outside"),
        (((0, 1), 65), r"codebook weight frac must be an integer in \[-64, 64\], not 65"),
    ],
)
def test_codebook_errors(args, message):
    with pytest.raises(HwgenError, match=message) as e:
        Codebook(*args)
    assert "\n" not in str(e.value)


def test_codebook_layer_holds_values_and_bounds_the_accumulator_by_them():
    cb = Codebook((-64, -3, 0, 33), 6)
    layer = _lin([[33, -64, 0], [-3, -3, 33]], wfmt=cb)
    fmt = ActFormat(4, 0, signed=False)
    prods = [layer.weight @ np.array(a) for a in itertools.product(range(16), repeat=3)]
    lo, hi = acc_range(layer, fmt)
    assert lo.tolist() == np.min(prods, axis=0).tolist() == [-960, -90]
    assert hi.tolist() == np.max(prods, axis=0).tolist() == [495, 495]
    assert acc_frac(layer, fmt) == 6
    with pytest.raises(HwgenError, match=r"layer fc: weight\[0, 2\] = 1 is not in codebook4"):
        _lin([[33, -64, 1]], wfmt=cb)


# ---------------------------------------------------------------- binary planes


def test_planes_values_bits_grid_and_name():
    fmt = Planes([(3, 1), [np.int64(2), -2]], 4)
    assert fmt.scales == ((3, 1), (2, -2)) and type(fmt.scales[1][0]) is int
    assert (fmt.planes, fmt.bits, fmt.channels, fmt.frac) == (2, 2, 2, 4)
    # code bit i is plane i's sign (1 = -1): codes 0..3 are ++, -+, +-, --
    assert fmt.values().tolist() == [[4, -2, 2, -4], [0, -4, 4, 0]]
    assert (fmt.lo, fmt.hi) == (-4, 4)
    w = np.array([[4, 0, -2], [0, 2, -4]])
    assert fmt.on_grid(w).tolist() == [[True, False, True], [True, False, True]]
    assert str(fmt) == "planes2[2x, m -2..3].f4"
    assert fmt == Planes(((3, 1), (2, -2)), 4) != Planes(((3, 1), (2, -2)), 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((), 0), r"plane scales must be one row of 1 to 8 integers per output channel"),
        ((((1, 2), (3,)), 0), r"all rows as long, not \(\(1, 2\), \(3,\)\)"),
        ((((1,) * 9,), 0), "one row of 1 to 8 integers"),
        ((((1, 0.5),), 0), "one row of 1 to 8 integers"),
        ((((1, True),), 0), "one row of 1 to 8 integers"),
        ((((1, 2**15),), 0), r"plane scale 32768 of channel 0 is outside \[-32768, 32767\]"),
        ((((1,),), 65), r"planes weight frac must be an integer in \[-64, 64\], not 65"),
    ],
)
def test_planes_errors(args, message):
    with pytest.raises(HwgenError, match=message) as e:
        Planes(*args)
    assert "\n" not in str(e.value)


def test_plane_layer_holds_sums_and_refuses_one_no_code_gives():
    fmt = Planes(((5, 2), (7, 7)), 0)
    layer = _lin([[7, -3, -7], [14, 0, -14]], wfmt=fmt)
    lo, hi = acc_range(layer, ActFormat(4, 0, signed=False))
    assert (lo.tolist(), hi.tolist()) == ([-150, -210], [105, 210])  # 15 * (7, -10, 14, -14)
    with pytest.raises(HwgenError) as e:
        _lin([[7, -3, 4], [14, 0, -14]], wfmt=fmt)
    assert str(e.value) == (
        "layer fc: weight[0, 2] = 4 is no signed sum of channel 0's plane scales [5, 2]"
    )
    with pytest.raises(HwgenError, match="layer fc: 2 rows of plane scales for 1 channels"):
        _lin([[7, -3, -7]], wfmt=fmt)


# ---------------------------------------------------------------- per-channel scale


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(scale=[1, 2]), "layer fc: scale given without scale_format"),
        (dict(scale_format=Fixed(4, 0)), "layer fc: scale_format given without scale"),
        (
            dict(scale=[1, 2], scale_format=Pow2(3, 0)),
            "layer fc: scale_format must be Fixed, not Pow2",
        ),
        (
            dict(scale=[1, 2, 3], scale_format=Fixed(4, 0)),
            r"layer fc: scale has shape \(3,\), expected \(2,\)",
        ),
        (
            dict(scale=[1.0, 2.0], scale_format=Fixed(4, 0)),
            "layer fc: scale must be an integer array, not dtype float64",
        ),
        (
            dict(scale=[7, 8], scale_format=Fixed(4, 2)),
            r"layer fc: scale\[1\] = 8 is not in fixed4.f2",
        ),
        (
            dict(scale=[-9, 0], scale_format=Fixed(4, 2)),
            r"layer fc: scale\[0\] = -9 is not in fixed4",
        ),
    ],
)
def test_scale_errors_name_layer_and_value(kw, message):
    with pytest.raises(HwgenError, match=message) as e:
        _lin([[1, 2], [3, 4]], **kw)
    assert "\n" not in str(e.value)


def test_scale_is_read_only_int64_and_compared():
    layer = _lin([[1, 2], [3, 4]], scale=np.array([-8, 7], np.int8), scale_format=Fixed(4, 1))
    assert layer.scale.dtype == np.int64 and layer.scale.tolist() == [-8, 7]
    with pytest.raises(ValueError, match="read-only"):
        layer.scale[0] = 1
    assert layer == _lin([[1, 2], [3, 4]], scale=[-8, 7], scale_format=Fixed(4, 1))
    assert layer != _lin([[1, 2], [3, 4]], scale=[-8, 6], scale_format=Fixed(4, 1))
    assert layer != _lin([[1, 2], [3, 4]], scale=[-8, 7], scale_format=Fixed(4, 2))
    assert layer != _lin([[1, 2], [3, 4]])
    plain = _lin([[1, 2], [3, 4]])
    assert plain.scale is None and plain.scale_format is None


def test_requant_range_is_reached_by_brute_force():
    """``acc_c * m_c`` over every input: negative, zero and positive scales."""
    fmt = ActFormat(3, 1)
    weight = np.array([[3, -2, 0], [-1, -1, 2], [1, 1, 1]])
    scale = np.array([-8, 0, 5])
    layer = _lin(weight, bias=np.array([5, -7, 1]), scale=scale, scale_format=Fixed(4, 3))
    prods = [
        (weight @ np.array(a) + layer.bias) * scale
        for a in itertools.product(range(-4, 4), repeat=3)
    ]
    lo, hi = requant_range(layer, fmt)
    assert lo.tolist() == np.min(prods, axis=0).tolist()
    assert hi.tolist() == np.max(prods, axis=0).tolist()
    assert requant_bits(layer, fmt) == signed_bits(min(lo), max(hi))
    assert requant_frac(layer, fmt) == acc_frac(layer, fmt) + 3 == 4
    plain = _lin(weight, bias=np.array([5, -7, 1]))
    assert requant_frac(plain, fmt) == acc_frac(plain, fmt)
    assert requant_bits(plain, fmt) == acc_bits(plain, fmt)
    assert [r.tolist() for r in requant_range(plain, fmt)] == [
        r.tolist() for r in acc_range(plain, fmt)
    ]


def test_network_rejects_a_scaled_accumulator_wider_than_the_limit():
    # acc in [-128, 127] + bias: 48 bits; times a 16-bit scale needs more than 62.
    bias = np.array([2**46])
    fits = _lin([[1]], bias=bias, scale=[2**14], scale_format=Fixed(16, 0))
    Network((1,), ActFormat(8, 0), (fits,))  # (2**46 + 127) * 2**14 < 2**61
    wide = _lin([[1]], bias=bias, scale=[-(2**15)], scale_format=Fixed(16, 0))
    with pytest.raises(
        HwgenError, match=rf"layer fc: accumulator times scale needs 63 bits \(max {ACC_BITS_MAX}\)"
    ):
        Network((1,), ActFormat(8, 0), (wide,))


# ---------------------------------------------------------------- network


def test_network_shapes_and_formats():
    net = example_network()
    assert list(net.shapes) == ["input", *net.names]
    assert tuple(net.shapes.values()) == (
        (1, 8, 8),
        (4, 8, 8),
        (4, 4, 4),
        (6, 2, 2),
        (6, 1, 1),
        (6, 1, 1),
        (6,),
        (12,),
        (10,),
    )
    assert [str(f) for f in net.formats.values()] == [
        "s8.f4",
        "u8.f1",
        "u8.f1",
        "s8.f-2",
        "s8.f-2",
        "s8.f-2",
        "s8.f-2",
        "u6.f-3",
        "s10.f-3",
    ]
    assert net.output_shape == (10,) and net.output_format == ActFormat(10, -3)
    assert net.names[0] == "conv1" and net.index("fc1") == 6
    assert net.layer("flat") == Flatten("flat", inputs=(net.names[net.index("flat") - 1],))
    with pytest.raises(HwgenError, match=r"no layer named 'x' \(layers: conv1, pool1, "):
        net.layer("x")
    assert net == example_network() and net != example_network(seed=1)


def _conv(name="c", cin=1, cout=2, k=3, **kw) -> Conv2d:
    return Conv2d(
        name,
        cin,
        cout,
        k,
        Fixed(4, 0),
        ActFormat(8, 0),
        np.zeros((cout, cin, k, k), int),
        np.zeros(cout, int),
        **kw,
    )


@pytest.mark.parametrize(
    ("shape", "layers", "message"),
    [
        ((1, 8, 8), (), "the network has no layers"),
        ((1, 8), (ReLU("r"),), r"network input shape must be \(C, H, W\) or \(F,\), not \(1, 8\)"),
        ((0, 8, 8), (ReLU("r"),), r"not \(0, 8, 8\)"),
        ((1, 8, 8), (ReLU("r"), ReLU("r")), "layer name 'r' is used twice"),
        ((2, 8, 8), (_conv(),), "layer c: in_channels is 1, input has 2"),
        ((1, 2, 8), (_conv(),), r"layer c: kernel 3x3 larger than padded input 2x8"),
        (
            (1, 8, 8),
            (_conv(), _lin([[1, 1]])),
            r"layer fc: needs a flat input \(add Flatten\), got shape \(2, 6, 6\)",
        ),
        ((1, 8, 8), (Flatten("f"), _lin([[1, 1]])), "layer fc: in_features is 2, input has 64"),
        ((8,), (MaxPool2d("p", 2),), r"layer p: needs a \(C, H, W\) feature map, got shape \(8,\)"),
        ((1, 8, 8), ("relu",), "unsupported layer type str"),
    ],
)
def test_network_errors(shape, layers, message):
    with pytest.raises(HwgenError, match=message):
        Network(shape, ActFormat(8, 0), layers)


def test_conv_output_shape_with_stride_and_padding():
    net = Network((1, 7, 9), ActFormat(8, 0), (_conv(k=3, stride=(2, 3), padding=(1, 0)),))
    assert net.output_shape == (2, 4, 3)  # (7+2-3)//2+1, (9-3)//3+1


# ---------------------------------------------------------------- graphs


def test_residual_network_shapes_formats_and_wiring():
    net = residual_network()
    assert not net.is_chain and example_network().is_chain
    assert net.layer("b1_add").inputs == ("b1_conv2", "stem")
    assert net.layer("b2_conv1").inputs == ("b1_add",)  # implicit: the layer before
    assert [lyr.name for lyr in net.consumers("b1_add")] == ["b2_conv1", "b2_short"]
    assert [lyr.name for lyr in net.consumers(INPUT)] == ["stem"]
    assert net.shapes["b2_short"] == (8, 4, 4) and net.shapes["pool"] == (8, 1, 1)
    assert net.formats["b2_short"] == net.formats["b1_add"]  # exact, same format
    assert net.formats["b2_add"] == ActFormat(8, 2, signed=False)
    assert net.in_format(net.layer("b1_add")) == net.formats["b1_conv2"]
    assert net.output == "fc" and net.output_shape == (10,)
    assert net == residual_network() and net != residual_network(seed=1)


@pytest.mark.parametrize(
    ("shape", "stride", "pad", "out"),
    [((16, 32, 32), 2, (8, 8), (32, 16, 16)), ((3, 5, 7), (2, 3), (0, 1), (4, 3, 3)),
     ((4, 4, 4), 1, (0, 0), (4, 4, 4))],
)  # fmt: skip
def test_subsample_pad_shape(shape, stride, pad, out):
    net = Network(shape, ActFormat(8, 0), (SubsamplePad("s", stride, pad),))
    assert net.output_shape == out


def test_add_range_aligns_to_the_finer_frac():
    # s8.f0 in [-128, 127] and u4.f3 in [0, 15]: F = 3, a << 3 in [-1024, 1016]
    assert add_range(ActFormat(8, 0), ActFormat(4, 3, signed=False)) == (-1024, 1016 + 15)


def _add(name="a", inputs=("c", "input"), **kw) -> Add:
    return Add(name, ActFormat(8, 0), inputs, **kw)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ((_conv(padding=1), _add(inputs=("c",))), r"layer a: takes 2 inputs, not \['c'\]"),
        ((_conv(padding=1), _add(inputs=("c", "x"))), "layer a: input 'x' is not the network"),
        ((_add(inputs=("input", "c")), _conv(padding=1)), "layer a: input 'c' is not the network"),
        ((_conv(inputs=("input", "input")),), r"layer c: takes 1 input, not \['input', 'input'\]"),
        ((_conv(), _add(inputs=("c", "input"))), r"a: adds inputs of different shapes \(2, 6, 6\)"),
        ((_conv("c1", padding=1), _conv("c2", inputs=("input",))), "layer c1: its output is never"),
        ((GlobalAvgPool("g", inputs=("input",)), ReLU("r")), None),
    ],
)  # fmt: skip
def test_graph_errors_name_the_layer(layers, message):
    if message is None:  # a well-formed graph, for contrast
        Network((1, 8, 8), ActFormat(8, 0), layers)
        return
    with pytest.raises(HwgenError, match=message):
        Network((1, 8, 8), ActFormat(8, 0), layers)


def test_global_avgpool_needs_a_power_of_two_area():
    with pytest.raises(HwgenError, match=r"layer g: global average pool over 3x4 = 12 values"):
        Network((2, 3, 4), ActFormat(8, 0), (GlobalAvgPool("g"),))


def _fine_conv(frac: int) -> Conv2d:
    w = np.zeros((1, 1, 1, 1), int)
    return Conv2d("c", 1, 1, 1, Fixed(4, 0), ActFormat(16, frac), w, np.zeros(1, int))


@pytest.mark.parametrize(("in_frac", "conv_frac", "bits"), [(-32, 32, 81), (-10, 32, 59)])
def test_add_whose_aligned_sum_is_too_wide_is_refused(in_frac, conv_frac, bits):
    """s16 at frac -32 aligned to frac 32 is shifted by 64: an 81-bit sum (max 62)."""
    layers = (_fine_conv(conv_frac), Add("a", ActFormat(8, 0), ("c", "input")))
    if bits <= 62:
        Network((1, 2, 2), ActFormat(16, in_frac), layers)
        return
    with pytest.raises(
        HwgenError, match=rf"layer a: aligning s16.f32 with s16.f{in_frac} needs {bits} bits"
    ):
        Network((1, 2, 2), ActFormat(16, in_frac), layers)
