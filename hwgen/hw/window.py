"""The sliding-window unit: raster pixels in, K_h x K_w windows out, with stride and zero padding.

Input: the feature map in H,W,C order, ``lanes`` channels per beat (``G = C / lanes`` beats per
pixel), images back to back. Output, for each output pixel in raster order, ``repeats`` times
(one per neuron fold of the MAC unit), the window in order (kh, kw, channel group):
``K_h * K_w * G`` beats, padding positions as zeros, ``last`` on the final beat of each
repetition. A dense layer is the 1x1 case: the unit holds one vector and replays it.

Zero-block skipping (hwgen.hw.sparse): with a ``schedule``, repetition ``nf`` emits only the
beats ``schedule[nf]`` (indices ``(kh * K_w + kw) * G + g`` into the window order), ``last``
on its final one. The beats of all repetitions are one constant table (LUT ROM, a few bits
per entry: kh, kw, g and two end flags) walked by a pointer; the table entry is registered
into the position counters, so the address logic after them is the dense unit's. Chosen over
selecting the scheduled beats from a fully registered window, which would hold
``K_h * K_w * G`` beats of registers and a mux as wide in every unit. A schedule that skips
nothing builds the dense unit.

Buffering. Input rows go round-robin into ``K_h + S_h`` row slots of one ``Memory`` (``W * G``
words each): the K_h rows a window row reads plus the S_h rows the next window row adds, so
the input keeps flowing while windows are emitted. Two row-granular counters do the flow
control, one register between them: ``ahead`` = rows completely written minus the first row
the reader still needs (image-absolute, so consecutive images need no reset). The writer may
write while ``ahead < K_h + S_h`` (its slot is free); the reader may emit an output pixel
while ``ahead`` covers that pixel's rows. When the upstream delivers S_h rows at least as fast
as the unit emits one window row, the output is valid on every cycle once the first window
is complete.

Timing (for Fmax). The reader is pipelined: a position counter stage runs one beat ahead and
registers each beat's read address, padding flag and flow-control numbers (rows it needs,
rows its issue frees) through a register slice, so the issue decision is a lookup of
registered flags, the counters never wait on it, and the memory address comes straight from
a register. The input comes through a register slice, so the writer's decisions start from
registers; it takes a beat while ``room`` (``ahead < K_h + S_h``, computed a cycle early) is
set, a register as is ``ahead >= k`` for each k the issue may need: compares of ``ahead``
with constants, one set per value the issue's freed rows take. The read happens in the
issuing cycle, so a row is never freed before its last read. The memory output (slow on
FPGAs) goes straight into the output register, the padding mux after it. One enable moves
issue, read and output register together, so a stalled output beat holds steady. Fill
latency: the first window is emitted once ``max(K_h - P_h, 1)`` rows are written (plus 4
cycles); from then on the output moves one beat per cycle unless the downstream stalls or
the input falls behind.
"""

from __future__ import annotations

from amaranth import Array, C, Module, Mux, Shape, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.sparse import Schedule, is_dense
from hwgen.hw.streams import RegisterSlice

LUT_RAM_MAX_DEPTH = 128  # deeper row buffers go in block RAM
# Schedule tables of at most this many entries are LUT ROMs: in a block RAM, the table's
# 5.8 ns clock-to-out before the position logic set the digits network's Fmax (132 MHz).
LOGIC_TABLE_MAX = 1024


def _positive(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HwgenError(f"sliding window: {what} must be a positive integer, not {value!r}")
    return value


def _pair(what: str, value: object, lo: int) -> tuple[int, int]:
    ok = isinstance(value, tuple) and len(value) == 2
    if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in value):
        raise HwgenError(
            f"sliding window: {what} must be a pair of integers >= {lo}, not {value!r}"
        )
    return value


def window_layout(shape: Shape, lanes: int) -> data.StructLayout:
    """The payload of the window stream: ``lanes`` values and the end-of-repetition flag."""
    return data.StructLayout({"data": data.ArrayLayout(shape, lanes), "last": 1})


