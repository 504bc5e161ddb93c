"""Layer engines: one streaming hardware component per layer, and what the build needs to
know about it (``EngineInfo``).

A Conv2d or Linear engine is the sliding-window unit followed by the MAC unit (weight ROMs,
PE x SIMD MAC array, requantisers): SIMD input channels per beat in, PE output channels per
beat out. A dense layer is the same engine on a 1x1 map of ``in_features`` channels. The
``unrolled`` engine (hwgen.hw.unrolled) computes a whole kernel window at once, with the
weights as constants in an adder graph, at PE = Cout and SIMD = Cin. Pool,
global average pool and ReLU engines come from hwgen.hw.pool, add and subsample-pad engines
from hwgen.hw.residual, all with ``pe`` channels per beat in and out (an add engine has two
inputs, ``a`` and ``b``, instead of ``i``). Flatten has no engine: H,W,C streams are already
in flattened order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from amaranth import Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.mac import MACUnit
from hwgen.hw.pool import AvgPool, GlobalAvgPoolEngine, MaxPool, ReLUEngine
from hwgen.hw.requant import act_shape
from hwgen.hw.residual import AddEngine, SubsamplePadEngine
from hwgen.hw.rom import ROM_STYLES, rom_width, rom_words
from hwgen.hw.sparse import fold_schedule, pixel_beats
from hwgen.hw.unrolled import UnrolledEngine
from hwgen.hw.window import SlidingWindow
from hwgen.ir import (
    Add,
    AvgPool2d,
    Conv2d,
    Flatten,
    GlobalAvgPool,
    Layer,
    Linear,
    MaxPool2d,
    Network,
    ReLU,
    SubsamplePad,
    acc_bits,
)

MAX_LANES = 1024  # PE*SIMD (or pool lanes) beyond this is not a sensible FPGA layer
ENGINES = ("folded", "unrolled")  # for a Conv2d or Linear layer
MAX_UNROLLED_WEIGHTS = 4096  # the adder-graph search grows with the square of a row's terms
_KINDS = {
    Conv2d: "conv",
    Linear: "dense",
    MaxPool2d: "maxpool",
    AvgPool2d: "avgpool",
    ReLU: "relu",
    Add: "add",
    SubsamplePad: "subsample_pad",
    GlobalAvgPool: "global_avgpool",
}


@dataclass(frozen=True)
class EngineInfo:
    """Parameters of one layer engine as built; counts are per image.

    ``roms`` holds the layer's one ROM (shared by its PEs) in address order (hwgen.hw.rom
    layout): a ``uint64`` array when ``rom_width <= 64``, else an array of Python ints.
    Empty for engines without MACs, whose ``acc_bits``, ``rom_depth`` and ``rom_width`` are
    0. A folded conv or dense engine's ``ideal_cycles`` is ``output pixels * sum over neuron
    folds of max(1, scheduled beats)`` (hwgen.hw.sparse: zero blocks skipped), which is
    ``macs / (PE * SIMD)`` when no block is skipped; ``rom_depth`` counts the scheduled words.
    An add engine's second input (``b``) has ``in_b_bits`` and ``in_b_signed`` (0 and
    False for the other engines). ``engine`` is ``unrolled`` for the unrolled constant-weight
    engine (no ROM), else ``folded``.
    """

    kind: str  # conv | dense | maxpool | avgpool | relu | add | subsample_pad | global_avgpool
    in_lanes: int
    in_bits: int
    in_signed: bool
    out_lanes: int
    out_bits: int
    out_signed: bool
    in_beats: int
    out_beats: int
    pe: int
    simd: int
    acc_bits: int
    rom_depth: int
    rom_width: int
    macs: int
    ideal_cycles: int
    roms: list[np.ndarray] = field(repr=False, compare=False)
    in_b_bits: int = 0
    in_b_signed: bool = False
    engine: str = "folded"


def _layer(net: Network, index: int) -> Layer:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(net.layers):
        raise HwgenError(f"layer index must be in [0, {len(net.layers) - 1}], not {index!r}")
    layer = net.layers[index]
    if isinstance(layer, Flatten):
        raise HwgenError(f"layer {layer.name}: Flatten has no engine (it only relabels the stream)")
    return layer


def _divisor(what: str, layer: Layer, value: object, of: int, of_what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or of % value:
        raise HwgenError(f"layer {layer.name}: {what} must divide {of_what} = {of}, not {value!r}")


def _mac_dims(net: Network, index: int) -> tuple[int, int, int, int]:
    """(Cin, Cout, KH*KW, output pixels) of a Conv2d or Linear layer."""
    layer = net.layers[index]
    out = net.shapes[layer.name]
    if isinstance(layer, Conv2d):
        return (
            layer.in_channels,
            layer.out_channels,
            layer.kernel[0] * layer.kernel[1],
            (out[1] * out[2]),
        )
    assert isinstance(layer, Linear)
    return layer.in_features, layer.out_features, 1, 1


def _check_folding(net: Network, index: int, pe: int, simd: int, engine: str) -> Layer:
    layer = _layer(net, index)
    if engine not in ENGINES:
        raise HwgenError(
            f"layer {layer.name}: engine must be one of {', '.join(ENGINES)}, not {engine!r}"
        )
    if engine == "unrolled":
        if not isinstance(layer, (Conv2d, Linear)):
            raise HwgenError(
                f"layer {layer.name}: only a conv or dense layer has an unrolled engine"
            )
        cin, cout, kk, _ = _mac_dims(net, index)
        if cin * cout * kk > MAX_UNROLLED_WEIGHTS:
            raise HwgenError(
                f"layer {layer.name}: {cin * cout * kk} weights is too many to unroll "
                f"(at most {MAX_UNROLLED_WEIGHTS})"
            )
        if (pe, simd) != (cout, cin):
            raise HwgenError(
                f"layer {layer.name}: the unrolled engine has PE = {cout} and SIMD = {cin} "
                f"(every channel), not PE={pe}, SIMD={simd}"
            )
        return layer
    if isinstance(layer, (Conv2d, Linear)):
        cin, cout, _, _ = _mac_dims(net, index)
        _divisor("PE", layer, pe, cout, "output channels")
        _divisor("SIMD", layer, simd, cin, "input channels")
        lanes = pe * simd
    elif isinstance(layer, SubsamplePad):
        counts = (
            ("zero channels before", layer.pad[0]),
            ("channels", net.in_shape(layer)[0]),
            ("zero channels after", layer.pad[1]),
        )
        for what, n in counts:
            if n:
                _divisor("PE", layer, pe, n, what)
        lanes = pe
    else:
        _divisor("PE", layer, pe, net.in_shape(layer)[0], "channels")
        lanes = pe
    if lanes > MAX_LANES:
        raise HwgenError(
            f"layer {layer.name}: {lanes} lanes (PE={pe}, SIMD={simd}) is too wide "
            f"(at most {MAX_LANES})"
        )
    return layer


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def choose_folding(net: Network, index: int, max_pe: int, max_simd: int) -> tuple[int, int]:
    """(PE, SIMD): the largest divisors of Cout and Cin (C for the others) within the limits.

    For engines without MACs SIMD is meaningless and returned equal to PE; a subsample-pad
    engine's PE also divides its zero channel counts.
    """
    layer = _layer(net, index)
    for what, v in (("max PE", max_pe), ("max SIMD", max_simd)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HwgenError(f"layer {layer.name}: {what} must be a positive integer, not {v!r}")
    if isinstance(layer, (Conv2d, Linear)):
        cin, cout, _, _ = _mac_dims(net, index)
        return _largest_divisor(cout, max_pe), _largest_divisor(cin, max_simd)
    c = net.in_shape(layer)[0]
    if isinstance(layer, SubsamplePad):
        c = math.gcd(c, *layer.pad)
    pe = _largest_divisor(c, max_pe)
    return pe, pe


def engine_info(net: Network, index: int, pe: int, simd: int, engine: str = "folded") -> EngineInfo:
    """What the build and the benches need to know about layer ``index``'s engine."""
    layer = _check_folding(net, index, pe, simd, engine)
    fin, fout = net.in_format(layer), net.formats[layer.name]
    shape_in, shape_out = net.in_shape(layer), net.shapes[layer.name]
    size_in, size_out = int(np.prod(shape_in)), int(np.prod(shape_out))
    common = dict(
        kind=_KINDS[type(layer)],
        in_bits=fin.bits,
        in_signed=fin.signed,
        out_bits=fout.bits,
        out_signed=fout.signed,
        pe=pe,
    )
    if isinstance(layer, (Conv2d, Linear)):
        cin, cout, kk, pixels = _mac_dims(net, index)
        macs = pixels * cout * kk * cin
        roms = [] if engine == "unrolled" else [rom_words(layer, pe, simd)]
        ideal = macs // (pe * simd)  # unrolled: one window per cycle
        if roms:  # folded: one cycle per scheduled beat (hwgen.hw.sparse)
            ideal = pixels * pixel_beats(fold_schedule(layer, pe, simd))
        return EngineInfo(
            **common,
            in_lanes=simd,
            out_lanes=pe,
            in_beats=size_in // simd,
            out_beats=size_out // pe,
            simd=simd,
            acc_bits=acc_bits(layer, fin),
            rom_depth=len(roms[0]) if roms else 0,
            rom_width=rom_width(layer, pe, simd) if roms else 0,
            macs=macs,
            ideal_cycles=ideal,
            roms=roms,
            engine=engine,
        )
    # The others: PE channels per beat in and out, no ROM, no MACs.
    extra = {}
    if isinstance(layer, Add):
        fb = net.formats[layer.inputs[1]]
        extra = dict(in_b_bits=fb.bits, in_b_signed=fb.signed)
    return EngineInfo(
        **extra,
        **common,
        in_lanes=pe,
        out_lanes=pe,
        in_beats=size_in // pe,
        out_beats=size_out // pe,
        simd=pe,
        acc_bits=0,
        rom_depth=0,
        rom_width=0,
        macs=0,
        ideal_cycles=max(size_in, size_out) // pe,
        roms=[],
    )


