"""The network top: the layer engines of a DAG joined by FIFOs, forks and skip FIFOs.

After each engine but the output's: a FIFO (``FIFO_DEPTH`` beats). A tensor read by several
layers (a residual block's input) goes through an eager ``Fork``, one output per reader; on
each branch but the one that absorbs the most, a skip FIFO sized by ``skip_fifo_depths`` so
that the network cannot deadlock under any stall pattern. In front of each engine input, a
width converter when the producer's lanes differ from the engine's (through their greatest
common divisor when neither divides the other). Flatten has no engine: the H,W,C stream is
already the flattened vector. A chain has no fork and no skip FIFO.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
from amaranth import Module
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.engine import EngineInfo, engine_info, make_engine
from hwgen.hw.requant import act_shape
from hwgen.hw.residual import Fork
from hwgen.hw.streams import StreamFIFO, WidthConverter
from hwgen.ir import (
    INPUT,
    Add,
    AvgPool2d,
    Conv2d,
    Flatten,
    GlobalAvgPool,
    Linear,
    MaxPool2d,
    Network,
    SubsamplePad,
)

FIFO_DEPTH = 16
PIPELINE_BEATS = 8  # output beats an engine's registers can hold (MAC pipeline: 5)
SKIP_MARGIN = 8  # beats: the fork's one-beat lead, width converters, rounding


def _source(net: Network, name: str) -> str:
    """The tensor that carries ``name``'s stream: Flatten only relabels its input."""
    while name != INPUT and isinstance(net.layer(name), Flatten):
        name = net.layer(name).inputs[0]
    return name


def _size(net: Network, name: str) -> int:
    return int(np.prod(net.shapes[name]))


def _absorb_values(net: Network, name: str, lanes: int) -> int:
    """Input values engine ``name`` can take in before it must emit its next output value."""
    layer = net.layer(name)
    shape = net.in_shape(layer)
    c, h, w = shape if len(shape) == 3 else (shape[0], 1, 1)
    if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d)):
        return (layer.kernel[0] + layer.stride[0]) * w * c  # the window's row slots
    if isinstance(layer, Linear):
        return 2 * c  # the window holds two vectors (1x1 kernel, stride 1)
    if isinstance(layer, GlobalAvgPool):
        return c * h * w  # the whole map before the first output
    if isinstance(layer, SubsamplePad):
        return layer.stride[0] * w * c  # the rows (and pixels) it drops between kept ones
    return lanes  # ReLU, Add: one register