class SlidingWindow(wiring.Component):
    """Line-buffered sliding window over a (C, H, W) map streamed in H,W,C order.

    Parameters
    ----------
    channels, height, width : int
        The input map C, H, W.
    kernel, stride, padding : tuple[int, int]
        (rows, columns); zeros inserted on each side, any amount (windows wholly in the
        padding come out as zeros).
    lanes : int
        Channels per beat, in and out; divides ``channels``.
    shape : Shape
        One value, ``signed(bits)`` or ``unsigned(bits)``.
    repeats : int
        How many times each output pixel's window is emitted.
    schedule : tuple of tuple of int, optional
        Per repetition, the window beats it emits (``hwgen.hw.sparse.Schedule``); None (or
        the full window for every repetition) emits every beat.

    Members
    -------
    i : In(stream.Signature(data.ArrayLayout(shape, lanes)))
        The input map, ``channels / lanes`` beats per pixel.
    o : Out(stream.Signature(window_layout(shape, lanes)))
        The windows: ``data`` and ``last`` (final beat of a repetition).

    Attributes
    ----------
    rw_collision : Signal
        High in a cycle whose issued non-padding beat reads the address being written. The
        flow control never lets it rise, and on that promise the row buffer is marked
        ``no_rw_check`` (Yosys then adds no read-during-write bypass in front of the block
        RAM's output register); tests watch it. Nothing reads it, so synthesis removes it.
    """

    def __init__(
        self,
        *,
        channels: int,
        height: int,
        width: int,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        lanes: int,
        shape: Shape,
        repeats: int = 1,
        schedule: Schedule | None = None,
    ) -> None:
        for what, v in (
            ("channels", channels),
            ("height", height),
            ("width", width),
            ("lanes", lanes),
            ("repeats", repeats),
        ):
            _positive(what, v)
        kernel, stride = _pair("kernel", kernel, 1), _pair("stride", stride, 1)
        padding = _pair("padding", padding, 0)
        if channels % lanes:
            raise HwgenError(f"sliding window: lanes {lanes} must divide channels {channels}")
        for axis, k, p, n in (
            ("rows", kernel[0], padding[0], height),
            ("columns", kernel[1], padding[1], width),
        ):
            if k > n + 2 * p:
                raise HwgenError(
                    f"sliding window: kernel {k} is larger than the padded input {n + 2 * p} "
                    f"({axis})"
                )
        self.channels, self.height, self.width = channels, height, width
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.lanes, self.shape, self.repeats = lanes, shape, repeats
        self.groups = channels // lanes
        self.out_height = (height + 2 * padding[0] - kernel[0]) // stride[0] + 1
        self.out_width = (width + 2 * padding[1] - kernel[1]) // stride[1] + 1
        self.slots = kernel[0] + stride[0]
        self.schedule = self._check_schedule(schedule)
        self.depth = self.slots * width * self.groups
        super().__init__(
            {
                "i": In(stream.Signature(data.ArrayLayout(shape, lanes))),
                "o": Out(stream.Signature(window_layout(shape, lanes))),
            }
        )
        self.rw_collision = Signal()

    def _check_schedule(self, schedule: Schedule | None) -> Schedule | None:
        """The schedule as tuples, or None when it skips nothing."""
        if schedule is None:
            return None
        beats = self.kernel[0] * self.kernel[1] * self.groups

        def ok(s: object) -> bool:
            return (
                isinstance(s, (tuple, list))
                and len(s) > 0
                and len(set(s)) == len(s)
                and all(
                    not isinstance(v, bool) and isinstance(v, int) and 0 <= v < beats for v in s
                )
            )

        rows = isinstance(schedule, (tuple, list)) and len(schedule) == self.repeats
        if not (rows and all(ok(s) for s in schedule)):
            raise HwgenError(
                f"sliding window: schedule must give each of the {self.repeats} repetitions "
                f"distinct beats in [0, {beats}), at least one, not {schedule!r}"
            )
        schedule = tuple(tuple(s) for s in schedule)
        return None if is_dense(schedule, beats) else schedule

    def _table(self, m: Module) -> tuple[data.StructLayout, list[dict[str, int]], Value]:
        """The schedule as one constant table, repetitions back to back: its entry layout,
        its entries and its (combinational) read port."""
        kh, kw, g_n = self.kernel[0], self.kernel[1], self.groups
        layout = data.StructLayout(
            {
                "a": range(kh),
                "b": range(kw),
                "g": range(g_n),
                "end_rep": 1,
                "end_pixel": 1,
            }
        )
        entries = []
        for nf, beats in enumerate(self.schedule):
            for j, beat in enumerate(beats):
                a, rest = divmod(beat, kw * g_n)
                end_rep = int(j == len(beats) - 1)
                entries.append(
                    {
                        "a": a,
                        "b": rest // g_n,
                        "g": rest % g_n,
                        "end_rep": end_rep,
                        "end_pixel": int(end_rep and nf == self.repeats - 1),
                    }
                )
        style = "logic" if len(entries) <= LOGIC_TABLE_MAX else "block"
        m.submodules.schedule = table = Memory(
            shape=layout, depth=len(entries), init=entries, attrs={"rom_style": style}
        )
        return layout, entries, table.read_port(domain="comb")

    def elaborate(self, platform: object) -> Module:
        m = Module()
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        h, w, g_n, nr = self.height, self.width, self.groups, self.slots
        row_words = w * g_n
        width = Shape.cast(self.i.payload.shape()).width
        # A shallow buffer goes in LUT RAM: a block RAM's read (5.8 ns clock-to-out on ECP5)
        # would be the design's slowest path while holding mostly nothing.
        style = "distributed" if self.depth <= LUT_RAM_MAX_DEPTH else "block"
        # no_rw_check: a row is never read while it is written (rw_collision)
        m.submodules.mem = mem = Memory(
            shape=unsigned(width),
            depth=self.depth,
            init=[],
            attrs={"ram_style": style, "no_rw_check": 1},
        )
        wr = mem.write_port()
        rd = mem.read_port()

        # Rows completely written minus the first row the reader needs (image-absolute).
        ahead = Signal(range(-h - 2, nr + 2))

        # Writer: raster order is address order, wrapping around the row slots. The input
        # comes through a register slice: the beat's valid, from a producer perhaps across
        # the chip, decides the row written and so the flags below (a width converter's
        # valid 40 tiles away, then four logic levels: 84.4 MHz on ResNet-20).
        m.submodules.input = inp = RegisterSlice(self.i.payload.shape())
        wiring.connect(m, wiring.flipped(self.i), inp.i)
        waddr = Signal(range(self.depth))
        wcol = Signal(range(row_words))
        w_fire = inp.o.valid & inp.o.ready
        row_written = Signal()
        # ahead < nr, a register (ahead's next value compared a cycle early): the input
        # slice's ready (from ahead's carry-chain compare, the window's ready was ResNet-20's
        # critical path at 87.65 MHz).
        room = Signal(init=1)
        m.d.comb += [
            inp.o.ready.eq(room),
            wr.addr.eq(waddr),
            wr.data.eq(inp.o.payload),
            wr.en.eq(w_fire),
            row_written.eq(w_fire & (wcol == row_words - 1)),
        ]
        with m.If(w_fire):
            m.d.sync += [
                waddr.eq(Mux(waddr == self.depth - 1, 0, waddr + 1)),
                wcol.eq(Mux(wcol == row_words - 1, 0, wcol + 1)),
            ]

        # The reader is two stages so the flow-control check and the memory address are each
        # one short step from a register. The position counters walk the window: repetition,
        # kh (a), kw (b), group (g) within output pixel (oy, ox); top/left are the window's
        # first input row/column, slot_top the slot of row top. The issue register (the
        # register slice ``issue``) holds an earlier position as a beat ready to issue: its
        # read address, padding and flow-control numbers. The counters depend on nothing
        # else, so they run ahead and move whenever the slice has room for their beat.
        if self.schedule is None:
            rep = Signal(range(self.repeats))
            a, b, g = Signal(range(kh)), Signal(range(kw)), Signal(range(g_n))
        else:
            # The position comes from the schedule table: ``step`` holds the current entry,
            # ``following`` the next one (read a cycle early: the table's read meets only a
            # register), ``nxt`` addresses the one after that.
            layout, entries, port = self._table(m)
            n = len(entries)
            step = Signal(layout, init=entries[0])
            following = Signal(layout, init=entries[1 % n])
            nxt = Signal(range(n), init=2 % n)
            m.d.comb += port.addr.eq(nxt)
            a, b, g = step.a, step.b, step.g
        ox, oy = Signal(range(self.out_width)), Signal(range(self.out_height))
        top = Signal(signed(max(h, ph, sh).bit_length() + 2), init=-ph)
        left = Signal(signed(max(w, pw, sw).bit_length() + 2), init=-pw)
        slot_top = Signal(range(nr), init=(-ph) % nr)

        row, col = top + a, left + b
        pad = (row < 0) | (row >= h) | (col < 0) | (col >= w)
        slot_sum = slot_top + a
        slot = Mux(slot_sum >= nr, slot_sum - nr, slot_sum)
        if self.schedule is None:
            end_rep = (g == g_n - 1) & (b == kw - 1) & (a == kh - 1)
            end_pixel = end_rep & (rep == self.repeats - 1)
        else:
            end_rep, end_pixel = step.end_rep, step.end_pixel
        end_row = end_pixel & (ox == self.out_width - 1)
        end_image = end_row & (oy == self.out_height - 1)

        # Rows of window row oy that exist in the image (the rest is padding), and how far the
        # first needed row moves once that window row (or, for the last, the image) is done:
        # constants per oy, looked up rather than computed from ``top`` (that carry-chain
        # arithmetic was the digits network's slowest path). A window row wholly in the
        # padding (padding >= kernel) reads no row but still waits for its image's first row
        # (above the image) or last row (below): it must not be emitted before its image.
        need_of, free_of = [], []
        for y in range(self.out_height):
            t = y * sh - ph
            lo, hi = min(max(t, 0), h - 1), min(t + kh - 1, h - 1)
            need_of.append(1 if hi < lo else hi - lo + 1)
            last = y == self.out_height - 1
            free_of.append(h - lo if last else min(max(t + sh, 0), h - 1) - lo)
        need = Array(C(n, range(kh + 1)) for n in need_of)[oy]
        free = Array(C(n, range(h + 1)) for n in free_of)[oy]
        # The few values free takes (0 first: the beats that end no window row), and which of
        # them each window row's end frees: the flags below are looked up per value.
        frees = sorted({0, *free_of})
        free_idx = Array(C(frees.index(n), range(len(frees))) for n in free_of)[oy]

        # The issue register holds a beat's read address, padding and flow-control numbers:
        # need, the rows of its window row that must be written, and free, the rows its
        # issue releases (at a window row's end). The counters hand it their beat through a
        # register slice, so they move on a register (the slice has room), not on the issue
        # decision: that carry-chain compare into the counters' enables, eight logic levels,
        # was ResNet-20's critical path at 92.8 MHz.
        beat = data.StructLayout(
            {
                "pad": 1,
                "last": 1,
                "addr": len(rd.addr),
                "need": range(kh + 1),
                "free": range(h + 1),
                "free_idx": range(len(frees)),
            }
        )
        m.submodules.issue = cut = RegisterSlice(beat)
        iss, iss_valid = cut.o.payload, cut.o.valid
        iss_pad, iss_last, iss_addr = iss.pad, iss.last, iss.addr

        # Issue -> memory read (r) -> output register (o), one enable for the whole pipeline:
        # everything holds while an output beat waits.
        r_valid, r_pad, r_last = Signal(), Signal(), Signal()
        advance = ~self.o.valid | self.o.ready
        # ge[k]: ahead >= k, a register like room (below): the issue decision is a lookup.
        ge = Signal(kh + 1, init=1)
        issue = advance & iss_valid & ge.bit_select(iss.need, 1)
        load = cut.i.ready  # the counters' beat goes into the slice
        m.d.comb += [
            cut.i.valid.eq(1),
            cut.i.payload.pad.eq(pad),
            cut.i.payload.last.eq(end_rep),
            cut.i.payload.addr.eq(slot * row_words + col.as_unsigned() * g_n + g),
            cut.i.payload.need.eq(need),
            cut.i.payload.free.eq(Mux(end_row, free, 0)),
            cut.i.payload.free_idx.eq(Mux(end_row, free_idx, 0)),
            cut.o.ready.eq(issue),
        ]
        m.d.comb += [
            # Read in the issuing cycle: a row is freed no earlier than its last read.
            rd.addr.eq(iss_addr),
            rd.en.eq(advance),
            self.rw_collision.eq(issue & ~iss_pad & w_fire & (waddr == iss_addr)),
        ]
        # The output register takes the read data alone (reset-less, no logic before it), so
        # on ECP5 it becomes the block RAM's own output register (hwgen.netlist); padding
        # zeroes it after (the MAC unit registers it at once, a pool unit after its compare).
        o_data = Signal.like(rd.data, reset_less=True)
        o_pad = Signal()
        m.d.comb += self.o.payload.data.eq(Mux(o_pad, 0, o_data))
        with m.If(advance):
            m.d.sync += [
                r_valid.eq(issue),
                r_pad.eq(iss_pad),
                r_last.eq(iss_last),
                self.o.valid.eq(r_valid),
                o_data.eq(rd.data),
                o_pad.eq(r_pad),
                self.o.payload.last.eq(r_last),
            ]
        # ahead's next value is (ahead, less the issue's free if it issues) plus the row
        # written. room and ge are compares of ahead with constants, one set per value free
        # takes (ahead - f < n is ahead < n + f), looked up by the issue's free (none unless
        # it issues) and then the row written: no adder before them. (ahead's adder, compare
        # and the issue compare in one path were ResNet-20's critical path at 83.56 MHz;
        # ahead less the issue's free, then the compares, at 97.6 MHz.)
        m.d.sync += ahead.eq(Mux(issue, ahead - iss.free, ahead) + row_written)

        def flags(f: int) -> list[Value]:
            """room, ge[0..kh] for ``ahead - f + row_written``."""
            return [Mux(row_written, ahead < nr - 1 + f, ahead < nr + f)] + [
                Mux(row_written, ahead >= k - 1 + f, ahead >= k + f) for k in range(kh + 1)
            ]

        which = Mux(issue, iss.free_idx, 0)
        for flag, per_free in zip([room, *ge], zip(*map(flags, frees), strict=True), strict=True):
            m.d.sync += flag.eq(Array(per_free)[which])

        def wrap_add(value, n):
            total = value + n
            return Mux(total >= nr, total - nr, total)

        with m.If(load):
            if self.schedule is None:
                m.d.sync += g.eq(Mux(g == g_n - 1, 0, g + 1))
                with m.If(g == g_n - 1):
                    m.d.sync += b.eq(Mux(b == kw - 1, 0, b + 1))
                    with m.If(b == kw - 1):
                        m.d.sync += a.eq(Mux(a == kh - 1, 0, a + 1))
                with m.If(end_rep):
                    m.d.sync += rep.eq(Mux(rep == self.repeats - 1, 0, rep + 1))
            else:
                m.d.sync += [step.eq(following), following.eq(port.data)]
                m.d.sync += nxt.eq(Mux(nxt == n - 1, 0, nxt + 1))
            with m.If(end_pixel):
                m.d.sync += [
                    ox.eq(Mux(end_row, 0, ox + 1)),
                    left.eq(Mux(end_row, -pw, left + sw)),
                ]
            with m.If(end_image):
                # The next image's first window row: top = -ph, (h - (OH-1)*sh) rows further.
                m.d.sync += [
                    oy.eq(0),
                    top.eq(-ph),
                    slot_top.eq(wrap_add(slot_top, (h - (self.out_height - 1) * sh) % nr)),
                ]
            with m.Elif(end_row):
                m.d.sync += [oy.eq(oy + 1), top.eq(top + sh), slot_top.eq(wrap_add(slot_top, sh))]
        return m
