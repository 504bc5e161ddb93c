"""The network top: the layer engines chained by FIFOs, one input and one output stream.

Between two engines: a FIFO (``FIFO_DEPTH`` beats), then a width converter when the first
engine's output lanes differ from the next one's input lanes (through their greatest common
divisor when neither divides the other). Flatten has no engine: the H,W,C stream is already
the flattened vector.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

from amaranth import Module
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.engine import engine_info, make_engine
from hwgen.hw.requant import act_shape
from hwgen.hw.streams import WidthConverter
from hwgen.ir import Flatten, Network

FIFO_DEPTH = 16


class NetworkTop(wiring.Component):
    """All engines of ``net`` in a chain.

    Parameters
    ----------
    net : Network
    foldings : mapping of layer name to (pe, simd)
        One entry per layer with an engine (Flatten needs none).
    rom_style : ``"inline"`` or ``"file"``

    Members
    -------
    i : In(stream.Signature(ArrayLayout(input shape, first engine's input lanes)))
    o : Out(stream.Signature(ArrayLayout(output shape, last engine's output lanes)))
    """

    def __init__(
        self, net: Network, foldings: Mapping[str, tuple[int, int]], rom_style: str = "inline"
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
        self.infos = [engine_info(net, i, pe, simd) for i, pe, simd in self.stages]
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
        prev = wiring.flipped(self.i)
        prev_lanes = self.infos[0].in_lanes
        for (index, pe, simd), info in zip(self.stages, self.infos, strict=True):
            name = self.net.layers[index].name
            shape = act_shape(self.net.in_format(self.net.layers[index]))
            if prev_lanes != info.in_lanes:
                prev = self._convert(m, name, prev, shape, prev_lanes, info.in_lanes)
            engine = make_engine(self.net, index, pe, simd, self.rom_style)
            m.submodules[name] = engine
            wiring.connect(m, prev, engine.i)
            # A FIFO after each engine (but the last) absorbs short stalls between layers.
            if index == self.stages[-1][0]:
                prev = engine.o
            else:
                prev = self._fifo(
                    m, name, engine.o, act_shape(self.net.formats[name]), info.out_lanes
                )
            prev_lanes = info.out_lanes
        wiring.connect(m, prev, wiring.flipped(self.o))
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
