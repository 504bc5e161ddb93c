"""Pool (max, average, global average) and ReLU engines against hwgen.golden.layer_forward."""

import numpy as np
import pytest
from amaranth import signed, unsigned

from hwgen.errors import HwgenError
from hwgen.golden import layer_forward
from hwgen.hw.pool import AvgPool, GlobalAvgPoolEngine, MaxPool, ReLUEngine
from hwgen.hw.streams import run_stream
from hwgen.ir import ROUNDINGS, ActFormat, AvgPool2d, GlobalAvgPool, MaxPool2d, ReLU


def run_engine(dut, x, lanes, out_shape, stall_in=0.0, stall_out=0.0, seed=0):
    """Images (N, C, H, W) through ``dut`` in H,W,C beats; the output as (N, *out_shape)."""
    beats = [b.tolist() for b in x.transpose(0, 2, 3, 1).reshape(-1, lanes)]
    c, h, w = out_shape
    got, _ = run_stream(dut, beats, len(x) * c * h * w // lanes, stall_in, stall_out, seed)
    return np.array(got).reshape(len(x), h, w, c).transpose(0, 3, 1, 2)


def _images(rng, fmt, n, c, h, w, mode):
    if mode == "extremes":
        return np.where(rng.random((n, c, h, w)) < 0.5, fmt.lo, fmt.hi)
    return rng.integers(fmt.lo, fmt.hi, size=(n, c, h, w), endpoint=True)


POOLS = {
    # layer, fmt, (c, h, w), lanes
    "max2": (MaxPool2d("p", 2), ActFormat(8, 2), (4, 4, 6), 2),
    "max3_s2_odd": (MaxPool2d("p", 3, 2), ActFormat(5, 0), (3, 7, 5), 3),
    "max_nonsquare_unsigned": (
        MaxPool2d("p", (1, 2), (2, 1)),
        ActFormat(6, 0, False),
        (2, 5, 4),
        1,
    ),
    "avg2": (AvgPool2d("p", 2), ActFormat(8, 2), (4, 4, 6), 4),
    "avg4x2_unsigned": (AvgPool2d("p", (4, 2), (2, 2)), ActFormat(7, 1, False), (2, 6, 4), 1),
    "avg_1x1": (AvgPool2d("p", 1), ActFormat(4, 0), (2, 2, 3), 2),
    "avg2x1_signed_odd_sums": (AvgPool2d("p", (2, 1), (1, 3)), ActFormat(3, 0), (6, 3, 7), 2),
    "avg2_even": (AvgPool2d("p", 2), ActFormat(8, 2, rounding="half_even"), (4, 4, 6), 2),
    "avg2x1_odd_sums_even": (
        AvgPool2d("p", (2, 1), (1, 3)),
        ActFormat(3, 0, rounding="half_even"),
        (6, 3, 7),
        3,
    ),
    "avg4x2_unsigned_floor": (
        AvgPool2d("p", (4, 2), (2, 2)),
        ActFormat(7, 1, False, "floor"),
        (2, 6, 4),
        2,
    ),
    "avg2x1_odd_sums_floor": (
        AvgPool2d("p", (2, 1), (1, 3)),
        ActFormat(3, 0, rounding="floor"),
        (6, 3, 7),
        2,
    ),
}


@pytest.mark.parametrize("case", POOLS.values(), ids=POOLS.keys())
@pytest.mark.parametrize("mode", ["random", "extremes"])
@pytest.mark.parametrize("stalls", [(0.0, 0.0), (0.3, 0.4)], ids=["free", "stalls"])
def test_pool_matches_golden(case, mode, stalls):
    layer, fmt, (c, h, w), lanes = case
    rng = np.random.default_rng(c * h * w)
    x = _images(rng, fmt, 2, c, h, w, mode)
    expected = layer_forward(layer, x, fmt)
    shape = signed(fmt.bits) if fmt.signed else unsigned(fmt.bits)
    params = dict(channels=c, height=h, width=w, kernel=layer.kernel, stride=layer.stride)
    if isinstance(layer, MaxPool2d):
        dut = MaxPool(**params, lanes=lanes, shape=shape)
    else:
        dut = AvgPool(**params, lanes=lanes, shape=shape, rounding=fmt.rounding)
    got = run_engine(dut, x, lanes, expected.shape[1:], *stalls, seed=len(layer.kernel))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_avg_pool_ties_in_every_rounding(rounding):
    """Sums -7, -5, ..., 7 over area 2 (-3.5 ... 3.5): every tie of both signs."""
    fmt = ActFormat(4, 0, rounding=rounding)
    x = np.array([[k, k + 1] for k in range(-4, 4)]).reshape(1, 8, 1, 2)
    dut = AvgPool(
        channels=8, height=1, width=2, kernel=(1, 2), stride=(1, 1), lanes=8, shape=signed(4),
        rounding=rounding,
    )  # fmt: skip
    got = run_engine(dut, x, 8, (8, 1, 1))
    assert np.array_equal(got, layer_forward(AvgPool2d("p", (1, 2), 1), x, fmt))


def test_avg_pool_rounds_half_up():
    """Sums -3, -2, -1, 1 over area 2 (…-1.5, -1, -0.5, 0.5): rhu gives -1, -1, 0, 1."""
    fmt = ActFormat(4, 0)
    x = np.array([[-2, -1], [-1, -1], [-1, 0], [0, 1]]).reshape(1, 4, 1, 2)
    dut = AvgPool(
        channels=4, height=1, width=2, kernel=(1, 2), stride=(1, 1), lanes=4, shape=signed(4)
    )
    got = run_engine(dut, x, 4, (4, 1, 1))
    assert got.ravel().tolist() == [-1, -1, 0, 1]
    assert np.array_equal(got, layer_forward(AvgPool2d("p", (1, 2), 1), x, fmt))


@pytest.mark.parametrize("fmt", [ActFormat(6, 0), ActFormat(5, 0, False)])
def test_relu_matches_golden(fmt):
    rng = np.random.default_rng(fmt.bits)
    x = _images(rng, fmt, 2, 4, 3, 2, "random")
    dut = ReLUEngine(shape=signed(fmt.bits) if fmt.signed else unsigned(fmt.bits), lanes=2)
    got = run_engine(dut, x, 2, (4, 3, 2), 0.4, 0.4, seed=fmt.bits)
    assert np.array_equal(got, layer_forward(ReLU("r"), x, fmt))


def test_relu_streams_one_beat_per_cycle():
    beats = [[k - 8] for k in range(16)]
    got, cycles = run_stream(ReLUEngine(shape=signed(5), lanes=1), beats, 16)
    assert got == [[max(k - 8, 0)] for k in range(16)]
    assert cycles == 17


def test_pool_rejects_bad_parameters():
    params = dict(channels=4, height=4, width=4, stride=(2, 2), lanes=2, shape=signed(8))
    with pytest.raises(HwgenError, match=r"average pool: window area 3 \(3x1\) is not a power"):
        AvgPool(kernel=(3, 1), **params)
    with pytest.raises(HwgenError, match=r"average pool: rounding must be one of .*, not 'up'"):
        AvgPool(kernel=(2, 2), rounding="up", **params)
    with pytest.raises(HwgenError, match="lanes 3 must divide channels 4"):
        MaxPool(kernel=(2, 2), **{**params, "lanes": 3})
    with pytest.raises(HwgenError, match="ReLU engine: lanes must be a positive integer, not 0"):
        ReLUEngine(shape=signed(8), lanes=0)


GLOBALS = {
    # fmt, (c, h, w), lanes
    "resnet_8x8": (ActFormat(8, 2), (4, 8, 8), 2),
    "unsigned_4x2": (ActFormat(5, 0, False), (3, 4, 2), 1),
    "ties_2x1": (ActFormat(3, 0), (6, 2, 1), 3),
    "one_pixel": (ActFormat(4, 0), (2, 1, 1), 2),
    "ties_2x1_even": (ActFormat(3, 0, rounding="half_even"), (6, 2, 1), 3),
    "resnet_8x8_even": (ActFormat(8, 2, rounding="half_even"), (4, 8, 8), 4),
    "ties_4x1_floor": (ActFormat(3, 0, rounding="floor"), (6, 4, 1), 2),
    "unsigned_4x2_floor": (ActFormat(5, 0, False, "floor"), (3, 4, 2), 3),
}


@pytest.mark.parametrize("case", GLOBALS.values(), ids=GLOBALS.keys())
@pytest.mark.parametrize("mode", ["random", "extremes"])
@pytest.mark.parametrize("stalls", [(0.0, 0.0), (0.3, 0.4)], ids=["free", "stalls"])
def test_global_avg_pool_matches_golden(case, mode, stalls):
    fmt, (c, h, w), lanes = case
    x = _images(np.random.default_rng(c * h * w), fmt, 3, c, h, w, mode)
    shape = signed(fmt.bits) if fmt.signed else unsigned(fmt.bits)
    dut = GlobalAvgPoolEngine(
        channels=c, height=h, width=w, lanes=lanes, shape=shape, rounding=fmt.rounding
    )
    got = run_engine(dut, x, lanes, (c, 1, 1), *stalls, seed=c)
    assert np.array_equal(got, layer_forward(GlobalAvgPool("g"), x, fmt))


def test_global_avg_pool_rejects_bad_lanes():
    with pytest.raises(HwgenError, match="global pool: lanes must divide channels 6, not 4"):
        GlobalAvgPoolEngine(channels=6, height=2, width=2, lanes=4, shape=signed(8))


@pytest.mark.parametrize("lanes", [1, 2, 4], ids=["4_groups", "2_groups", "1_group"])
def test_global_avg_pool_takes_a_beat_per_cycle(lanes):
    # Back to back, even one group (each beat reads the sum the previous beat just wrote).
    fmt = ActFormat(6, 0)
    x = np.random.default_rng(lanes).integers(fmt.lo, fmt.hi, size=(4, 4, 2, 2), endpoint=True)
    dut = GlobalAvgPoolEngine(channels=4, height=2, width=2, lanes=lanes, shape=signed(6))
    beats = [b.tolist() for b in x.transpose(0, 2, 3, 1).reshape(-1, lanes)]
    times = []
    got, _ = run_stream(dut, beats, 4 * 4 // lanes, times=times)
    per_image = 4 * 4 // lanes  # input beats per image
    # Image n's outputs leave in a row, a fixed latency after its last input beats: the
    # input takes one beat per cycle.
    assert times == [
        per_image * (n + 1) - 4 // lanes + k + 3 for n in range(4) for k in range(4 // lanes)
    ]
    got = np.array(got).reshape(4, 1, 1, 4).transpose(0, 3, 1, 2)
    assert np.array_equal(got, layer_forward(GlobalAvgPool("g"), x, fmt))
