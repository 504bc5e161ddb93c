"""Residual-network engines: the add engine, the option-A shortcut engine and the stream fork.

``AddEngine`` sums two streams lane by lane exactly as ``hwgen.golden.add_forward``: both
inputs shifted left to ``F = max(frac_a, frac_b)`` (constant shifts, wiring only), one exact
adder, then the shared requantiser (rounding in the output format's mode, saturation, fused
ReLU floor).

``SubsamplePadEngine`` is the option-A ResNet shortcut (``x[:, ::sh, ::sw]`` plus zero
channels) as its own engine rather than a 1x1 stride-2 convolution with 0/1 weights: it needs
no weight ROM, no multiplier lanes and no line buffer, only pixel counters and a mux between
the input and zero, and it moves one output beat per cycle.

``Fork`` sends each beat of one stream to several consumers. It is eager: each output keeps
an "already taken" flag, so a consumer that is ready takes the beat at once and the others
take it later; the input beat is released when every output has taken it. An output's
``valid`` never depends on another output's ``ready``, so it cannot drop before its transfer.
Each output then goes through a ``RegisterSlice``, so every output of the fork is a register.
"""

from __future__ import annotations

from amaranth import Module, Mux, Shape, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.requant import Requantizer, act_shape
from hwgen.hw.streams import RegisterSlice
from hwgen.ir import ActFormat, add_frac, add_range, signed_bits


