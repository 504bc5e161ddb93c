"""Shared test helpers: Hypothesis profiles and strategies for formats, weights and activations.

Profiles: ``dev`` (the default: few examples, no deadline, so the default suite stays fast)
and ``ci-slow`` (many examples); pick one with the environment variable
``HYPOTHESIS_PROFILE=ci-slow``. A test that sets ``max_examples`` itself is not affected.

Integer arrays are drawn as a seed plus a *mode* and built with NumPy, which keeps large
tensors cheap; the modes put the extremes of a format (all-max, all-min, alternating)
next to uniform random values, since that is where saturation and overflow bugs live.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from hwgen.frontend.graph import FConv2d, FFlatten, FLinear, FloatNet, FMaxPool2d
from hwgen.ir import (
    ACT_FRAC_RANGE,
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
    WeightFormat,
    requant_bits,
    requant_frac,
)

settings.register_profile(
    "dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci-slow", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ARRAY_MODES = ("random", "random", "max", "min", "extremes", "sparse")


@st.composite
def act_formats(draw: st.DrawFn, min_bits: int = 2, max_bits: int = 16) -> ActFormat:
    """Any activation format: signed or unsigned, ``min_bits..max_bits``, frac -32..32."""
    signed = draw(st.booleans())
    bits = draw(st.integers(max(min_bits, 2 if signed else 1), max_bits))
    frac = draw(st.one_of(st.integers(-4, 12), st.integers(-32, 32)))
    return ActFormat(bits, frac, signed)


@st.composite
def weight_formats(draw: st.DrawFn) -> WeightFormat:
    """Fixed(2..16, frac) or Pow2(1..7, emax), with fractions from negative to large."""
    if draw(st.booleans()):
        return Fixed(
            draw(st.integers(2, 16)), draw(st.one_of(st.integers(-4, 12), st.integers(-64, 64)))
        )
    bits = draw(st.integers(1, 7))
    emax = draw(st.one_of(st.integers(-6, 2), st.integers(-32, 32)))
    return Pow2(bits, emax)


def weight_array(
    rng: np.random.Generator, fmt: WeightFormat, shape: tuple[int, ...], mode: str
) -> np.ndarray:
    """On-grid integer weights of ``fmt``; ``mode`` is one of ARRAY_MODES."""
    if isinstance(fmt, Fixed):
        return int_array(rng, fmt.lo, fmt.hi, shape, mode)
    if isinstance(fmt, Planes):
        return plane_weights(rng, fmt, shape, mode)
    if isinstance(fmt, Codebook):
        entries = np.asarray(fmt.entries, np.int64)
        sparse = 0 if 0 in fmt.entries else fmt.lo
        if mode in ("max", "min", "extremes"):
            return int_array(rng, fmt.lo, fmt.hi, shape, mode)
        w = entries[rng.integers(0, len(entries), size=shape)]
        return np.where(rng.random(shape) < 0.8, sparse, w) if mode == "sparse" else w
    top = 1 << fmt.max_shift
    if mode == "max":
        return np.full(shape, top, dtype=np.int64)
    if mode == "min":
        return np.full(shape, -top, dtype=np.int64)
    sign = rng.choice([-1, 1], size=shape)
    if mode == "extremes":
        return sign * top
    mag = np.left_shift(1, rng.integers(0, fmt.max_shift + 1, size=shape))
    if fmt.has_zero:
        zero_p = 0.8 if mode == "sparse" else 0.25
        mag = np.where(rng.random(shape) < zero_p, 0, mag)
    return (sign * mag).astype(np.int64)


def plane_weights(
    rng: np.random.Generator, fmt: Planes, shape: tuple[int, ...], mode: str = "random"
) -> np.ndarray:
    """Weights of ``fmt`` (output channel first) from random sign codes; ``mode`` "max": every
    plane +1, "min": every plane -1, "extremes": one or the other, "sparse": mostly the
    channel's value nearest 0."""
    values = fmt.values()  # (channels, 2**M), code 0 all +1, the last all -1
    top = values.shape[1] - 1
    codes = rng.integers(0, top + 1, size=shape)
    if mode in ("max", "min"):
        codes = np.full(shape, 0 if mode == "max" else top)
    elif mode == "extremes":
        codes = rng.choice([0, top], size=shape)
    elif mode == "sparse":
        near = np.abs(values).argmin(1).reshape((-1,) + (1,) * (len(shape) - 1))
        codes = np.where(rng.random(shape) < 0.8, near, codes)
    return np.take_along_axis(values, codes.reshape(shape[0], -1), axis=1).reshape(shape)


