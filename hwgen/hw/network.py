"""The network top: the layer engines of a DAG joined by FIFOs, forks and skip FIFOs.

After each engine but the output's: a FIFO of one or three beats (``layer_fifo_depths``).
A tensor read by several layers (a residual block's input) goes through an eager ``Fork``,
one output per reader; on each branch that can fall behind the others, a skip FIFO sized
by ``skip_fifo_depths`` so that the network cannot deadlock under any stall pattern. In
front of each engine input, a width converter when the producer's lanes differ from the
engine's (through their greatest common divisor when neither divides the other). Flatten
has no engine: the H,W,C stream is already the flattened vector. A chain has no fork and
no skip FIFO.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping

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

# Inter-layer FIFO depths (beats): SyncFIFOBuffered passes a beat every other cycle with
# one register, every cycle from three (its inner memory, one word short, refuses a write
# while full even when it is being read).
HALF_RATE_DEPTH, FULL_RATE_DEPTH = 1, 3
SKIP_MARGIN = 8  # beats: the fork's one-beat lead, width converters, output registers

Pixel = tuple[int, int]  # (row, column) of a tensor; a vector (F,) is one pixel of F channels


# Submodules added beside a layer's engine are named ``<layer>_<suffix>``.
_PLUMBING = re.compile(r"(?:[ab]_)?(?:fork|fifo|skip|width\d+)")


def _check_names(net: Network) -> None:
    """Refuse a layer named like another layer's FIFO, fork or width converter."""
    names = net.names
    for name in names:
        for other in names:
            if name.startswith(other + "_") and _PLUMBING.fullmatch(name[len(other) + 1 :]):
                raise HwgenError(
                    f"layer {name}: its name clashes with the FIFOs and forks of layer "
                    f"{other}; rename it"
                )


def _source(net: Network, name: str) -> str:
    """The tensor that carries ``name``'s stream: Flatten only relabels its input."""
    while name != INPUT and isinstance(net.layer(name), Flatten):
        name = net.layer(name).inputs[0]
    return name


def _hw(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[1], shape[2]) if len(shape) == 3 else (1, 1)


def _need(net: Network, name: str, pixel: Pixel) -> Pixel:
    """The last input pixel (raster order) engine ``name`` takes in, at full rate, by the time
    it emits output ``pixel``."""
    layer = net.layer(name)
    h, w = _hw(net.shapes[_source(net, layer.inputs[0])])
    r, c = pixel
    if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d)):
        # The sliding window issues a window row once all its input rows are written, and
        # at full rate it writes the next S_h rows meanwhile (its K_h + S_h row slots).
        pad = layer.padding[0] if isinstance(layer, Conv2d) else 0
        (kh, _), (sh, _) = layer.kernel, layer.stride
        return min((r + 1) * sh + kh - 1 - pad, h - 1), w - 1
    if isinstance(layer, (Linear, GlobalAvgPool)):
        return h - 1, w - 1
    if isinstance(layer, SubsamplePad):
        return r * layer.stride[0], c * layer.stride[1]
    return pixel  # ReLU, Add