def skip_fifo_depths(
    net: Network, foldings: Mapping[str, tuple[int, int]]
) -> dict[tuple[str, int], int]:
    """Skip FIFO depth (beats) per fork branch: ``{(reader layer, input index): depth}``.

    A tensor T read by several layers is forked; its branches meet again at the first layer
    J reachable from all of them (the add of a residual block). The add takes its two
    inputs in lockstep, so while it waits for the long branch's output, the long branch can
    keep taking T's beats (which the fork also hands to the other branches) up to what it
    absorbs, and the other branches must buffer them. For each branch ``i``::

        A(e)     = (input values e absorbs before its next output) * |T| / |X_e|
                 + (PIPELINE_BEATS * out_lanes_e + FIFO_DEPTH * out_lanes_e) * |T| / |Y_e|
                   in values of T (e's input X_e and output Y_e scaled to whole images)
        D_i      = max over paths from branch i's reader to J (J excluded) of sum A(e)
        depth_i  = ceil(max_j D_j / lanes_T) + (W_T * C_T / lanes_T) + SKIP_MARGIN

    for every branch but the one with the largest ``D`` (which gets none). "Absorbs" is,
    per engine: a sliding window (conv, pool) ``(K_h + S_h) * W * C`` (its row slots, see
    hwgen.hw.window), a dense layer ``2 * in_features``, global average pool the whole map,
    subsample-pad ``S_h * W * C`` (the rows it drops), ReLU and add one beat. The depth
    ignores what the short branch itself holds, so it is an upper bound; the extra row of T
    covers rounding across strides and padding.
    """
    engines = [la for la in net.layers if not isinstance(la, Flatten)]
    infos = {la.name: engine_info(net, net.index(la.name), *foldings[la.name]) for la in engines}
    readers: dict[str, list[tuple[str, int]]] = {}
    for la in engines:
        for port, src in enumerate(la.inputs):
            readers.setdefault(_source(net, src), []).append((la.name, port))
    order = [la.name for la in engines]
    depths: dict[tuple[str, int], int] = {}
    for t, branches in readers.items():
        if len(branches) < 2:
            continue
        size_t = _size(net, t)
        shape_t = net.shapes[t]
        lanes_t = infos[order[0]].in_lanes if t == INPUT else infos[t].out_lanes

        def absorbed(name: str, size_t: int = size_t, lanes_t: int = lanes_t) -> float:
            info, layer = infos[name], net.layer(name)
            x = _source(net, layer.inputs[0])
            pipe = (PIPELINE_BEATS + FIFO_DEPTH) * info.out_lanes
            own = _absorb_values(net, name, info.in_lanes) * size_t / _size(net, x)
            return own + pipe * size_t / _size(net, name)

        dists, reach = [], []
        for reader, _ in branches:
            d = {reader: absorbed(reader)}
            for name in order[order.index(reader) + 1 :]:
                srcs = [_source(net, i) for i in net.layer(name).inputs]
                ins = [d[s] for s in srcs if s in d]
                if ins:
                    d[name] = absorbed(name) + max(ins)
            reach.append(d)
        common = [n for n in order if all(n in r for r in reach)]
        if not common:
            continue  # branches that never meet cannot block each other
        join = common[0]
        join_ins = [_source(net, i) for i in net.layer(join).inputs]
        for (reader, _), d in zip(branches, reach, strict=True):
            dists.append(0.0 if reader == join else max(d[s] for s in join_ins if s in d))
        longest = max(range(len(dists)), key=lambda k: dists[k])
        row = shape_t[2] * shape_t[0] if len(shape_t) == 3 else 1
        depth = math.ceil(dists[longest] / lanes_t) + math.ceil(row / lanes_t) + SKIP_MARGIN
        for k, branch in enumerate(branches):
            if k != longest:
                depths[branch] = depth
    return depths


