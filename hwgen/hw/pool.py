"""Pooling and ReLU engines: ``lanes`` channels per beat in and out, same format in and out.

``MaxPool`` and ``AvgPool`` put a ``SlidingWindow`` (no padding, one repetition) in front of a
reducer. The window arrives in order (kh, kw, channel group), so the reducer keeps one partial
result per channel group in a memory of ``C / lanes`` entries: each beat reads its group's
entry, combines it with the beat and writes the result back; on the window's last (kh, kw)
the result leaves instead. Average pooling (power-of-two area only)
is ``round(sum / area)`` in the format's rounding, e.g. ``(sum + area/2) >> log2(area)`` for
``half_up``: ``hwgen.hw.requant.round_shift`` (docs/hwq-format.md §3).
``GlobalAvgPoolEngine`` is the reducer alone over the whole map (no window needed).
"""

from __future__ import annotations

from amaranth import Module, Mux, Shape, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.requant import round_shift
from hwgen.hw.streams import RegisterSlice
from hwgen.hw.window import SlidingWindow
from hwgen.ir import ROUNDINGS


class _Pool(wiring.Component):
    """A pool engine: sliding window + per-group reducer.

    Subclasses define the reduction: ``_acc_shape()`` (one partial result), ``_combine(acc, x)``
    and ``_finish(acc)`` (the output value).

    Parameters
    ----------
    channels, height, width : int
        The input map C, H, W.
    kernel, stride : tuple[int, int]
        (rows, columns); no padding.
    lanes : int
        Channels per beat; divides ``channels``.
    shape : Shape
        One value, ``signed(bits)`` or ``unsigned(bits)``, in and out.
    direct : bool
        No sliding window: the kernel is the whole map, whose raster order already is the
        reducer's order.

    Members
    -------
    i : In(stream.Signature(data.ArrayLayout(shape, lanes)))
        The input map in H,W,C order.
    o : Out(stream.Signature(data.ArrayLayout(shape, lanes)))
        The pooled map in H,W,C order.
    """

    def __init__(
        self,
        *,
        channels: int,
        height: int,
        width: int,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        lanes: int,
        shape: Shape,
        direct: bool = False,
    ) -> None:
        # Built here so bad parameters raise at construction.
        self.window = (
            None
            if direct
            else SlidingWindow(
                channels=channels,
                height=height,
                width=width,
                kernel=kernel,
                stride=stride,
                padding=(0, 0),
                lanes=lanes,
                shape=shape,
            )
        )
        if direct and (
            isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1 or channels % lanes
        ):
            raise HwgenError(f"global pool: lanes must divide channels {channels}, not {lanes!r}")
        self.kernel, self.lanes, self.shape = kernel, lanes, Shape.cast(shape)
        self.groups = channels // lanes
        super().__init__(
            {
                "i": In(stream.Signature(data.ArrayLayout(shape, lanes))),
                "o": Out(stream.Signature(data.ArrayLayout(shape, lanes))),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        if self.window is None:
            win = self.i
        else:
            m.submodules.window = window = self.window
            wiring.connect(m, wiring.flipped(self.i), window.i)
            win = window.o
        values = win.payload if self.window is None else win.payload.data

        area = self.kernel[0] * self.kernel[1]
        pos = Signal(range(area))  # window position (kh, kw) of the next beat
        g = Signal(range(self.groups))
        m.submodules.out = out = RegisterSlice(data.ArrayLayout(self.shape, self.lanes))
        wiring.connect(m, out.o, wiring.flipped(self.o))

        # Two stages. A beat is taken into registers while its group's partial result is read
        # (synchronously: the read address is the register ``g``); the next cycle combines the
        # two, writes the result back and, on the window's last position, hands it to the
        # output slice. Read, bank mux and adder in one cycle was ResNet-20's critical path
        # (11.2 ns). Two beats in a row of the same group (one group only) meet in the memory:
        # then the read passes the write through.
        m.submodules.accs = accs = Memory(
            shape=data.ArrayLayout(self._acc_shape(), self.lanes), depth=self.groups, init=[]
        )
        wr = accs.write_port()
        rd = accs.read_port(transparent_for=(wr,) if self.groups == 1 else ())
        held = Signal.like(values, reset_less=True)
        held_valid, held_first, held_final = Signal(), Signal(), Signal()
        held_g = Signal.like(g)
        new = [
            Mux(held_first, held[k], self._combine(rd.data[k], held[k])) for k in range(self.lanes)
        ]
        # The held beat waits only for room in the output slice (whose ready is a register).
        stall = held_valid & held_final & ~out.i.ready
        fire = win.valid & win.ready
        m.d.comb += [
            win.ready.eq(~stall),
            rd.addr.eq(g),
            rd.en.eq(fire),
            wr.addr.eq(held_g),
            wr.en.eq(held_valid & ~stall),
            out.i.valid.eq(held_valid & held_final),
        ]
        m.d.comb += [wr.data[k].eq(new[k]) for k in range(self.lanes)]
        m.d.comb += [out.i.payload[k].eq(self._finish(new[k])) for k in range(self.lanes)]
        with m.If(~stall):
            m.d.sync += held_valid.eq(fire)
        with m.If(fire):
            m.d.sync += [
                held.eq(values),
                held_first.eq(pos == 0),
                held_final.eq(pos == area - 1),
                held_g.eq(g),
                g.eq(Mux(g == self.groups - 1, 0, g + 1)),
            ]
            with m.If(g == self.groups - 1):
                m.d.sync += pos.eq(Mux(pos == area - 1, 0, pos + 1))
        return m


class MaxPool(_Pool):
    """Max pooling, exact (parameters and members as ``_Pool``)."""

    def _acc_shape(self) -> Shape:
        return self.shape

    def _combine(self, acc: object, x: object) -> object:
        return Mux(x > acc, x, acc)

    def _finish(self, acc: object) -> object:
        return acc


class AvgPool(_Pool):
    """Average pooling over a power-of-two area (parameters and members as ``_Pool``, plus
    ``rounding``: the rounding of the format, one of ``hwgen.ir.ROUNDINGS``)."""

    def __init__(
        self, *, kernel: tuple[int, int], rounding: str = "half_up", **kwargs: object
    ) -> None:
        super().__init__(kernel=kernel, **kwargs)
        area = kernel[0] * kernel[1]
        if area & (area - 1):
            raise HwgenError(
                f"average pool: window area {area} ({kernel[0]}x{kernel[1]}) is not a power of two"
            )
        if rounding not in ROUNDINGS:
            raise HwgenError(
                f"average pool: rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}"
            )
        self.log2_area, self.rounding = area.bit_length() - 1, rounding

    def _acc_shape(self) -> Shape:
        # The sum of ``area`` values needs log2(area) more bits (+1 for the rounding add).
        return Shape(self.shape.width + self.log2_area + 1, self.shape.signed)

    def _combine(self, acc: object, x: object) -> object:
        return acc + x

    def _finish(self, acc: object) -> object:
        if self.log2_area == 0:
            return acc
        return round_shift(acc, self.log2_area, self.rounding)


class GlobalAvgPoolEngine(AvgPool):
    """Average over the whole map (H*W a power of two), rounded in ``rounding``:
    (C, H, W) -> (C, 1, 1).

    The input already arrives in the reducer's order (pixel, channel group), so there is no
    sliding window: the engine is the reducer alone, ``C / lanes`` partial sums and one adder
    per lane.
    """

    def __init__(
        self,
        *,
        channels: int,
        height: int,
        width: int,
        lanes: int,
        shape: Shape,
        rounding: str = "half_up",
    ) -> None:
        super().__init__(
            channels=channels,
            height=height,
            width=width,
            kernel=(height, width),
            stride=(height, width),
            lanes=lanes,
            shape=shape,
            direct=True,
            rounding=rounding,
        )


class ReLUEngine(wiring.Component):
    """``max(x, 0)`` per lane, same format; one registered stage.

    Members
    -------
    i : In(stream.Signature(data.ArrayLayout(shape, lanes)))
    o : Out(stream.Signature(data.ArrayLayout(shape, lanes)))
    """

    def __init__(self, *, shape: Shape, lanes: int) -> None:
        if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
            raise HwgenError(f"ReLU engine: lanes must be a positive integer, not {lanes!r}")
        self.shape, self.lanes = Shape.cast(shape), lanes
        super().__init__(
            {
                "i": In(stream.Signature(data.ArrayLayout(shape, lanes))),
                "o": Out(stream.Signature(data.ArrayLayout(shape, lanes))),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += self.o.valid.eq(1)
            for k in range(self.lanes):
                x = self.i.payload[k]
                m.d.sync += self.o.payload[k].eq(Mux(x < 0, 0, x))
        return m
