"""Stream plumbing between layer engines, and simulation helpers that drive streams.

Hardware: ``WidthConverter`` (regroups lanes when one engine's PE differs from the next
engine's SIMD) and ``StreamFIFO`` (a buffered synchronous FIFO as a stream component).
Payloads are ``data.ArrayLayout(shape, lanes)``, lane k at bits ``[k*bits, (k+1)*bits)``.

Simulation (Amaranth's simulator, async testbenches): ``stream_put`` / ``stream_get`` move one
beat, and ``run_stream`` runs a one-input, one-output component as a pure function over a list
of beats with random valid/ready stalls on both sides, checking the stream rules as it goes.
Beats are Python values: an int for a plain shape, a list for an ``ArrayLayout``, a dict for a
``StructLayout`` (nested as the layout is).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from amaranth import ClockDomain, Module, Mux, Shape, ShapeCastable, Signal, Value
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hwgen.errors import HwgenError


def _check_lanes(what: str, lanes: object) -> None:
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise HwgenError(f"{what} must be a positive integer, not {lanes!r}")


class WidthConverter(wiring.Component):
    """Regroups a stream of ``in_lanes`` lanes into beats of ``out_lanes`` lanes, in order.

    One of ``in_lanes``, ``out_lanes`` must divide the other. Narrowing splits a beat into
    ``in_lanes / out_lanes`` beats, lowest lanes first; widening gathers beats, the first beat
    in the lowest lanes. Either way it moves one output beat per cycle when nothing stalls;
    equal widths are a wire.

    Members
    -------
    i : In(stream.Signature(data.ArrayLayout(shape, in_lanes)))
    o : Out(stream.Signature(data.ArrayLayout(shape, out_lanes)))
    """

    def __init__(self, shape: ShapeCastable | Shape, in_lanes: int, out_lanes: int) -> None:
        _check_lanes("width converter input lanes", in_lanes)
        _check_lanes("width converter output lanes", out_lanes)
        if in_lanes % out_lanes and out_lanes % in_lanes:
            raise HwgenError(
                f"width converter: one of input lanes {in_lanes} and output lanes {out_lanes} "
                "must divide the other"
            )
        self.shape, self.in_lanes, self.out_lanes = shape, in_lanes, out_lanes
        super().__init__(
            {
                "i": In(stream.Signature(data.ArrayLayout(shape, in_lanes))),
                "o": Out(stream.Signature(data.ArrayLayout(shape, out_lanes))),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        if self.in_lanes == self.out_lanes:
            wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
        elif self.in_lanes > self.out_lanes:
            self._narrow(m)
        else:
            self._widen(m)
        return m

    def _narrow(self, m: Module) -> None:
        n = self.in_lanes // self.out_lanes
        width = Shape.cast(self.o.payload.shape()).width
        held = Signal(Shape.cast(self.i.payload.shape()).width)
        full = Signal()
        part = Signal(range(n))
        m.d.comb += [
            self.o.valid.eq(full),
            self.o.payload.eq(held.word_select(part, width)),
            # Accept a new beat when empty, or while the last part leaves.
            self.i.ready.eq(~full | (self.o.ready & (part == n - 1))),
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += part.eq(0 if n == 1 else (part + 1) % n)
            with m.If(part == n - 1):
                m.d.sync += full.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [held.eq(self.i.payload), full.eq(1), part.eq(0)]

    def _widen(self, m: Module) -> None:
        n = self.out_lanes // self.in_lanes
        width = Shape.cast(self.i.payload.shape()).width
        buf = Signal(Shape.cast(self.o.payload.shape()).width)
        count = Signal(range(n + 1))
        full = count == n
        m.d.comb += [
            self.o.valid.eq(full),
            self.o.payload.eq(buf),
            self.i.ready.eq(~full | self.o.ready),
        ]
        slot = Signal(range(n))
        m.d.comb += slot.eq(Mux(full, 0, count))
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += count.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [buf.word_select(slot, width).eq(self.i.payload), count.eq(slot + 1)]


class StreamFIFO(wiring.Component):
    """A synchronous FIFO of ``depth`` beats between two streams of payload ``shape``.

    Wraps ``amaranth.lib.fifo.SyncFIFOBuffered`` (registered output, so it also breaks the
    combinational ready/valid paths between the engines it separates).

    Members
    -------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))
    """

    def __init__(self, shape: ShapeCastable | Shape, depth: int) -> None:
        _check_lanes("FIFO depth", depth)
        self.shape, self.depth = shape, depth
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform: object) -> Module:
        m = Module()
        width = Shape.cast(self.shape).width
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=width, depth=self.depth)
        m.d.comb += [
            fifo.w_data.eq(self.i.payload),
            fifo.w_en.eq(self.i.valid),
            self.i.ready.eq(fifo.w_rdy),
            self.o.payload.eq(fifo.r_data),
            self.o.valid.eq(fifo.r_rdy),
            fifo.r_en.eq(self.o.ready),
        ]
        return m


def _encode(shape: object, value: object) -> int:
    """A Python beat (int, list or dict, following the layout) as the payload's raw bits."""
    if isinstance(shape, data.ArrayLayout):
        width = Shape.cast(shape.elem_shape).width
        assert len(value) == shape.length, f"beat has {len(value)} lanes, not {shape.length}"
        return sum(_encode(shape.elem_shape, v) << (k * width) for k, v in enumerate(value))
    if isinstance(shape, data.StructLayout):
        return sum(_encode(f.shape, value[name]) << f.offset for name, f in shape)
    return int(value) & ((1 << Shape.cast(shape).width) - 1)