class NetworkTop(wiring.Component):
    """All engines of ``net``, joined as its DAG says.

    Parameters
    ----------
    net : Network
    foldings : mapping of layer name to (pe, simd)
        One entry per layer with an engine (Flatten needs none).
    rom_style : ``"inline"`` or ``"file"``
    skip_depths : mapping of (layer, input index) to depth, optional
        Overrides ``skip_fifo_depths`` (to show what too small a FIFO does).

    Members
    -------
    i : In(stream.Signature(ArrayLayout(input shape, first engine's input lanes)))
    o : Out(stream.Signature(ArrayLayout(output shape, last engine's output lanes)))

    ``infos`` holds the engines' EngineInfo in layer order: ``infos[0]`` reads the network
    input, ``infos[-1]`` produces its output.
    """

    def __init__(
        self,
        net: Network,
        foldings: Mapping[str, tuple[int, int]],
        rom_style: str = "inline",
        skip_depths: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        self.net, self.rom_style = net, rom_style
        self.stages: list[tuple[int, int, int]] = []  # (layer index, pe, simd)
        for index, layer in enumerate(net.layers):
            if isinstance(layer, Flatten):
                continue
            if layer.name not in foldings:
                raise HwgenError(f"layer {layer.name}: no folding (PE, SIMD) given")
            pe, simd = foldings[layer.name]
            self.stages.append((index, pe, simd))
        if not self.stages:
            raise HwgenError("the network has no layer with an engine")
        self.infos: list[EngineInfo] = [
            engine_info(net, i, pe, simd) for i, pe, simd in self.stages
        ]
        self.skip_depths = dict(
            skip_fifo_depths(net, foldings) if skip_depths is None else skip_depths
        )
        first, last = self.infos[0], self.infos[-1]
        in_layout = data.ArrayLayout(act_shape(net.input_format), first.in_lanes)
        out_layout = data.ArrayLayout(act_shape(net.output_format), last.out_lanes)
        super().__init__(
            {
                "i": In(stream.Signature(in_layout)),
                "o": Out(stream.Signature(out_layout)),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        net = self.net
        readers: dict[str, int] = {}
        for index, _, _ in self.stages:
            for src in net.layers[index].inputs:
                readers[_source(net, src)] = readers.get(_source(net, src), 0) + 1
        readers[_source(net, net.output)] = readers.get(_source(net, net.output), 0) + 1
        # Per tensor: the streams still to hand out (one per reader, in layer order), lanes.
        ready: dict[str, tuple[list[object], int]] = {}

        def publish(name: str, src: object, lanes: int) -> None:
            if readers[name] == 1:
                ready[name] = ([src], lanes)
                return
            layout = data.ArrayLayout(act_shape(net.formats[name]), lanes)
            fork = Fork(layout, readers[name])
            m.submodules[f"{name}_fork"] = fork
            wiring.connect(m, src, fork.i)
            ready[name] = (list(fork.outputs), lanes)

        publish(INPUT, wiring.flipped(self.i), self.infos[0].in_lanes)
        for (index, pe, simd), info in zip(self.stages, self.infos, strict=True):
            layer = net.layers[index]
            name = layer.name
            engine = make_engine(net, index, pe, simd, self.rom_style)
            ports = ["a", "b"] if isinstance(layer, Add) else ["i"]
            srcs = []
            for k, (port, src_name) in enumerate(zip(ports, layer.inputs, strict=True)):
                tensor = _source(net, src_name)
                streams, lanes = ready[tensor]
                prev = streams.pop(0)
                prefix = name if port == "i" else f"{name}_{port}"
                shape = act_shape(net.formats[tensor])
                depth = self.skip_depths.get((name, k), 0)
                if depth:
                    skip = StreamFIFO(data.ArrayLayout(shape, lanes), depth)
                    m.submodules[f"{prefix}_skip"] = skip
                    wiring.connect(m, prev, skip.i)
                    prev = skip.o
                if lanes != info.in_lanes:
                    prev = self._convert(m, prefix, prev, shape, lanes, info.in_lanes)
                srcs.append(prev)
            m.submodules[name] = engine
            for port, prev in zip(ports, srcs, strict=True):
                wiring.connect(m, prev, getattr(engine, port))
            # A FIFO after each engine (but the last) absorbs short stalls between layers.
            if index == self.stages[-1][0]:
                out = engine.o
            else:
                out = self._fifo(m, name, engine.o, act_shape(net.formats[name]), info.out_lanes)
            publish(name, out, info.out_lanes)
        streams, _ = ready[_source(net, net.output)]
        wiring.connect(m, streams.pop(0), wiring.flipped(self.o))
        return m

    @staticmethod
    def _convert(m: Module, name: str, src: object, shape: object, a: int, b: int) -> object:
        steps = [a, b] if a % b == 0 or b % a == 0 else [a, math.gcd(a, b), b]
        for k, (x, y) in enumerate(itertools.pairwise(steps)):
            conv = WidthConverter(shape, x, y)
            m.submodules[f"{name}_width{k}"] = conv
            wiring.connect(m, src, conv.i)
            src = conv.o
        return src

    @staticmethod
    def _fifo(m: Module, name: str, src: object, shape: object, lanes: int) -> object:
        layout = data.ArrayLayout(shape, lanes)
        buf = fifo.SyncFIFOBuffered(width=layout.size, depth=FIFO_DEPTH)
        m.submodules[f"{name}_fifo"] = buf
        out = stream.Signature(layout).create()
        m.d.comb += [
            buf.w_data.eq(src.payload),
            buf.w_en.eq(src.valid),
            src.ready.eq(buf.w_rdy),
            out.payload.eq(buf.r_data),
            out.valid.eq(buf.r_rdy),
            buf.r_en.eq(out.ready),
        ]
        return out
