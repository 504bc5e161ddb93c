"""The unrolled constant-weight engine: every product of a layer in parallel, weights in the
netlist as shifts and adders (no ROM, no multiplier).

``MatVec`` is the datapath: one input vector per cycle in, the requantised output vector a
fixed number of cycles later. The layer's constant matrix is an adder graph with shared
subexpressions (hwgen.hw.cmvm); each adder is a plain ``+``/``-`` on Amaranth values, so
Yosys maps it to a carry chain (CCU2C on ECP5), exactly as wide as the node's value range
needs, with the low bits of a shifted operand passed through as wires. A register follows
every ``levels`` adder levels; the bias and the rounding constant are one adder per output
in front of the saturation. A per-output-channel scale is folded into the constants,
``m_c (bias_c + Σ a w) = m_c bias_c + Σ a (m_c w)`` (``scaled_matrix``): no multiplier.

``UnrolledEngine`` puts it on streams, with the stream interface of the folded engine at
SIMD = Cin and PE = Cout: a dense layer (or a 1x1 convolution with stride 1 and no padding)
takes its whole input vector per beat; any other convolution goes through the sliding
window unit (SIMD = Cin), whose K*K beats per output pixel are gathered into one kernel
window (``K*K*Cin`` values, order kh, kw, channel) for the datapath. The window unit
gives a beat per cycle, so such a layer computes an output pixel every K*K cycles (the
folded engine's rate at PE = Cout, SIMD = Cin), its datapath idle in between; a dense
layer or a plain 1x1 convolution computes one per cycle.
"""

from __future__ import annotations

import numpy as np
from amaranth import Cat, Const, Module, Shape, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.cmvm import AdderGraph, optimise
from hwgen.hw.requant import Requantizer, act_shape
from hwgen.hw.streams import WidthConverter
from hwgen.hw.window import SlidingWindow
from hwgen.ir import ActFormat, Conv2d, Linear, requant_bits, requant_frac, signed_bits

DEFAULT_LEVELS = 2  # adder levels between pipeline registers


def _shape(lo: int, hi: int) -> Shape:
    """The narrowest shape holding every integer in [lo, hi]."""
    return unsigned(max(int(hi).bit_length(), 1)) if lo >= 0 else signed(signed_bits(lo, hi))


def _fit(v: Value, shape: Shape) -> Value:
    """``v`` cut to ``shape``: exact when its value is known to fit."""
    v = v[: shape.width]
    return v.as_signed() if shape.signed else v


def _ext(v: Value, width: int) -> Value:
    """``v`` sign- (or zero-) extended to at least ``width`` bits."""
    if len(v) >= width:
        return v
    top = v[-1] if v.shape().signed else Const(0, 1)
    return Cat(v, top.replicate(width - len(v)))


def layer_matrix(layer: Conv2d | Linear) -> np.ndarray:
    """The layer's weights as a (Cout, K*K*Cin) matrix in window order (kh, kw, channel)."""
    if isinstance(layer, Linear):
        return np.asarray(layer.weight)
    return np.asarray(layer.weight).transpose(0, 2, 3, 1).reshape(layer.out_channels, -1)


def scaled_matrix(layer: Conv2d | Linear) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, bias) of the constant datapath: ``layer_matrix`` and the bias, each row times
    its channel's scale ``m_c`` when the layer has one (exact Python integers)."""
    matrix, bias = layer_matrix(layer).astype(object), layer.bias.astype(object)
    if layer.scale is None:
        return matrix, bias
    m = layer.scale.astype(object)
    return matrix * m[:, None], bias * m


def _check_levels(levels: object) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise HwgenError(
            f"adder levels per pipeline stage must be a positive integer, not {levels!r}"
        )
    return levels


