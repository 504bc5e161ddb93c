"""Add, subsample-pad and fork engines against the golden model under random stalls."""

import numpy as np
import pytest
from amaranth import signed
from amaranth.lib import data

from hwgen.errors import HwgenError
from hwgen.golden import add_forward, subsample_pad
from hwgen.hw.residual import AddEngine, Fork, SubsamplePadEngine
from hwgen.hw.streams import run_stream, run_streams
from hwgen.ir import ROUNDINGS, ActFormat, Add, SubsamplePad

STALLS = pytest.mark.parametrize(
    "stalls", [(0.0, 0.0), (0.3, 0.4), (0.6, 0.2)], ids=["free", "stalls", "slow-in"]
)


def _beats(x: np.ndarray, lanes: int) -> list[list[int]]:
    """Images (N, C, H, W) as H,W,C beats of ``lanes`` values."""
    return [b.tolist() for b in x.transpose(0, 2, 3, 1).reshape(-1, lanes)]


def _images(got: list[list[int]], n: int, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    return np.array(got).reshape(n, h, w, c).transpose(0, 3, 1, 2)


ADDS = {
    # fa, fb, out, relu
    "same_format": (ActFormat(8, 3), ActFormat(8, 3), ActFormat(8, 3), False),
    "saturates_both_ways": (ActFormat(8, 2), ActFormat(8, 2), ActFormat(6, 2), False),
    "round_half_ties": (ActFormat(6, 4), ActFormat(6, 2), ActFormat(8, 1), False),
    "very_different_fracs": (ActFormat(5, -3), ActFormat(9, 12), ActFormat(8, 2), False),
    "unsigned_plus_signed_relu": (ActFormat(7, 1, False), ActFormat(8, 3), ActFormat(8, 3), True),
    "left_shift_out": (ActFormat(4, 0), ActFormat(4, 1), ActFormat(10, 4, False), True),
    "relu_unsigned_out": (ActFormat(8, 2), ActFormat(8, 2), ActFormat(4, 1, False), True),
    "half_even_ties": (
        ActFormat(6, 4),
        ActFormat(6, 2),
        ActFormat(8, 1, rounding="half_even"),
        False,
    ),
    "floor_saturates": (ActFormat(8, 2), ActFormat(8, 3), ActFormat(5, 1, rounding="floor"), False),
    "floor_relu_unsigned": (
        ActFormat(8, 2),
        ActFormat(7, 0),
        ActFormat(4, 1, False, "floor"),
        True,
    ),
}


def _add_inputs(rng, fa, fb, n, shape):
    a = rng.integers(fa.lo, fa.hi, size=(n, *shape), endpoint=True)
    b = rng.integers(fb.lo, fb.hi, size=(n, *shape), endpoint=True)
    # Extremes: both max (saturates high), both min (low), and max against min.
    a[0], b[0], a[1], b[1] = fa.hi, fb.hi, fa.lo, fb.lo
    a[2, 0], b[2, 0] = fa.hi, fb.lo
    return a, b


@pytest.mark.parametrize("case", ADDS.values(), ids=ADDS.keys())
@STALLS
def test_add_engine_matches_golden(case, stalls):
    fa, fb, fo, relu = case
    shape, lanes = (4, 3, 5), 2
    rng = np.random.default_rng(len(str(case)))
    a, b = _add_inputs(rng, fa, fb, 4, shape)
    layer = Add("add", fo, ("x", "y"), relu)
    expected = add_forward(a, b, fa, fb, layer)
    dut = AddEngine(fmt_a=fa, fmt_b=fb, out_format=fo, relu=relu, lanes=lanes)
    n_out = a.size // lanes
    got, _ = run_streams(
        dut, {"a": _beats(a, lanes), "b": _beats(b, lanes)}, {"o": n_out}, *stalls, seed=3
    )
    assert np.array_equal(_images(got["o"], 4, shape), expected)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_add_engine_exhaustive_small_formats(rounding):
    # Every pair of values of two 4-bit formats: all ties, every saturation.
    fa, fb, fo = ActFormat(4, 1), ActFormat(4, 3), ActFormat(3, 1, rounding=rounding)
    av, bv = np.meshgrid(np.arange(fa.lo, fa.hi + 1), np.arange(fb.lo, fb.hi + 1))
    a, b = av.reshape(1, -1, 1, 1), bv.reshape(1, -1, 1, 1)
    expected = add_forward(a, b, fa, fb, Add("add", fo, ("x", "y")))
    dut = AddEngine(fmt_a=fa, fmt_b=fb, out_format=fo, relu=False, lanes=4)
    got, cycles = run_streams(dut, {"a": _beats(a, 4), "b": _beats(b, 4)}, {"o": 64})
    assert np.array_equal(_images(got["o"], 1, (256, 1, 1)), expected)
    assert cycles <= 64 + 2  # one beat per cycle when nothing stalls


SUBSAMPLES = {
    # stride, pad, (c, h, w), lanes
    "resnet_option_a": ((2, 2), (2, 2), (4, 6, 6), 2),
    "odd_size": ((2, 2), (1, 2), (3, 5, 7), 1),
    "stride3x1_no_pad": ((3, 1), (0, 0), (2, 7, 3), 2),
    "pad_after_only": ((1, 2), (0, 4), (4, 2, 5), 4),
    "identity": ((1, 1), (0, 0), (2, 2, 2), 1),
}


@pytest.mark.parametrize("case", SUBSAMPLES.values(), ids=SUBSAMPLES.keys())
@STALLS
def test_subsample_pad_matches_golden(case, stalls):
    stride, pad, shape, lanes = case
    c, h, w = shape
    x = np.random.default_rng(c * h * w).integers(-128, 128, size=(3, *shape))
    layer = SubsamplePad("sc", stride, pad)
    expected = subsample_pad(x, layer)
    dut = SubsamplePadEngine(
        channels=c, height=h, width=w, stride=stride, pad=pad, lanes=lanes, shape=signed(8)
    )
    got, cycles = run_stream(dut, _beats(x, lanes), expected.size // lanes, *stalls, seed=1)
    assert np.array_equal(_images(got, 3, expected.shape[1:]), expected)
    if stalls == (0.0, 0.0):  # a cheap engine: one beat in or out per cycle
        assert cycles <= x.size // lanes + expected.size // lanes + 2


def test_subsample_pad_rejects_bad_lanes():
    with pytest.raises(HwgenError, match="lanes 2 must divide zero channels before 1"):
        SubsamplePadEngine(
            channels=4, height=2, width=2, stride=(2, 2), pad=(1, 1), lanes=2, shape=signed(8)
        )


@pytest.mark.parametrize("n", [1, 2, 3])
@STALLS
def test_fork_delivers_every_beat_to_each_consumer(n, stalls):
    rng = np.random.default_rng(n)
    beats = rng.integers(-128, 128, size=(50, 2)).tolist()
    dut = Fork(data.ArrayLayout(signed(8), 2), n)
    got, cycles = run_streams(
        dut, {"i": beats}, {f"o{k}": len(beats) for k in range(n)}, *stalls, seed=n
    )
    for k in range(n):
        assert got[f"o{k}"] == beats
    if stalls == (0.0, 0.0):
        assert cycles == len(beats) + 1  # the slices' register, then one beat a cycle


def test_fork_under_heavy_backpressure():
    # Consumers mostly refuse, independently: each waiting beat must be held (run_streams
    # checks the rules) and each consumer must get every beat once.
    beats = list(range(40))
    got, _ = run_streams(Fork(signed(8), 2), {"i": beats}, {"o0": 40, "o1": 40}, 0.0, 0.8)
    assert got == {"o0": beats, "o1": beats}