def plane_format(
    rng: np.random.Generator, channels: int, planes: int, bits: int, frac: int
) -> Planes:
    """Random ``bits``-bit signed plane scales (the min, max, 0 and 1 among them, as many as
    fit), ``planes`` per channel."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    m = rng.integers(lo, hi, size=channels * planes, endpoint=True)
    ends = [lo, hi, 0, 1][: m.size]
    m[rng.permutation(m.size)[: len(ends)]] = ends
    return Planes(tuple(map(tuple, m.reshape(channels, planes).tolist())), frac)


def int_array(
    rng: np.random.Generator, lo: int, hi: int, shape: tuple[int, ...], mode: str
) -> np.ndarray:
    """Integers in ``[lo, hi]``; ``mode`` is one of ARRAY_MODES."""
    if mode == "max":
        return np.full(shape, hi, dtype=np.int64)
    if mode == "min":
        return np.full(shape, lo, dtype=np.int64)
    if mode == "extremes":
        return np.where(rng.random(shape) < 0.5, lo, hi).astype(np.int64)
    a = rng.integers(lo, hi, size=shape, endpoint=True)
    if mode == "sparse":
        a = np.where(rng.random(shape) < 0.8, min(max(0, lo), hi), a)
    return a.astype(np.int64)


def lane_weights(rng: np.random.Generator, fmt: WeightFormat, shape: tuple[int, ...]) -> np.ndarray:
    """Random on-grid weights: Fixed uniform over its range; Pow2 signed powers of two, 30% zeros
    where the format has a zero."""
    if isinstance(fmt, Fixed):
        return rng.integers(fmt.lo, fmt.hi, size=shape, endpoint=True)
    if isinstance(fmt, Codebook):
        return np.asarray(fmt.entries)[rng.integers(0, len(fmt.entries), size=shape)]
    mag = np.left_shift(1, rng.integers(0, fmt.max_shift + 1, size=shape))
    w = mag * rng.choice([-1, 1], size=shape)
    return np.where(rng.random(shape) < 0.3, 0, w) if fmt.has_zero else w


@st.composite
def rngs(draw: st.DrawFn) -> np.random.Generator:
    """A NumPy generator seeded by Hypothesis (so failures replay and shrink the seed)."""
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


array_modes = st.sampled_from(ARRAY_MODES)


def example_network(seed: int = 0) -> Network:
    """A small network using every layer type and both weight formats, random on-grid weights.

    (1, 8, 8) s8.f4 input -> conv 3x3 pad 1 (Pow2, ReLU) -> maxpool 2 -> conv 3x3 (Fixed)
    -> avgpool 2 -> ReLU -> Flatten -> linear (Pow2, ReLU) -> linear (Fixed): 10 logits.
    """
    rng = np.random.default_rng(seed)

    def mac(name: str, shape: tuple[int, ...], wfmt: WeightFormat, out: ActFormat, **kw):
        weight = weight_array(rng, wfmt, shape, "random")
        bias = rng.integers(-256, 257, size=shape[0])
        if len(shape) == 4:
            return Conv2d(name, shape[1], shape[0], shape[2:], wfmt, out, weight, bias, **kw)
        return Linear(name, shape[1], shape[0], wfmt, out, weight, bias, **kw)

    layers = (
        mac("conv1", (4, 1, 3, 3), Pow2(4, 0), ActFormat(8, 1, signed=False), padding=1, relu=True),
        MaxPool2d("pool1", 2),
        mac("conv2", (6, 4, 3, 3), Fixed(6, 4), ActFormat(8, -2)),
        AvgPool2d("pool2", 2),
        ReLU("relu2"),
        Flatten("flat"),
        mac("fc1", (12, 6), Pow2(3, -1), ActFormat(6, -3, signed=False), relu=True),
        mac("fc2", (10, 12), Fixed(8, 5), ActFormat(10, -3)),
    )
    return Network((1, 8, 8), ActFormat(8, 4), layers, name="example")


def residual_network(seed: int = 0, shortcut: str = "A") -> Network:
    """A small ResNet with an identity and a downsampling shortcut, random on-grid weights.

    (3, 8, 8) s8.f4 -> stem conv 3->4 (ReLU) -> block 1: conv, conv + identity, add (ReLU)
    -> block 2: conv stride 2 4->8, conv + shortcut, add (ReLU) -> global average pool ->
    Flatten -> linear 8->10. The block 2 shortcut is option A (subsample 2, pad 2+2) or,
    with ``shortcut="B"``, a 1x1 stride-2 conv 4->8.
    """
    rng = np.random.default_rng(seed)

    def conv(name, cin, cout, wfmt, out, inputs=(), **kw) -> Conv2d:
        weight = weight_array(rng, wfmt, (cout, cin, 3, 3), "random")
        bias = rng.integers(-64, 65, size=cout)
        return Conv2d(name, cin, cout, 3, wfmt, out, weight, bias, padding=1, inputs=inputs, **kw)

    u8 = ActFormat(8, 3, signed=False)
    layers = (
        conv("stem", 3, 4, Pow2(5, 0), u8, relu=True),
        conv("b1_conv1", 4, 4, Pow2(5, -1), u8, relu=True),
        conv("b1_conv2", 4, 4, Fixed(6, 5), ActFormat(8, 4)),
        Add("b1_add", u8, ("b1_conv2", "stem"), relu=True),
        conv("b2_conv1", 4, 8, Pow2(4, -1), ActFormat(8, 2, signed=False), stride=2, relu=True),
        conv("b2_conv2", 8, 8, Pow2(3, -2), ActFormat(9, 4)),
        SubsamplePad("b2_short", 2, (2, 2), inputs=("b1_add",))
        if shortcut == "A"
        else Conv2d(
            "b2_short", 4, 8, 1, Fixed(6, 4), ActFormat(8, 3),
            weight_array(rng, Fixed(6, 4), (8, 4, 1, 1), "random"), rng.integers(-64, 65, 8),
            stride=2, inputs=("b1_add",),
        ),
        Add("b2_add", ActFormat(8, 2, signed=False), ("b2_conv2", "b2_short"), relu=True),
        GlobalAvgPool("pool"),
        Flatten("flat"),
        Linear(
            "fc", 8, 10, Fixed(8, 6), ActFormat(10, 2),
            weight_array(rng, Fixed(8, 6), (10, 8), "random"), rng.integers(-512, 513, size=10),
        ),
    )  # fmt: skip
    return Network((3, 8, 8), ActFormat(8, 4), layers, name="resnet_toy")


def with_roundings(net: Network, pick: Callable[[str], str]) -> Network:
    """``net`` with the rounding of the input format (``pick("input")``) and of every layer's
    ``out_format`` (``pick(layer name)``) replaced."""
    layers = tuple(
        replace(lyr, out_format=replace(lyr.out_format, rounding=pick(lyr.name)))
        if isinstance(lyr, (Conv2d, Linear, Add))
        else lyr
        for lyr in net.layers
    )
    fmt = replace(net.input_format, rounding=pick("input"))
    return Network(net.input_shape, fmt, layers, net.name)


def shift_add_codebook(
    rng: np.random.Generator, bits: int, kmax: int, frac: int, zero: bool | None = None
) -> Codebook:
    """A codebook of ``2**bits`` (at least 2) shift-add entries ``|e| <= 2**kmax`` (0, ±2**k,
    ±2**j ± 2**k) as DQC and TTQ make them: with 0 or without (``zero``; random when None),
    and, as many as fit, the extremes ``±2**kmax`` and two-term ones at the top of the range
    (``±(2**kmax - 1)``, ``±(2**kmax - 2**(kmax-1) + ...)``), the rest random."""
    p = [0] + [s << k for k in range(kmax + 1) for s in (1, -1)]
    grid = sorted({a + b for a in p for b in p if abs(a + b) <= 1 << kmax})
    n = min(max(2, 1 << bits), len(grid) - 1)
    zero = bool(rng.integers(2)) if zero is None else zero
    top = 1 << kmax
    ends = [top, -top, top - 1, -(top - 1), (top >> 1) + 1, -((top >> 1) + 1)]
    picked = {0} if zero else set()
    for e in ends:
        if len(picked) < n and e in grid and e != 0:
            picked.add(int(e))
    rest = [int(e) for e in rng.permutation(grid) if e != 0 and e not in picked]
    picked.update(rest[: n - len(picked)])
    return Codebook(tuple(sorted(picked)), frac)


def channel_scales(rng: np.random.Generator, fmt: Fixed, n: int) -> np.ndarray:
    """``n`` per-channel scales on ``fmt``'s grid: its min, max, 0 and -1 (as many as fit),
    the others random, in random order (so the extremes land on different PEs and folds)."""
    m = rng.integers(fmt.lo, fmt.hi, size=n, endpoint=True)
    ends = [fmt.lo, fmt.hi, 0, -1][:n]
    m[: len(ends)] = ends
    return rng.permutation(m)


def with_scale(
    layer: Conv2d | Linear, fin: ActFormat, fmt: Fixed, rng: np.random.Generator, delta: int = 0
) -> Conv2d | Linear:
    """``layer`` with ``channel_scales`` in ``fmt`` and its output frac moved so that the
    scaled accumulator's range ends ``delta`` bits past the output range (> 0: saturates)."""
    layer = replace(layer, scale=channel_scales(rng, fmt, len(layer.bias)), scale_format=fmt)
    out = layer.out_format
    shift = requant_bits(layer, fin) - out.bits - delta
    frac = min(max(requant_frac(layer, fin) - shift, ACT_FRAC_RANGE[0]), ACT_FRAC_RANGE[1])
    return replace(layer, out_format=replace(out, frac=frac))