def skip_fifo_depths(
    net: Network,
    foldings: Mapping[str, tuple[int, int]],
    engines: Mapping[str, str] | None = None,
) -> dict[tuple[str, int], int]:
    """Skip FIFO depth (beats) per fork branch: ``{(reader layer, input index): depth}``.

    A tensor T read by several layers is forked; its branches meet again at the first layer
    J reachable from all of them, an add, which takes its inputs pixel by pixel in lockstep.
    Let ``need_i(p)`` be the last pixel of T (raster order) branch ``i`` takes in by the time
    it delivers pixel ``p`` to J at full rate: composed backwards along the branch's
    engines, the max over its paths, with per engine (input pixel for output pixel (r, c))::

        conv, max/avg pool   (min((r + 1)*S_h + K_h - 1 - P_h, H - 1), W - 1)
        dense, global pool   (H - 1, W - 1)                               the whole input
        subsample-pad        (r*S_h, c*S_w)
        ReLU, add            (r, c)

    A sliding window needs whole input rows down to ``r*S_h + K_h - 1 - P_h`` for output row
    r, and writes the next S_h rows while it emits that row (its K_h + S_h row slots).
    Branch ``i`` lags ``lag_i = max over p of idx(max_j need_j(p)) - idx(need_i(p))``
    pixels of T (``idx(r, c) = r*W_T + c``), and gets a FIFO right after the fork of::

        depth_i = (lag_i + 1) * C_T / lanes_T + SKIP_MARGIN        beats of T

    except the first branch with ``lag = 0`` everywhere, which gets none. Why that is
    enough under any stall pattern: a deadlock would need J waiting for pixel p of a branch
    k that waits for T's next beat while the fork waits for a full branch i. Branch k,
    starved, holds nothing it could emit (its FIFOs and pipeline registers are empty), so
    the fork has handed out T only up to what p needs, at most ``need_k(p)``, and branch i
    holds T from ``need_i(p)`` on: at most ``lag_i + 1`` pixels, which its FIFO takes. The
    S_h look-ahead rows are not needed for that, but without them the skip FIFO throttles
    the long branch (digits-res: 3186 instead of 2311 cycles per image).
    """
    kinds = dict(engines or {})  # the layers with an unrolled engine
    engines = [la for la in net.layers if not isinstance(la, Flatten)]
    infos = {
        la.name: engine_info(
            net, net.index(la.name), *foldings[la.name], kinds.get(la.name, "folded")
        )
        for la in engines
    }
    readers: dict[str, list[tuple[str, int]]] = {}
    for la in engines:
        for port, src in enumerate(la.inputs):
            readers.setdefault(_source(net, src), []).append((la.name, port))
    order = [la.name for la in engines]
    depths: dict[tuple[str, int], int] = {}
    for t, branches in readers.items():
        if len(branches) < 2:
            continue
        reach = []  # per branch: the engines it feeds, directly or not
        for reader, _ in branches:
            r = {reader}
            for name in order[order.index(reader) + 1 :]:
                if any(_source(net, i) in r for i in net.layer(name).inputs):
                    r.add(name)
            reach.append(r)
        common = [n for n in order if all(n in r for r in reach)]
        if not common:
            continue  # branches that never meet cannot block each other
        join = common[0]
        (h, w), width = _hw(net.shapes[join]), _hw(net.shapes[t])[1]

        def need(name: str, pixel: Pixel, reader: str, r: set[str], width: int = width) -> int:
            """idx of the T pixel the branch (``reader``, its engines ``r``) needs for
            ``pixel`` of tensor ``name``."""
            q = _need(net, name, pixel)
            if name == reader:
                return q[0] * width + q[1]
            srcs = [_source(net, i) for i in net.layer(name).inputs]
            return max(need(s, q, reader, r) for s in srcs if s in r)

        pixels = [(y, x) for y in range(h) for x in range(w)]
        needs = []
        for (reader, _), r in zip(branches, reach, strict=True):
            ins = [s for s in (_source(net, i) for i in net.layer(join).inputs) if s in r]
            if reader == join:  # T goes straight into the add
                needs.append([y * width + x for y, x in pixels])
            else:
                needs.append([max(need(s, p, reader, r) for s in ins) for p in pixels])
        latest = [max(col) for col in zip(*needs, strict=True)]
        lags = [max(a - b for a, b in zip(latest, n, strict=True)) for n in needs]
        exempt = lags.index(0) if 0 in lags else -1
        beats_per_pixel = net.shapes[t][0] // (
            infos[order[0]].in_lanes if t == INPUT else infos[t].out_lanes
        )
        for k, (branch, lag) in enumerate(zip(branches, lags, strict=True)):
            if k != exempt:
                depths[branch] = (lag + 1) * beats_per_pixel + SKIP_MARGIN
    return depths