def _positive(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HwgenError(f"{what} must be a positive integer, not {value!r}")
    return value


class AddEngine(wiring.Component):
    """Lane-wise ``sat(round((a·2^(F-fa) + b·2^(F-fb)) · 2^-(F-fo)))``, one registered stage;
    rounded in ``out_format.rounding``.

    A beat moves when both inputs are valid and the output register is free (or leaving);
    both inputs are taken in the same cycle.

    Parameters
    ----------
    fmt_a, fmt_b : ActFormat
        The input formats.
    out_format : ActFormat
        The output format, with its rounding.
    relu : bool
        Fused ReLU: the lower saturation bound is 0.
    lanes : int
        Values per beat on every stream.

    Members
    -------
    a : In(stream.Signature(data.ArrayLayout(act_shape(fmt_a), lanes)))
    b : In(stream.Signature(data.ArrayLayout(act_shape(fmt_b), lanes)))
    o : Out(stream.Signature(data.ArrayLayout(act_shape(out_format), lanes)))
    """

    def __init__(
        self,
        *,
        fmt_a: ActFormat,
        fmt_b: ActFormat,
        out_format: ActFormat,
        relu: bool,
        lanes: int,
    ) -> None:
        _positive("add engine lanes", lanes)
        self.fmt_a, self.fmt_b, self.out_format = fmt_a, fmt_b, out_format
        self.relu, self.lanes = relu, lanes
        super().__init__(
            {
                "a": In(stream.Signature(data.ArrayLayout(act_shape(fmt_a), lanes))),
                "b": In(stream.Signature(data.ArrayLayout(act_shape(fmt_b), lanes))),
                "o": Out(stream.Signature(data.ArrayLayout(act_shape(out_format), lanes))),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        f = add_frac(self.fmt_a, self.fmt_b)
        ka, kb = f - self.fmt_a.frac, f - self.fmt_b.frac
        bits = signed_bits(*add_range(self.fmt_a, self.fmt_b))
        fire = self.a.valid & self.b.valid & (~self.o.valid | self.o.ready)
        m.d.comb += [self.a.ready.eq(fire), self.b.ready.eq(fire)]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(fire):
            m.d.sync += self.o.valid.eq(1)
        for k in range(self.lanes):
            rq = Requantizer(bits, f - self.out_format.frac, self.out_format, self.relu)
            m.submodules[f"requant{k}"] = rq
            m.d.comb += rq.i.eq((self.a.payload[k] << ka) + (self.b.payload[k] << kb))
            with m.If(fire):
                m.d.sync += self.o.payload[k].eq(rq.o)
        return m


class SubsamplePadEngine(wiring.Component):
    """The option-A shortcut: keep pixels on the stride grid, zero channels around them.

    For each input pixel (y, x) with ``y % sh == 0`` and ``x % sw == 0`` the output is
    ``before / lanes`` zero beats, the pixel's ``C / lanes`` beats, ``after / lanes`` zero
    beats; the other pixels' beats are taken and dropped. The output is registered.

    Parameters
    ----------
    channels, height, width : int
        The input map C, H, W.
    stride : tuple[int, int]
    pad : tuple[int, int]
        Zero channels before and after the input channels.
    lanes : int
        Values per beat; divides ``before``, ``channels`` and ``after``.
    shape : Shape

    Members
    -------
    i : In(stream.Signature(data.ArrayLayout(shape, lanes)))
    o : Out(stream.Signature(data.ArrayLayout(shape, lanes)))
    """

    def __init__(
        self,
        *,
        channels: int,
        height: int,
        width: int,
        stride: tuple[int, int],
        pad: tuple[int, int],
        lanes: int,
        shape: Shape,
    ) -> None:
        for what, v in (("channels", channels), ("height", height), ("width", width)):
            _positive(f"subsample-pad {what}", v)
        _positive("subsample-pad lanes", lanes)
        for what, v in (("channels", channels), ("zero channels before", pad[0])):
            if v % lanes:
                raise HwgenError(f"subsample-pad: lanes {lanes} must divide {what} {v}")
        if pad[1] % lanes:
            raise HwgenError(
                f"subsample-pad: lanes {lanes} must divide zero channels after {pad[1]}"
            )
        self.channels, self.height, self.width = channels, height, width
        self.stride, self.pad, self.lanes, self.shape = stride, pad, lanes, Shape.cast(shape)
        super().__init__(
            {
                "i": In(stream.Signature(data.ArrayLayout(shape, lanes))),
                "o": Out(stream.Signature(data.ArrayLayout(shape, lanes))),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        (sh, sw), n = self.stride, self.lanes
        before, groups, after = self.pad[0] // n, self.channels // n, self.pad[1] // n
        total = before + groups + after
        # Input position: channel group, column, row and their phases on the stride grid.
        g = Signal(range(groups))
        x, y = Signal(range(self.width)), Signal(range(self.height))
        xm, ym = Signal(range(sw)), Signal(range(sh))
        kept = (xm == 0) & (ym == 0)
        j = Signal(range(total))  # output beat within the kept pixel
        zero_before = j < before
        in_data = (j >= before) & (j < before + groups)
        zero_after = j >= before + groups

        advance = ~self.o.valid | self.o.ready
        # Leading zeros wait for the pixel's first beat: no output for an image not yet begun.
        emit = advance & (((zero_before | in_data) & kept & self.i.valid) | zero_after)
        # Beats of dropped pixels leave at once; kept ones as their output beat is emitted.
        m.d.comb += self.i.ready.eq(~kept | (in_data & advance))
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(emit):
            m.d.sync += [
                self.o.valid.eq(1),
                self.o.payload.eq(Mux(in_data, self.i.payload.as_value(), 0)),
                j.eq(Mux(j == total - 1, 0, j + 1)),
            ]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += g.eq(Mux(g == groups - 1, 0, g + 1))
            with m.If(g == groups - 1):
                m.d.sync += [
                    x.eq(Mux(x == self.width - 1, 0, x + 1)),
                    xm.eq(Mux((x == self.width - 1) | (xm == sw - 1), 0, xm + 1)),
                ]
                with m.If(x == self.width - 1):
                    m.d.sync += [
                        y.eq(Mux(y == self.height - 1, 0, y + 1)),
                        ym.eq(Mux((y == self.height - 1) | (ym == sh - 1), 0, ym + 1)),
                    ]
        return m


class Fork(wiring.Component):
    """One stream to ``n`` consumers, every beat to each, eagerly (see the module docstring).

    Members
    -------
    i : In(stream.Signature(shape))
    o0 .. o{n-1} : Out(stream.Signature(shape))
    """

    def __init__(self, shape: object, n: int) -> None:
        _positive("fork outputs", n)
        self.shape, self.n = shape, n
        members = {"i": In(stream.Signature(shape))}
        members |= {f"o{k}": Out(stream.Signature(shape)) for k in range(n)}
        super().__init__(members)

    @property
    def outputs(self) -> list[object]:
        return [getattr(self, f"o{k}") for k in range(self.n)]

    def elaborate(self, platform: object) -> Module:
        m = Module()
        taken = Signal(self.n)
        # Each output leaves through a register slice: its consumer (a skip FIFO, a width
        # converter, an engine) may lie across the chip, and its ready, through the AND of
        # every output into the input's ready, was ResNet-20's critical path at 76 MHz.
        outs = []
        for k, o in enumerate(self.outputs):
            m.submodules[f"slice{k}"] = cut = RegisterSlice(self.shape)
            wiring.connect(m, cut.o, wiring.flipped(o))
            outs.append(cut.i)
        done = [taken[k] | outs[k].ready for k in range(self.n)]
        all_done = done[0]
        for d in done[1:]:
            all_done = all_done & d
        m.d.comb += self.i.ready.eq(all_done)
        for k, o in enumerate(outs):
            m.d.comb += [o.payload.eq(self.i.payload), o.valid.eq(self.i.valid & ~taken[k])]
            with m.If(self.i.valid & self.i.ready):
                m.d.sync += taken[k].eq(0)
            with m.Elif(o.valid & o.ready):
                m.d.sync += taken[k].eq(1)
        return m