def tiny_float_net(rng: np.random.Generator) -> FloatNet:
    """A 1x6x6 float CNN (conv 3x3 -> max pool -> dense 12 -> 4) for retraining tests."""
    return FloatNet(
        (1, 6, 6),
        (
            FConv2d("c", rng.normal(0, 0.5, (3, 1, 3, 3)), rng.normal(0, 0.1, 3), relu=True),
            FMaxPool2d("p", (2, 2), (2, 2)),
            FFlatten("f"),
            FLinear("fc", rng.normal(0, 0.3, (4, 12)), rng.normal(0, 0.1, 4)),
        ),
    )


def tiny_netlist(ff_params: dict, extra_sink: bool = False, out_port: bool = False) -> dict:
    """A Yosys JSON netlist: one DP16KD (port B read, 18 wide) with DOB0 -> a TRELLIS_FF
    (``ff_params`` override its parameters; hwgen.netlist's tests)."""
    cells = {
        "ram": {
            "type": "DP16KD",
            "parameters": {
                "DATA_WIDTH_A": "00000000000000000000000000010010",
                "DATA_WIDTH_B": "00000000000000000000000000010010",
                "REGMODE_A": "NOREG",
                "REGMODE_B": "NOREG",
                "CLKAMUX": "CLKA",
                "CLKBMUX": "CLKB",
            },
            "port_directions": {
                "CLKB": "input",
                "RSTB": "input",
                "OCEB": "input",
                "DOB0": "output",
            },
            "connections": {"CLKB": [2], "RSTB": ["0"], "OCEB": ["0"], "DOB0": [10]},
        },
        "ff": {
            "type": "TRELLIS_FF",
            "parameters": {"CLKMUX": "CLK", "CEMUX": "1", "LSRMUX": "LSR", "REGSET": "RESET"}
            | ff_params,
            "port_directions": {"CLK": "input", "DI": "input", "LSR": "input", "Q": "output"},
            "connections": {"CLK": [2], "DI": [10], "LSR": ["0"], "Q": [11]},
        },
    }
    if extra_sink:
        cells["lut"] = {
            "type": "LUT4",
            "parameters": {},
            "port_directions": {"A": "input", "Z": "output"},
            "connections": {"A": [10], "Z": [12]},
        }
    ports = {"q": {"direction": "output", "bits": [11]}}
    if out_port:
        ports["raw"] = {"direction": "output", "bits": [10]}
    return {"modules": {"top": {"ports": ports, "cells": cells}}}