def _decode(shape: object, raw: int) -> object:
    """The raw bits of a payload as a Python beat (int, list or dict, following the layout)."""
    if isinstance(shape, data.ArrayLayout):
        width = Shape.cast(shape.elem_shape).width
        mask = (1 << width) - 1
        return [_decode(shape.elem_shape, (raw >> (k * width)) & mask) for k in range(shape.length)]
    if isinstance(shape, data.StructLayout):
        return {n: _decode(f.shape, (raw >> f.offset) & ((1 << f.width) - 1)) for n, f in shape}
    s = Shape.cast(shape)
    return raw - (1 << s.width) if s.signed and raw >> (s.width - 1) & 1 else raw


async def stream_put(ctx: object, stream: object, payload: object) -> None:
    """Send one beat on ``stream`` (a component's input): waits until it is taken."""
    ctx.set(Value.cast(stream.payload), _encode(stream.payload.shape(), payload))
    ctx.set(stream.valid, 1)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


async def stream_get(ctx: object, stream: object) -> object:
    """Receive one beat from ``stream`` (a component's output), as a Python value."""
    ctx.set(stream.ready, 1)
    (raw,) = await ctx.tick().sample(Value.cast(stream.payload)).until(stream.valid)
    ctx.set(stream.ready, 0)
    return _decode(stream.payload.shape(), raw)


def run_stream(
    component: wiring.Component,
    beats_in: Sequence[object],
    n_out: int,
    stall_in: float = 0.0,
    stall_out: float = 0.0,
    seed: int = 0,
    *,
    idle: int = 8,
    max_cycles: int | None = None,
    times: list[int] | None = None,
) -> tuple[list[object], int]:
    """Run ``component`` (members ``i``, ``o``) over ``beats_in``; returns (n_out beats, cycles).

    Each cycle the producer withholds ``valid`` with probability ``stall_in`` and the consumer
    withholds ``ready`` with probability ``stall_out`` (seeded, so a run replays). ``cycles``
    counts clock cycles up to and including the one in which the last output beat is taken.
    While an output beat waits (valid and not ready), it must stay valid and unchanged; after
    the last beat the output must stay idle (no extra beats) for ``idle`` cycles and until every
    input beat has been taken. ``times``, if given, receives the cycle number of each output
    beat. Raises AssertionError on a stream rule violation, or when the output stalls for
    ``max_cycles`` (default: generous).
    """
    in_shape, out_shape = component.i.payload.shape(), component.o.payload.shape()
    raws = [_encode(in_shape, b) for b in beats_in]
    i_payload, o_payload = Value.cast(component.i.payload), Value.cast(component.o.payload)
    if max_cycles is None:
        slack = 1.0 / max(0.05, 1.0 - max(stall_in, stall_out))
        max_cycles = int(2000 + 50 * slack * (len(raws) + n_out))
    rng_in, rng_out = random.Random(seed), random.Random(seed + 1)
    got: list[object] = []
    cycles, sent = [0], [0]

    async def producer(ctx):
        for raw in raws:
            while rng_in.random() < stall_in:
                await ctx.tick()
            ctx.set(i_payload, raw)
            ctx.set(component.i.valid, 1)
            taken = False
            while not taken:
                _, _, taken = await ctx.tick().sample(component.i.ready)
            ctx.set(component.i.valid, 0)
            sent[0] += 1

    async def consumer(ctx):
        waiting = None  # the raw payload of a beat offered but not taken
        cycle = 0
        while len(got) < n_out:
            assert cycle < max_cycles, f"no output after {cycle} cycles ({len(got)}/{n_out} beats)"
            ready = rng_out.random() >= stall_out
            ctx.set(component.o.ready, ready)
            _, _, valid, raw = await ctx.tick().sample(component.o.valid, o_payload)
            cycle += 1
            if waiting is not None:
                assert valid and raw == waiting, f"cycle {cycle}: a waiting output beat changed"
            waiting = raw if valid and not ready else None
            if valid and ready:
                got.append(_decode(out_shape, raw))
                if times is not None:
                    times.append(cycle)
        cycles[0] = cycle
        ctx.set(component.o.ready, 1)
        # Input that no output depends on (e.g. rows a stride skips) may still be arriving.
        k = 0
        while k < idle or sent[0] < len(raws):
            assert cycle < max_cycles, f"only {sent[0]} of {len(raws)} input beats were taken"
            _, _, valid = await ctx.tick().sample(component.o.valid)
            cycle, k = cycle + 1, k + 1
            assert not valid, f"extra output beat {k} cycles after the last expected one"

    top = Module()
    top.domains.sync = ClockDomain()  # also for purely combinational components
    top.submodules.dut = component
    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(producer, background=True)  # the consumer checks that it finished
    sim.add_testbench(consumer)
    sim.run()
    return got, cycles[0]
