"""Stream plumbing between layer engines, and simulation helpers that drive streams.

Hardware: ``WidthConverter`` (regroups lanes when one engine's PE differs from the next
engine's SIMD) and ``StreamFIFO`` (a synchronous FIFO with a registered output).
Payloads are ``data.ArrayLayout(shape, lanes)``, lane k at bits ``[k*bits, (k+1)*bits)``.

Simulation (Amaranth's simulator, async testbenches): ``stream_put`` / ``stream_get`` move one
beat, and ``run_stream`` runs a one-input, one-output component as a pure function over a list
of beats with random valid/ready stalls on both sides, checking the stream rules as it goes
(``run_streams`` likewise with several named inputs and outputs).
Beats are Python values: an int for a plain shape, a list for an ``ArrayLayout``, a dict for a
``StructLayout`` (nested as the layout is).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from amaranth import (
    Array,
    ClockDomain,
    Module,
    Mux,
    Shape,
    ShapeCastable,
    Signal,
    Value,
    unsigned,
)
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hwgen.errors import HwgenError
from hwgen.hw.rom import rom_banks


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


class RegisterSlice(wiring.Component):
    """One stream stage whose every output is a register: ``o.valid``, ``o.payload`` and
    ``i.ready`` (a skid buffer: a second entry takes the beat that arrives while the output
    waits, so a beat still moves every cycle). It cuts the combinational ready path between
    units the placer may put far apart.

    Members
    -------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))
    """

    def __init__(self, shape: ShapeCastable | Shape) -> None:
        self.shape = shape
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform: object) -> Module:
        m = Module()
        main = Signal.like(self.i.payload, name="main", reset_less=True)
        spare = Signal.like(self.i.payload, name="spare", reset_less=True)
        # spare_free rather than its complement: i.ready is the flip-flop itself.
        main_valid, spare_free = Signal(), Signal(init=1)
        take = self.i.valid & spare_free
        m.d.comb += [
            self.i.ready.eq(spare_free),
            self.o.valid.eq(main_valid),
            self.o.payload.eq(main),
        ]
        with m.If(~main_valid | self.o.ready):  # the output register is free this cycle
            m.d.sync += [
                main.eq(Mux(spare_free, self.i.payload, spare)),
                main_valid.eq(~spare_free | take),
                spare_free.eq(1),
            ]
        with m.Elif(take):  # it waits: the arriving beat goes to the spare
            m.d.sync += [spare.eq(self.i.payload), spare_free.eq(0)]
        return m


class StreamFIFO(wiring.Component):
    """A synchronous FIFO between two streams of payload ``shape``: ``depth`` beats of
    memory, then a read stage, a bank register stage and an output register, so it holds
    ``depth + 3`` beats.

    ``i.ready`` and ``o.valid`` are registers, so the FIFO also breaks the combinational
    ready/valid paths between the engines it separates; it moves one beat per cycle from
    ``depth`` 2 (at 1, every other cycle: a full memory takes no write while it is read).

    Timing. A block RAM's read data comes 5.8 ns after the clock on ECP5 unless the block's
    own output register is used. The memory is split by address into banks of one block-RAM
    row each (``hwgen.hw.rom.rom_banks``), each bank's read data goes straight into a
    register (``hwgen.netlist`` moves it into the block), and the bank select picks among
    those registers into the output register, which the placer puts between the blocks and
    the consumer. (Unbanked, a FIFO deeper than a block row had Yosys's address mux between
    its blocks and any register: a path through it, 47 tiles long, held ResNet-20 at
    90 MHz.) A beat is never read where it is being written (``rw_collision``), so each bank
    is marked ``no_rw_check``: Yosys adds no read-during-write bypass after it.

    Members
    -------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))

    Attributes
    ----------
    rw_collision : Signal
        High in a cycle that reads a beat from the address being written; never, by the
        flow control (tests watch it; synthesis removes it).
    """

    def __init__(self, shape: ShapeCastable | Shape, depth: int) -> None:
        _check_lanes("FIFO depth", depth)
        self.shape, self.depth = shape, depth
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})
        self.rw_collision = Signal()

    def elaborate(self, platform: object) -> Module:
        m = Module()
        depth, width = self.depth, Shape.cast(self.shape).width
        depths = rom_banks(width, depth, "block")
        low = max(1, (depths[0] - 1).bit_length())  # bank rows are a power of two
        count = Signal(range(depth + 1))  # beats in the memory
        produce, consume = Signal(range(depth)), Signal(range(depth))
        write = self.i.valid & self.i.ready
        # Read stage (r: the banks' read latches), bank registers (q), output register (o),
        # each taking a beat when the next is empty or takes its own.
        r_valid, q_valid = Signal(), Signal()
        move = ~self.o.valid | self.o.ready
        load_q = ~q_valid | move
        load_r = ~r_valid | load_q
        read = load_r & (count != 0)
        r_bank = Signal(range(len(depths)))
        q_bank = Signal(range(len(depths)))
        held = []
        for k, bank_depth in enumerate(depths):
            m.submodules[f"bank{k}"] = mem = Memory(
                shape=unsigned(width), depth=bank_depth, init=[], attrs={"no_rw_check": 1}
            )
            wr, rd = mem.write_port(), mem.read_port()
            q = Signal(width, name=f"bank{k}_reg", reset_less=True)
            m.d.comb += [
                wr.addr.eq(produce[:low]),
                wr.data.eq(self.i.payload),
                wr.en.eq(write & (produce[low:] == k)),  # one bank: an empty slice, == 0
                rd.addr.eq(consume[:low]),
                rd.en.eq(load_r),
            ]
            with m.If(load_q):
                m.d.sync += q.eq(rd.data)
            held.append(q)
        o_data = Signal(width, reset_less=True)
        m.d.comb += [
            self.i.ready.eq(count != depth),
            self.o.payload.eq(o_data),
            self.rw_collision.eq(read & write & (produce == consume)),
        ]
        with m.If(write):
            m.d.sync += produce.eq(Mux(produce == depth - 1, 0, produce + 1))
        with m.If(read):
            m.d.sync += consume.eq(Mux(consume == depth - 1, 0, consume + 1))
        m.d.sync += count.eq(count + write - read)
        with m.If(load_r):
            m.d.sync += [r_valid.eq(read), r_bank.eq(consume[low:])]
        with m.If(load_q):
            m.d.sync += [q_valid.eq(r_valid), q_bank.eq(r_bank)]
        with m.If(move):
            m.d.sync += [self.o.valid.eq(q_valid), o_data.eq(Array(held)[q_bank])]
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
    never: Sequence[Value] = (),
) -> tuple[list[object], int]:
    """Run ``component`` (members ``i``, ``o``) over ``beats_in``; returns (n_out beats, cycles).

    Each cycle the producer withholds ``valid`` with probability ``stall_in`` and the consumer
    withholds ``ready`` with probability ``stall_out`` (seeded, so a run replays). ``cycles``
    counts clock cycles up to and including the one in which the last output beat is taken.
    While an output beat waits (valid and not ready), it must stay valid and unchanged; after
    the last beat the output must stay idle (no extra beats) for ``idle`` cycles and until every
    input beat has been taken. ``times``, if given, receives the cycle number of each output
    beat. ``never``: one-bit signals (a unit's invariant flags) that must be 0 in every
    cycle. Raises AssertionError on a stream rule violation, a raised ``never`` flag, or when
    the output stalls for ``max_cycles`` (default: generous).
    """
    got, cycles = run_streams(
        component,
        {"i": beats_in},
        {"o": n_out},
        stall_in,
        stall_out,
        seed,
        idle=idle,
        max_cycles=max_cycles,
        times={"o": times} if times is not None else None,
        never=never,
    )
    return got["o"], cycles


def run_streams(
    component: wiring.Component,
    inputs: Mapping[str, Sequence[object]],
    outputs: Mapping[str, int],
    stall_in: float = 0.0,
    stall_out: float = 0.0,
    seed: int = 0,
    *,
    idle: int = 8,
    max_cycles: int | None = None,
    times: Mapping[str, list[int]] | None = None,
    never: Sequence[Value] = (),
) -> tuple[dict[str, list[object]], int]:
    """``run_stream`` for components with several input and output streams.

    ``inputs`` maps each input member's name to its beats, ``outputs`` each output member's
    name to the number of beats expected; every stream has its own random stalls (input k
    seeded ``seed + 2k``, output k ``seed + 2k + 1``). Returns the beats per output and the
    cycle in which the last output beat (of any output) was taken.
    """
    total_in = sum(len(b) for b in inputs.values())
    if max_cycles is None:
        slack = 1.0 / max(0.05, 1.0 - max(stall_in, stall_out))
        max_cycles = int(2000 + 50 * slack * (total_in + sum(outputs.values())))
    sent = [0]
    got: dict[str, list[object]] = {name: [] for name in outputs}
    last = [0]
    finished = [0]

    def producer(name: str, beats: Sequence[object], rng: random.Random):
        port = getattr(component, name)
        payload, shape = Value.cast(port.payload), port.payload.shape()
        raws = [_encode(shape, b) for b in beats]

        async def run(ctx):
            for raw in raws:
                while rng.random() < stall_in:
                    await ctx.tick()
                ctx.set(payload, raw)
                ctx.set(port.valid, 1)
                taken = False
                while not taken:
                    _, _, taken = await ctx.tick().sample(port.ready)
                ctx.set(port.valid, 0)
                sent[0] += 1

        return run

    def consumer(name: str, n_out: int, rng: random.Random):
        port = getattr(component, name)
        payload, shape = Value.cast(port.payload), port.payload.shape()
        out, stamps = got[name], (times or {}).get(name)

        async def run(ctx):
            waiting = None  # the raw payload of a beat offered but not taken
            cycle = 0
            while len(out) < n_out:
                assert cycle < max_cycles, (
                    f"no output after {cycle} cycles ({len(out)}/{n_out} beats on {name})"
                )
                ready = rng.random() >= stall_out
                ctx.set(port.ready, ready)
                _, _, valid, raw = await ctx.tick().sample(port.valid, payload)
                cycle += 1
                if waiting is not None:
                    assert valid and raw == waiting, f"cycle {cycle}: a waiting output beat changed"
                waiting = raw if valid and not ready else None
                if valid and ready:
                    out.append(_decode(shape, raw))
                    if stamps is not None:
                        stamps.append(cycle)
            last[0] = max(last[0], cycle)
            finished[0] += 1
            ctx.set(port.ready, 1)
            # Input that no output depends on (e.g. rows a stride skips) may still be arriving.
            k = 0
            while k < idle or sent[0] < total_in or finished[0] < len(outputs):
                assert cycle < max_cycles, f"only {sent[0]} of {total_in} input beats were taken"
                _, _, valid = await ctx.tick().sample(port.valid)
                cycle, k = cycle + 1, k + 1
                assert not valid, (
                    f"extra output beat on {name} {k} cycles after the last expected one"
                )

        return run

    async def watch(ctx):
        cycle = 0
        while True:
            values = await ctx.tick().sample(*never)
            cycle += 1
            raised = [
                getattr(v, "name", str(v)) for v, x in zip(never, values[2:], strict=True) if x
            ]
            assert not raised, f"cycle {cycle}: {', '.join(raised)} raised"

    top = Module()
    top.domains.sync = ClockDomain()  # also for purely combinational components
    top.submodules.dut = component
    sim = Simulator(top)
    sim.add_clock(1e-6)
    for k, (name, beats) in enumerate(inputs.items()):
        # Background: the consumers check that every producer finished.
        sim.add_testbench(producer(name, beats, random.Random(seed + 2 * k)), background=True)
    for k, (name, n_out) in enumerate(outputs.items()):
        sim.add_testbench(consumer(name, n_out, random.Random(seed + 2 * k + 1)))
    if never:
        sim.add_testbench(watch, background=True)
    sim.run()
    return got, last[0]