class MACEngine(wiring.Component):
    """A Conv2d or Linear layer: sliding window + MAC unit.

    Members
    -------
    i : In(stream.Signature(ArrayLayout(input shape, simd)))
        The input map in H,W,C order, SIMD channels per beat.
    o : Out(stream.Signature(ArrayLayout(output shape, pe)))
        The output map in H,W,C order, PE channels per beat.
    """

    def __init__(self, net: Network, index: int, pe: int, simd: int, rom_style: str) -> None:
        layer = net.layers[index]
        assert isinstance(layer, (Conv2d, Linear))
        self.layer, self.fmt, self.shape = layer, net.in_format(layer), net.in_shape(layer)
        self.pe, self.simd, self.rom_style = pe, simd, rom_style
        super().__init__(
            {
                "i": In(stream.Signature(data.ArrayLayout(act_shape(self.fmt), simd))),
                "o": Out(stream.Signature(data.ArrayLayout(act_shape(layer.out_format), pe))),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        layer = self.layer
        if isinstance(layer, Conv2d):
            c, h, w = self.shape
            geometry = dict(kernel=layer.kernel, stride=layer.stride, padding=layer.padding)
        else:
            c, h, w = layer.in_features, 1, 1
            geometry = dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        folds = layer.bias.shape[0] // self.pe
        m.submodules.window = window = SlidingWindow(
            schedule=fold_schedule(layer, self.pe, self.simd),
            channels=c,
            height=h,
            width=w,
            lanes=self.simd,
            shape=act_shape(self.fmt),
            repeats=folds,
            **geometry,
        )
        m.submodules.mac = mac = MACUnit(layer, self.fmt, self.pe, self.simd, self.rom_style)
        wiring.connect(m, wiring.flipped(self.i), window.i)
        wiring.connect(m, window.o, mac.i)
        wiring.connect(m, mac.o, wiring.flipped(self.o))
        return m


def make_engine(
    net: Network,
    index: int,
    pe: int,
    simd: int,
    rom_style: str = "inline",
    engine: str = "folded",
) -> wiring.Component:
    """The streaming engine of layer ``index`` (see the module docstring for its ports)."""
    layer = _check_folding(net, index, pe, simd, engine)
    if rom_style not in ROM_STYLES:
        raise HwgenError(f"ROM style must be one of {', '.join(ROM_STYLES)}, not {rom_style!r}")
    if engine == "unrolled":
        return UnrolledEngine(layer, net.in_format(layer), net.in_shape(layer))
    if isinstance(layer, (Conv2d, Linear)):
        return MACEngine(net, index, pe, simd, rom_style)
    in_shape = net.in_shape(layer)
    c, h, w = in_shape if len(in_shape) == 3 else (in_shape[0], 1, 1)
    shape = act_shape(net.in_format(layer))
    if isinstance(layer, ReLU):
        return ReLUEngine(shape=shape, lanes=pe)
    if isinstance(layer, Add):
        a, b = (net.formats[name] for name in layer.inputs)
        return AddEngine(fmt_a=a, fmt_b=b, out_format=layer.out_format, relu=layer.relu, lanes=pe)
    if isinstance(layer, SubsamplePad):
        return SubsamplePadEngine(
            channels=c, height=h, width=w, stride=layer.stride, pad=layer.pad, lanes=pe, shape=shape
        )
    rounding = net.in_format(layer).rounding  # an average keeps, and rounds in, its format
    if isinstance(layer, GlobalAvgPool):
        return GlobalAvgPoolEngine(
            channels=c, height=h, width=w, lanes=pe, shape=shape, rounding=rounding
        )
    window = dict(kernel=layer.kernel, stride=layer.stride)
    if isinstance(layer, MaxPool2d):
        return MaxPool(channels=c, height=h, width=w, lanes=pe, shape=shape, **window)
    return AvgPool(
        channels=c, height=h, width=w, lanes=pe, shape=shape, rounding=rounding, **window
    )