class MatVec(wiring.Component):
    """``y = requantise(W x + bias)`` for a constant integer matrix, fully pipelined.

    Registers: the input vector, then one stage per ``levels`` adder levels of the graph, then
    the output: ``latency`` cycles from a vector in ``x`` (with ``valid``) to its result in
    ``y`` (with ``done``), one vector per cycle, never stalling.

    Parameters
    ----------
    matrix : array of int, shape (outputs, inputs)
    bias : array of int, shape (outputs,)
        At accumulator scale (``frac_in + frac_w``, plus ``frac_m`` when a scale is folded in).
    in_format, out_format : ActFormat
    shift : int
        ``frac_acc - frac_out``, as for ``hwgen.hw.requant.Requantizer``.
    relu : bool
    acc_bits : int
        The width of ``W x + bias`` (the requantiser's input; ``hwgen.ir.requant_bits``).
    levels : int
        Adder levels between pipeline registers (smaller: faster, more flip-flops).

    Members
    -------
    valid : In(1)
    x : In(ArrayLayout(act_shape(in_format), inputs))
    done : Out(1)
    y : Out(ArrayLayout(act_shape(out_format), outputs))
    """

    def __init__(
        self,
        matrix: np.ndarray,
        bias: np.ndarray,
        in_format: ActFormat,
        out_format: ActFormat,
        shift: int,
        relu: bool,
        acc_bits: int,
        levels: int = DEFAULT_LEVELS,
    ) -> None:
        self.matrix = np.asarray(matrix, dtype=object)
        self.bias = [int(b) for b in bias]
        self.in_format, self.out_format = in_format, out_format
        self.shift, self.relu, self.acc_bits = shift, relu, acc_bits
        self.levels = _check_levels(levels)
        self.graph: AdderGraph = optimise(self.matrix)
        depths = self.graph.depths()
        self._stage = [0] * self.graph.n_inputs + [
            -(-d // self.levels) for d in depths[self.graph.n_inputs :]
        ]
        roots = [t[0] for t in self.graph.outputs if t is not None]
        self.stages = max([1, *(self._stage[v] for v in roots)])
        self.latency = self.stages + 2
        n_out, n_in = self.matrix.shape
        super().__init__(
            {
                "valid": In(1),
                "x": In(data.ArrayLayout(act_shape(in_format), n_in)),
                "done": Out(1),
                "y": Out(data.ArrayLayout(act_shape(out_format), n_out)),
            }
        )

    def _ranges(self) -> list[tuple[int, int]]:
        lo, hi = self.in_format.lo, self.in_format.hi
        ranges = []
        for form in self.graph.coefficients():
            ranges.append(
                (
                    sum(min(c * lo, c * hi) for c in form.values()),
                    sum(max(c * lo, c * hi) for c in form.values()),
                )
            )
        return ranges

    def elaborate(self, platform: object) -> Module:
        m = Module()
        graph, ranges = self.graph, self._ranges()
        x = Signal.like(self.x, name="x_reg")
        m.d.sync += x.eq(self.x)
        # seen[v][k]: value v as stage k's logic sees it (k = its own stage: the adder output).
        seen: list[dict[int, Value]] = [{1: x[i]} for i in range(graph.n_inputs)]
        stage = [max(s, 1) for s in self._stage]

        def at(v: int, k: int) -> Value:
            if k not in seen[v]:
                reg = Signal(_shape(*ranges[v]), name=f"v{v}_s{k}")
                m.d.sync += reg.eq(at(v, k - 1))
                seen[v][k] = reg
            return seen[v][k]

        for j, n in enumerate(graph.nodes):
            v, k = graph.n_inputs + j, stage[graph.n_inputs + j]
            a, b = at(n.a, k), at(n.b, k)
            if n.shift_b:  # a ± (b << s): the low s bits are a's own, no adder for them
                value = Cat(
                    _ext(a, n.shift_b)[: n.shift_b],
                    (a >> n.shift_b) - b if n.sub else (a >> n.shift_b) + b,
                )
            elif n.shift_a and not n.sub:  # likewise for b + (a << s)
                value = Cat(_ext(b, n.shift_a)[: n.shift_a], (b >> n.shift_a) + a)
            else:
                value = (a << n.shift_a) - b if n.sub else (a << n.shift_a) + b
            shape = _shape(*ranges[v])
            node = Signal(shape, name=f"v{v}")
            m.d.comb += node.eq(_fit(value, shape))
            seen.append({k: node})

        # The bias and the rounding constant of half_up in one adder (then a floor shift).
        half = self.shift > 0 and self.out_format.rounding == "half_up"
        fmt = self.out_format
        rq_fmt = ActFormat(fmt.bits, fmt.frac, fmt.signed, "floor") if half else fmt
        out = Signal.like(self.y, name="y_reg")
        for o, term in enumerate(graph.outputs):
            const = self.bias[o] + ((1 << (self.shift - 1)) if half else 0)
            if term is None:
                acc = Const(const)
            else:
                v, s, neg = term
                value = at(v, self.stages + 1) << s
                acc = (
                    (const - value if neg else const + value)
                    if const
                    else (-value if neg else value)
                )
            rq = Requantizer(self.acc_bits + (1 if half else 0), self.shift, rq_fmt, self.relu)
            m.submodules[f"requant{o}"] = rq
            m.d.comb += rq.i.eq(acc)
            m.d.sync += out[o].eq(rq.o)
        valid = Signal(self.latency, name="valid_pipe")
        m.d.sync += valid.eq(Cat(self.valid, valid[:-1]))
        m.d.comb += [self.done.eq(valid[-1]), self.y.eq(out)]
        return m


class UnrolledEngine(wiring.Component):
    """A Conv2d or Linear layer, unrolled: SIMD = Cin input channels per beat in, PE = Cout
    output channels per beat out (see the module docstring).

    Flow control by credit, as in hwgen.hw.mac.MACUnit: the datapath never stalls; results go
    into an output FIFO of ``latency + 4`` words, and ``pending`` counts the windows taken
    whose result has not left it. The datapath's ready is a register, ``pending <= depth - 2``
    one cycle earlier: pending grows by at most one per cycle, so the FIFO never overflows,
    and a window still flows every cycle while the consumer takes the results (a window is
    pending for ``latency + 1`` cycles).

    Members
    -------
    i : In(stream.Signature(ArrayLayout(in shape, Cin)))
    o : Out(stream.Signature(ArrayLayout(out shape, Cout)))
    """

    def __init__(
        self,
        layer: Conv2d | Linear,
        in_format: ActFormat,
        in_shape: tuple[int, ...],
        levels: int = DEFAULT_LEVELS,
    ) -> None:
        self.layer, self.in_format, self.in_shape = layer, in_format, in_shape
        matrix, bias = scaled_matrix(layer)
        self.matvec = MatVec(
            matrix,
            bias,
            in_format,
            layer.out_format,
            requant_frac(layer, in_format) - layer.out_format.frac,
            layer.relu,
            requant_bits(layer, in_format),
            levels,
        )
        self.depth = self.matvec.latency + 4
        cin, cout = self.matvec.matrix.shape[1], self.matvec.matrix.shape[0]
        if isinstance(layer, Conv2d):
            cin //= layer.kernel[0] * layer.kernel[1]
        super().__init__(
            {
                "i": In(stream.Signature(data.ArrayLayout(act_shape(in_format), cin))),
                "o": Out(stream.Signature(data.ArrayLayout(act_shape(layer.out_format), cout))),
            }
        )

    def _windows(self, m: Module) -> stream.Interface:
        """The stream of whole kernel windows (one input vector per beat)."""
        layer = self.layer
        if isinstance(layer, Linear):
            return wiring.flipped(self.i)
        geometry = dict(kernel=layer.kernel, stride=layer.stride, padding=layer.padding)
        if geometry == dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0)):
            return wiring.flipped(self.i)
        c, h, w = self.in_shape
        shape = act_shape(self.in_format)
        m.submodules.window = window = SlidingWindow(
            channels=c, height=h, width=w, lanes=c, shape=shape, **geometry
        )
        kk = layer.kernel[0] * layer.kernel[1]
        m.submodules.gather = gather = WidthConverter(shape, c, kk * c)
        wiring.connect(m, wiring.flipped(self.i), window.i)
        # Window beats come in whole windows of K*K beats: the gathered beat is one window.
        m.d.comb += [
            gather.i.valid.eq(window.o.valid),
            gather.i.payload.eq(window.o.payload.data),
            window.o.ready.eq(gather.i.ready),
        ]
        return gather.o

    def elaborate(self, platform: object) -> Module:
        m = Module()
        m.submodules.matvec = core = self.matvec
        vec = self._windows(m)
        m.submodules.out = out = SyncFIFO(width=len(self.o.payload.as_value()), depth=self.depth)
        ready = Signal(init=1)
        pending = Signal(range(self.depth + 1))
        take = vec.valid & ready
        pop = out.r_rdy & self.o.ready
        m.d.comb += [
            vec.ready.eq(ready),
            core.valid.eq(take),
            core.x.eq(vec.payload),
            out.w_en.eq(core.done),
            out.w_data.eq(core.y),
            self.o.payload.eq(out.r_data),
            self.o.valid.eq(out.r_rdy),
            out.r_en.eq(self.o.ready),
        ]
        m.d.sync += [pending.eq(pending + take - pop), ready.eq(pending <= self.depth - 2)]
        return m