def layer_fifo_depths(
    net: Network,
    foldings: Mapping[str, tuple[int, int]],
    engines: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Depth (beats) of the FIFO after each engine but the output's: ``{layer: depth}``.

    The FIFO only has to pass its producer's beats at the network's rate; buffering for the
    burstiness of a producer/consumer pair is already inside the engines:

    - A MAC engine emits PE channels per repetition (one beat every ``K_h*K_w*Cin/SIMD``
      cycles at most), through its own output FIFO (``MACUnit.OUT_DEPTH``), so a stalled
      consumer does not stop its array for short stalls.
    - Every engine that reads rows (conv, dense, max/avg pool) has a sliding window with
      ``S_h`` rows of look-ahead (its ``K_h + S_h`` row slots): it refuses input only while it
      holds all the rows of its next output row, i.e. a whole output row of work, and when
      it frees a slot it still holds the next ``S_h`` rows. A FIFO in front of it adds no
      throughput. The other engines (ReLU, add, subsample-pad, global pool) take a beat
      per cycle whenever their output can move.

    So in steady state every engine runs at the slowest engine's pace, ``T`` cycles per
    image (the largest of the engines' ideal cycles and beat counts), and the FIFO after
    engine ``e`` carries ``out_beats_e / T`` beats per cycle::

        depth_e = 1 (one register)   if 2 * out_beats_e <= T
                  3                  otherwise (a beat every cycle)

    Measured (Amaranth simulator, images back to back, no stalls), this keeps every
    network's cycles per image at its ideal ``T``, as the former fixed 16-beat FIFOs did:
    digits (INQ 5-bit, its demo folding) 1152, digits-res (PE = SIMD = 4) 2304, and the
    test networks of ``tests/test_hw_network.py``; most FIFOs are one register.
    """
    kinds = dict(engines or {})  # the layers with an unrolled engine
    engines = [(i, la) for i, la in enumerate(net.layers) if not isinstance(la, Flatten)]
    infos = [
        engine_info(net, i, *foldings[la.name], kinds.get(la.name, "folded")) for i, la in engines
    ]
    period = max(max(x.ideal_cycles, x.in_beats, x.out_beats) for x in infos)
    return {
        la.name: HALF_RATE_DEPTH if 2 * info.out_beats <= period else FULL_RATE_DEPTH
        for (_, la), info in zip(engines[:-1], infos[:-1], strict=True)
    }


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
    engines : mapping of layer name to engine, optional
        ``"unrolled"`` for a conv or dense layer built by hwgen.hw.unrolled (its folding is
        then (Cout, Cin)); the others are folded.
    fifo_depths : mapping of layer to depth, optional
        Overrides ``layer_fifo_depths`` (the FIFO after each engine but the output's).

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
        fifo_depths: Mapping[str, int] | None = None,
        engines: Mapping[str, str] | None = None,
    ) -> None:
        self.net, self.rom_style = net, rom_style
        self.engines = dict(engines or {})
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
        _check_names(net)
        self.infos: list[EngineInfo] = [
            engine_info(net, i, pe, simd, self._engine(i)) for i, pe, simd in self.stages
        ]
        self.skip_depths = dict(
            skip_fifo_depths(net, foldings, engines) if skip_depths is None else skip_depths
        )
        self.fifo_depths = dict(
            layer_fifo_depths(net, foldings, engines) if fifo_depths is None else fifo_depths
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
            engine = make_engine(net, index, pe, simd, self.rom_style, self._engine(index))
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
            # A FIFO after each engine (but the last) registers the handshake between layers.
            if index == self.stages[-1][0]:
                out = engine.o
            else:
                shape = act_shape(net.formats[name])
                out = self._fifo(m, name, engine.o, shape, info.out_lanes, self.fifo_depths[name])
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

    def _engine(self, index: int) -> str:
        return self.engines.get(self.net.layers[index].name, "folded")

    @staticmethod
    def _fifo(m: Module, name: str, src: object, shape: object, lanes: int, depth: int) -> object:
        layout = data.ArrayLayout(shape, lanes)
        buf = fifo.SyncFIFOBuffered(width=layout.size, depth=depth)
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
