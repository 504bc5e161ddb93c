"""The MAC array (PE x SIMD lanes, an adder tree and an accumulator per PE) and the MAC unit
that streams window beats through it with the weight ROMs and the requantisers.

Lanes: a Pow2 lane has no multiplier: it shifts the activation by the code's shift (no
shifter for ternary and binary) and negates by one's complement, ``-x = ~x + 1``; a zero
weight clears the lane's registers (a synchronous reset, no logic). A codebook lane turns
its weight's index, through constant muxes, into ``a`` times the entry (0, ``±2**k`` or
``±2**j ± 2**k``): for a codebook of few magnitudes it selects the product ``a * |e|``
(``a << k`` or ``(a << j) ± (a << k)``: one adder per two-digit magnitude and SIMD lane,
shared by the PEs, which all see the same activations), else it selects the entry's two
signed digits ``±(a << k)`` and adds them (``shares_products``); negative values are
one's-complemented in the mux, with a constant table of the index for the "+1". A Fixed
lane is a multiplier (the baseline). Adder trees are two-input adders, each on one carry
chain (Yosys would otherwise merge a tree into one multi-operand adder of LUT full adders,
1.5x the LUTs on ECP5), each as wide as the range of its sum; the "+1" a lane leaves (its
negative bit) is the carry-in of one of them (a tree of SIMD lanes has SIMD - 1 adders,
the accumulator the last). Accumulators are ``hwgen.ir.acc_bits`` wide (enough for any
input, from the actual weights); every narrower sum in front of them is exact. A layer with
a per-output-channel scale multiplies each finished accumulator by its channel's ``m_c``
(one multiplier per PE, registered) before the requantiser.
"""

from __future__ import annotations

import numpy as np
from amaranth import Array, Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from hwgen.hw.cmvm import csd
from hwgen.hw.fanout import copies
from hwgen.hw.requant import Requantizer, act_shape
from hwgen.hw.rom import (
    WeightROM,
    code_bits,
    encode_weights,
    entry_terms,
    rom_file,
    rom_latency,
    rom_storage,
    rom_width,
    rom_words,
    weight_matrix,
)
from hwgen.ir import (
    ActFormat,
    Codebook,
    Conv2d,
    Fixed,
    Linear,
    Planes,
    Pow2,
    WeightFormat,
    acc_bits,
    requant_bits,
    requant_frac,
    signed_bits,
)

Range = tuple[int, int]  # (lo, hi) a value can take
BINARY = Pow2(1, 0)  # a plane lane: +a or -a by its sign bit


def _pow2_lane(fmt: WeightFormat, a: Value, code: Value) -> tuple[Value, Value, Value]:
    """One Pow2 lane: (``a << shift``, one's-complemented when negative; is-negative; zero).

    ``-x == ~x + 1``: the "+1" is the negative bit, a carry-in of the adder tree."""
    if fmt.bits >= 3:
        sb = fmt.bits - 2
        mag, sign, zero = a << code[:sb], code[sb], code[sb + 1]
    else:
        mag, sign, zero = a, code[0], (code[1] if fmt.bits == 2 else Const(0, 1))
    if not mag.shape().signed:  # one more bit so the one's complement has a sign
        mag = Cat(mag, Const(0, 1)).as_signed()
    # ~x == -x - 1 stays in x's signed range: no sign extension needed.
    return Mux(sign, ~mag, mag), sign, zero


def codebook_products(fmt: Codebook, a: Value) -> dict[int, Value]:
    """``a * m`` for every magnitude ``m`` of the codebook's nonzero entries: a wire
    ``a << k`` for ``m = 2**k``, one adder ``(a << j) ± (a << k)`` for a two-digit ``m``.
    Every PE multiplies the same activation lane by the same codebook, so the products are
    made once per SIMD lane and shared by the PEs' lanes."""
    entry_terms(fmt)  # refuses an entry of more than two signed digits, naming it
    if not a.shape().signed:  # one more bit so the one's complement has a sign
        a = Cat(a, Const(0, 1)).as_signed()
    products = {}
    for m in sorted({abs(e) for e in fmt.entries} - {0}):
        digits = csd(m)  # lowest first; the highest digit of m > 0 is positive
        high = a << digits[-1][0]
        if len(digits) == 1:
            products[m] = high
        else:
            k, sub = digits[0]
            products[m] = high - (a << k) if sub else high + (a << k)
    return products


def _codebook_lane(
    fmt: Codebook, products: dict[int, Value], code: Value
) -> tuple[Value, Value, Value]:
    """One codebook lane from shared products: (``a * entries[code]`` minus its negative
    bit; negative bit; 0).

    A constant mux indexed by ``code`` picks the entry's product ``a * |e|``,
    one's-complemented for a negative entry (``-x == ~x + 1``, free in the mux's LUTs; the
    "+1", a constant table of ``code``, is a carry-in of the adder tree). Indices past the
    entries select 0."""
    n = 1 << fmt.bits
    entries = list(fmt.entries) + [0] * (n - len(fmt.entries))
    values = [~products[-e] if e < 0 else products[e] if e else Const(0, 1) for e in entries]
    neg = Array(Const(int(e < 0), 1) for e in entries)[code]
    return Array(values)[code], neg, Const(0, 1)


def _codebook_lane_terms(fmt: Codebook, a: Value, code: Value) -> tuple[Value, Value, Value]:
    """One codebook lane with its own adder: (``a * entries[code]`` minus the "+1" it leaves
    to the tree; that bit; 0).

    Each signed digit ``±(a << k)`` of the entry (highest first) comes from a constant mux
    indexed by ``code``, one's-complemented when negative; the lane adds the two with the
    first one's "+1" as its carry-in and leaves the second's to the tree."""
    terms = entry_terms(fmt)
    if not a.shape().signed:  # one more bit so the one's complement has a sign
        a = Cat(a, Const(0, 1)).as_signed()
    rows = terms + [[]] * ((1 << fmt.bits) - len(terms))

    def digit(j: int) -> tuple[Value, Value]:
        values = [
            (~(a << t[j][0]) if t[j][1] else a << t[j][0]) if len(t) > j else Const(0, 1)
            for t in rows
        ]
        negs = [int(len(t) > j and t[j][1]) for t in rows]
        return Array(values)[code], Array(Const(n, 1) for n in negs)[code]

    (first, neg1), (second, neg2) = digit(0), digit(1)
    return first + second + neg1, neg2, Const(0, 1)


SHARED_MAX_MAGNITUDES = 16


def shares_products(fmt: Codebook) -> bool:
    """Whether a codebook's lanes select shared products (``codebook_products``) rather than
    add their own two digits: for at most ``SHARED_MAX_MAGNITUDES`` distinct magnitudes.

    The lane's mux is most of its cost. Over products it has an input per magnitude and
    sign; over digits two muxes whose inputs are the activation shifted by ``0 .. kmax``,
    which share their bits. Yosys synth_ecp5, 3x3 conv 16 -> 16, 8-bit activations, SIMD 4,
    LUT4 per lane (products / digits): 3 index bits, 7 magnitudes 121 / 139 at PE 4 (119 /
    139 at PE 8, 119 / 122 at PE 1); TTQ's 3 entries 40 / 53; 4 bits, 13 magnitudes 186 /
    245, 16 magnitudes 235 / 232; 5 bits, 28 magnitudes 525 / 369."""
    return len({abs(e) for e in fmt.entries} - {0}) <= SHARED_MAX_MAGNITUDES


def _codebook_carries(fmt: Codebook, shared: bool) -> list[int]:
    """Per entry, the "+1" its lane leaves to the adder tree: its sign from shared products,
    else its second digit's."""
    if shared:
        return [int(e < 0) for e in fmt.entries]
    return [int(len(t) == 2 and t[1][1]) for t in entry_terms(fmt)]


def _lane_range(fmt: WeightFormat, act: ActFormat) -> Range:
    """Range of a lane's registered term (Pow2, Codebook, Planes: before the tree's +1)."""
    if isinstance(fmt, Planes):
        fmt = BINARY
    if isinstance(fmt, Codebook):
        carries = _codebook_carries(fmt, shares_products(fmt))
        ends = [
            a * e - c for e, c in zip(fmt.entries, carries, strict=True) for a in (act.lo, act.hi)
        ]
        return min(0, *ends), max(0, *ends)
    if isinstance(fmt, Fixed):
        ends = [a * w for a in (act.lo, act.hi) for w in (fmt.lo, fmt.hi)]
        return min(ends), max(ends)
    s = fmt.max_shift if fmt.bits >= 3 else 0
    lo, hi = min(act.lo, act.lo << s), max(act.hi, act.hi << s)
    return min(lo, -hi - 1, 0), max(hi, -lo - 1, 0)


def tree_stages(simd: int) -> int:
    """Register stages of a SIMD-lane adder tree: one, plus one after every two adder
    levels before the last (three chained carry chains run at ~128 MHz on ECP5, two at
    >150 MHz)."""
    levels = (simd - 1).bit_length()
    return 1 + max(0, levels - 1) // 2


def plane_range(layer: Conv2d | Linear, in_format: ActFormat) -> tuple[np.ndarray, np.ndarray]:
    """Exact (min, max) of each output channel's plane sums ``Σ_j b_ij·a_j``, (Cout, M)
    each, from the layer's actual sign codes: a +1 term lies in ``[lo, hi]``, a -1 term in
    ``[-hi, -lo]``."""
    fmt = layer.weight_format
    codes = encode_weights(fmt, weight_matrix(layer)).reshape(fmt.channels, -1)
    neg = np.stack([(codes >> i) & 1 for i in range(fmt.planes)], axis=1).sum(2)
    pos = codes.shape[1] - neg
    lo, hi = in_format.lo, in_format.hi
    return pos * lo - neg * hi, pos * hi - neg * lo


class MACArray(wiring.Component):
    """PE x SIMD lanes, one adder tree and one accumulator per PE; ``3 + tree_stages(simd)``
    pipeline stages (four up to SIMD = 4).

    Inputs are one window beat with its weight codes (the codes read from the ROMs for that
    beat). Stage 0 registers the inputs (a ROM's output is slow: it goes straight into a
    register), stage 1 the lane terms, the tree's stages the sums (a register after every
    two adder levels); the last stage accumulates: the first beat of a repetition starts
    from the bias of its output channel,
    ``acc = bias[fold*PE + k]``. The pipeline never stalls (no enable: the thousands of
    registers of a wide array would make one enable net the slowest path of the design);
    whoever feeds it must be able to take every ``done`` result.

    With Planes weights each PE has ``M`` plane accumulators ``Σ_j b_ij·a_j`` (accumulator
    ``k*M + i`` is PE ``k``'s plane ``i``), each fed by SIMD binary lanes that take its sign
    bit of the codes: ``+a`` or ``-a``, no shifter, no multiplier. They start from their
    bias, which is 0 here: the MAC unit combines the plane sums with their scales and adds
    the layer's bias after the array.

    Parameters
    ----------
    weight_format : Fixed, Pow2, Codebook or Planes
    in_format : ActFormat
    pe, simd : int
        With Planes, ``pe * M`` accumulators.
    acc_bits : int
        Accumulator width.
    bias : array of int, shape (folds, pe) (Planes: (folds, pe * M))
        Bias at accumulator scale per neuron fold and accumulator (a constant table).

    Members
    -------
    valid, first, last : In(1)
        The beat is valid / first / last of its repetition (one neuron fold's window).
    fold : In(range(folds))
        The beat's neuron fold (selects the bias).
    act : In(ArrayLayout(act_shape(in_format), simd))
    codes : In(ArrayLayout(ArrayLayout(unsigned(code_bits), simd), pe))
    acc : Out(ArrayLayout(signed(acc_bits), pe)) (Planes: pe * M)
        The accumulators; final for a repetition while ``done``.
    done : Out(1)
        ``acc`` holds a repetition's complete sum (for this cycle only).
    """

    def __init__(
        self,
        weight_format: WeightFormat,
        in_format: ActFormat,
        pe: int,
        simd: int,
        acc_bits: int,
        bias: np.ndarray,
    ) -> None:
        self.weight_format, self.in_format = weight_format, in_format
        self.pe, self.simd, self.acc_bits = pe, simd, acc_bits
        self.planes = weight_format.planes if isinstance(weight_format, Planes) else 1
        self.bias = np.asarray(bias, dtype=object).reshape(-1, pe * self.planes)
        folds = self.bias.shape[0]
        cb = code_bits(weight_format)
        super().__init__(
            {
                "valid": In(1),
                "first": In(1),
                "last": In(1),
                "fold": In(range(folds)),
                "act": In(data.ArrayLayout(act_shape(in_format), simd)),
                "codes": In(data.ArrayLayout(data.ArrayLayout(unsigned(cb), simd), pe)),
                "acc": Out(data.ArrayLayout(signed(acc_bits), pe * self.planes)),
                "done": Out(1),
            }
        )

    def _lanes(
        self, act: Value, codes: Value, products: list[dict[int, Value]], plane: int
    ) -> list[tuple[Value, Value, Value]]:
        """A PE's lanes: (term, negative bit, zero bit); the registered term is 0 when zero
        and the negative bit is the "+1" the adders add as a carry-in. ``products``: a
        codebook's per-SIMD-lane products (``codebook_products``); ``plane``: the sign bit
        of Planes codes the lanes take."""
        fmt = self.weight_format
        pairs = zip((act[lane] for lane in range(self.simd)), codes, strict=True)
        if isinstance(fmt, Planes):
            return [_pow2_lane(BINARY, a, c[plane]) for a, c in pairs]
        if isinstance(fmt, Fixed):
            return [(a * c.as_signed(), Const(0, 1), Const(0, 1)) for a, c in pairs]
        if isinstance(fmt, Codebook) and products:
            return [_codebook_lane(fmt, p, c) for p, c in zip(products, codes, strict=True)]
        if isinstance(fmt, Codebook):
            return [_codebook_lane_terms(fmt, a, c) for a, c in pairs]
        return [_pow2_lane(fmt, a, c) for a, c in pairs]

    def _add(
        self,
        m: Module,
        name: str,
        a: tuple[Value, Range],
        b: tuple[Value, Range],
        carry: Value | None,
    ) -> tuple[Value, Range]:
        """``a + b + carry`` on one carry chain, as wide as its range (modulo 2**acc_bits:
        exact, since the final sum fits)."""
        (va, (alo, ahi)), (vb, (blo, bhi)) = a, b
        lo, hi = alo + blo, ahi + bhi + (carry is not None)
        # keep: Yosys would otherwise merge the tree into one $macc of LUT full adders.
        out = Signal(signed(min(signed_bits(lo, hi), self.acc_bits)), name=name, attrs={"keep": 1})
        m.d.comb += out.eq(va + vb + (0 if carry is None else carry))
        return out, (lo, hi)

    @staticmethod
    def _reg(m: Module, v: Signal, name: str) -> Signal:
        reg = Signal.like(v, name=name, reset_less=True)
        m.d.sync += reg.eq(v)
        return reg

    def elaborate(self, platform: object) -> Module:
        m = Module()
        # Stage 0 registers the inputs, stage 1 the lane terms, then the adder tree's stages,
        # then the accumulator: each stage is one level of logic, for 150 MHz on ECP5.
        # Data registers are reset-less: only the control pipeline (valid, first, last,
        # fold) needs the reset, and a reset on every lane register would be a 19,000-sink
        # net on ResNet-20 and a LUT per lane to merge it with the zero-weight clear.
        fmt = self.weight_format
        shared = isinstance(fmt, Codebook) and shares_products(fmt)
        # A copy of the activations per PE (hwgen.hw.fanout), so that each PE's lanes can lie
        # around their own: one register for all was ResNet-20's critical path at 76 MHz,
        # 9.1 ns of routing through the lanes' congestion. Shared codebook products are
        # computed once, from one.
        acts = copies(m, self.act, 1 if shared else self.pe, "act0")
        codes = Signal.like(self.codes, name="codes0", reset_less=True)
        m.d.sync += codes.eq(self.codes)
        stages = tree_stages(self.simd)
        ctl = [
            (
                Signal(name=f"valid{s}"),
                Signal(name=f"first{s}"),
                Signal(name=f"last{s}"),
                Signal.like(self.fold, name=f"fold{s}"),
            )
            for s in range(1 + stages + 1)
        ]
        src = (self.valid, self.first, self.last, self.fold)
        for stage in ctl:
            m.d.sync += [dst.eq(v) for dst, v in zip(stage, src, strict=True)]
            src = stage
        m.d.sync += self.done.eq(ctl[-1][0] & ctl[-1][2])
        groups = self.pe * self.planes
        # The accumulators' enable and first-beat select, and the bias tables' fold, have a
        # register copy per PE (hwgen.hw.fanout): one register each was 60-90 loads.
        s_valid = copies(m, ctl[-2][0], groups, "acc_valid")
        s_first = copies(m, ctl[-2][1], groups, "acc_first")
        if self.bias.shape[0] > 1:
            s_fold = copies(m, ctl[-3][3] if len(ctl) > 2 else self.fold, groups, "bias_fold")
        lane_range = _lane_range(fmt, self.in_format)
        pow2 = not isinstance(fmt, Fixed)
        products = [codebook_products(fmt, acts[0][j]) for j in range(self.simd)] if shared else []
        for g in range(groups):
            k, plane = divmod(g, self.planes)
            name = str(k) if self.planes == 1 else f"{k}p{plane}"
            terms, carries = [], []
            act = acts[0 if shared else k]
            for j, (term, neg, zero) in enumerate(self._lanes(act, codes[k], products, plane)):
                reg = Signal(
                    signed(signed_bits(*lane_range)), name=f"term{name}_{j}", reset_less=True
                )
                # A zero weight clears the registers (a sync reset for Yosys; on ECP5
                # LUT logic unless 64 flip-flops share it: hwgen.synth.MIN_SRST_FFS).
                m.d.sync += reg.eq(Mux(zero, 0, term))
                terms.append((reg, lane_range))
                if pow2:
                    n = Signal(name=f"neg{name}_{j}", reset_less=True)
                    m.d.sync += n.eq(Mux(zero, 0, neg))
                    carries.append(n)
            # A balanced tree of two-input adders, each taking one lane's "+1" as its
            # carry-in; the last "+1" goes into the accumulator's.
            level = 0
            while len(terms) > 1:
                if level and level % 2 == 0:  # a register after every two levels
                    terms = [(self._reg(m, v, f"{v.name}_r"), r) for v, r in terms]
                    carries = [self._reg(m, c, f"{c.name}_r") for c in carries]
                pairs = []
                for i in range(0, len(terms) - 1, 2):
                    carry = carries.pop() if carries else None
                    pairs.append(
                        self._add(m, f"sum{name}_{level}_{i // 2}", terms[i], terms[i + 1], carry)
                    )
                terms = pairs + terms[len(terms) - len(terms) % 2 :]
                level += 1
            total, (lo, hi) = terms[0]
            s_sum = Signal(
                signed(min(signed_bits(lo, hi), self.acc_bits)), name=f"sum{name}", reset_less=True
            )
            m.d.sync += s_sum.eq(total)
            s_carry = Signal(name=f"carry{name}", reset_less=True)
            if carries:
                m.d.sync += s_carry.eq(carries.pop())
            biases = [Const(int(b), signed(self.acc_bits)) for b in self.bias[:, g]]
            bias = biases[0]
            if len(biases) > 1:
                # Looked up a stage early, from the beat's fold then: from the fold register
                # (its fan-out is every PE's table) through the table, the first-beat mux
                # and the accumulator's carry chain was ResNet-20's critical path (13.8 ns).
                bias = Signal(signed(self.acc_bits), name=f"bias{name}", reset_less=True)
                m.d.sync += bias.eq(Array(biases)[s_fold[g]])
            acc = self.acc[g]
            with m.If(s_valid[g]):
                m.d.sync += acc.eq(Mux(s_first[g], bias, acc) + s_sum + s_carry)
        return m


class MACUnit(wiring.Component):
    """Window beats in, requantised output channels out: ROMs + MAC array + requantisers.

    Consumes the sliding-window stream (``repeats = Cout/PE`` repetitions of each output
    pixel's window, order kh, kw, channel group, ``last`` on each repetition's final beat),
    one beat per cycle; emits PE output channels per repetition. One ROM holds every PE's
    codes (hwgen.hw.rom layout): all PEs read the same address, the beat count modulo the
    ROM depth, in the cycle the beat is taken (the array registers the ROM's data). The ROM
    answers ``rom_latency`` cycles later, 3 in block RAM and 2 in logic: the beat waits
    ``rom_stages`` = 2 or 1 more register stages for it.

    With Planes weights, each PE's ``M`` finished plane sums are combined into the exact
    accumulator ``bias_c + Σ_i m_ic·S_i`` (``Σ_i m_ic·Σ_j b_ij·a_j = Σ_j w_cj·a_j``) in two
    registered stages: ``M`` multipliers per PE by the channel's plane scales (registers
    loaded with the next fold's entries, as the scale's), then their sum with the bias,
    ``acc_bits`` wide (exact modulo ``2**acc_bits``, since the sum fits): ``combine_stages``
    = 2, else 0.

    With a per-output-channel scale, each PE's finished accumulator is multiplied by the
    ``m_c`` of the channel it holds (a constant table indexed by the result's neuron fold,
    counted as results leave the array) into a register ``requant_bits`` wide, the
    requantiser's input: one more pipeline stage. The requantiser's output is registered
    before the FIFO (its rounding adder and saturation are one carry chain and a compare,
    the FIFO's LUT RAM write after them was the digits network's slowest path).

    Flow control by credit, so that nothing in the array waits on the consumer: results go
    into an output FIFO of ``out_depth = OUT_DEPTH + tree_stages(simd) + combine_stages +
    scale_stages + rom_stages`` words (``scale_stages`` is 1 with a scale, else 0): every
    stage a result spends between its last beat and the FIFO is a word more, so that a result
    per beat still flows. ``pending`` counts the
    repetitions whose last beat was taken but whose result has not left the FIFO (a result
    leaving is registered before pending counts it: the FIFO sits by its consumer, the array
    perhaps across the chip). ``i.ready`` is a register, ``pending <= out_depth - 2`` one
    cycle earlier: pending grows by at most one per cycle, so it never exceeds ``out_depth``
    and the FIFO never overflows. A last beat stays pending ``7 + tree_stages(simd) +
    combine_stages + scale_stages + rom_stages`` cycles when the consumer is ready (the input
    registers, the array's stages, the planes' and the scale's, the requantiser's, the FIFO's
    write and the registered pop; nine up to SIMD = 4 without a scale and with a ROM in
    logic), no more than
    ``out_depth - 2``: a result per beat (SIMD = Cin, a 1x1 kernel) still flows at full
    rate.

    Members
    -------
    i : In(stream.Signature(StructLayout({"data": ArrayLayout(in shape, simd), "last": 1})))
    o : Out(stream.Signature(ArrayLayout(out shape, pe)))
    """

    OUT_DEPTH = 9  # output FIFO words with a one-stage adder tree

    def __init__(
        self,
        layer: Conv2d | Linear,
        in_format: ActFormat,
        pe: int,
        simd: int,
        rom_style: str = "inline",
    ) -> None:
        self.layer, self.in_format, self.pe, self.simd = layer, in_format, pe, simd
        self.rom_style = rom_style
        self.scale_stages = 0 if layer.scale is None else 1
        self.combine_stages = 2 if isinstance(layer.weight_format, Planes) else 0
        self.words = rom_words(layer, pe, simd)
        self.depth = len(self.words)
        self.rom_stages = rom_latency(rom_storage(rom_width(layer, pe, simd), self.depth)) - 1
        self.out_depth = (
            self.OUT_DEPTH
            + tree_stages(simd)
            + self.combine_stages
            + self.scale_stages
            + self.rom_stages
        )
        self.acc_bits = acc_bits(layer, in_format)
        self.requant_bits = requant_bits(layer, in_format)
        out = layer.out_format
        super().__init__(
            {
                "i": In(
                    stream.Signature(
                        data.StructLayout(
                            {
                                "data": data.ArrayLayout(act_shape(in_format), simd),
                                "last": 1,
                            }
                        )
                    )
                ),
                "o": Out(stream.Signature(data.ArrayLayout(act_shape(out), pe))),
            }
        )

    @staticmethod
    def _fold_constants(
        m: Module, done: Value, folds: int, tables: dict[str, tuple[np.ndarray, int]]
    ) -> dict[str, list[Value]]:
        """Per table ``name: (values (folds, n), bits)``, its ``n`` entries for the result at
        the array's output while ``done`` (the fold counted over the array's results, which
        leave it in fold order), ``bits`` signed.

        With several folds each entry is a register loaded with the next fold's on every
        result, so what it feeds runs from a register (a table lookup in front of the scale's
        multiplier cost 10% of Fmax on ECP5); with one fold, a constant."""
        fold = Signal(range(folds), name="result_fold")
        following = Mux(fold == folds - 1, 0, fold + 1)
        if folds > 1:
            with m.If(done):
                m.d.sync += fold.eq(following)
        out = {}
        for name, (values, bits) in tables.items():
            out[name] = []
            for k in range(values.shape[1]):
                table = [Const(int(v), signed(bits)) for v in values[:, k]]
                if folds == 1:
                    out[name].append(table[0])
                    continue
                reg = Signal(signed(bits), init=int(values[0, k]), name=f"{name}{k}")
                with m.If(done):
                    m.d.sync += reg.eq(Array(table)[following])
                out[name].append(reg)
        return out

    def _combined(
        self, m: Module, sums: list[Value], done: Value, folds: int
    ) -> tuple[list[Value], Value]:
        """Per PE, ``bias_c + Σ_i m_ic·S_i`` from its plane sums ``S_i`` (``sums[k*M + i]``),
        two registered stages later, and ``done`` as late."""
        fmt, pe = self.layer.weight_format, self.pe
        planes = fmt.planes
        scales = np.asarray(fmt.scales, dtype=object)  # (Cout, M)
        lo, hi = plane_range(self.layer, self.in_format)
        bias = self.layer.bias.astype(object).reshape(folds, pe)
        tables = {"bias": (bias, signed_bits(int(bias.min()), int(bias.max())))}
        for i in range(planes):
            col = scales[:, i]
            tables[f"plane{i}_scale"] = (
                col.reshape(folds, pe),
                signed_bits(int(col.min()), int(col.max())),
            )
        consts = self._fold_constants(m, done, folds, tables)
        results = []
        for k in range(pe):
            bias = consts["bias"][k]  # a register reloaded as the products are: held a stage
            terms = [self._reg(m, bias, f"combine_bias{k}") if folds > 1 else bias]
            for i in range(planes):
                ends = [lo[:, i] * scales[:, i], hi[:, i] * scales[:, i]]
                pbits = signed_bits(int(np.minimum(*ends).min()), int(np.maximum(*ends).max()))
                prod = Signal(signed(pbits), name=f"plane{k}_{i}_scaled", reset_less=True)
                m.d.sync += prod.eq(sums[k * planes + i] * consts[f"plane{i}_scale"][k])
                terms.append(prod)
            # Exact modulo 2**acc_bits: the sum is the accumulator, within acc_range.
            acc = Signal(signed(self.acc_bits), name=f"combined{k}", reset_less=True)
            m.d.sync += acc.eq(sum(terms[1:], terms[0]))
            results.append(acc)
        done_r = [Signal(name=f"combined_done{s}") for s in range(2)]
        m.d.sync += [done_r[0].eq(done), done_r[1].eq(done_r[0])]
        return results, done_r[1]

    @staticmethod
    def _reg(m: Module, v: Value, name: str) -> Signal:
        reg = Signal(v.shape(), name=name, reset_less=True)
        m.d.sync += reg.eq(v)
        return reg

    def _scaled(
        self, m: Module, accs: list[Value], done: Value, folds: int
    ) -> tuple[list[Value], Value]:
        """Registered ``acc_k * m_c`` per PE (c = fold * PE + k), and ``done`` one cycle
        later: the multiplier runs from registers to a register (``_fold_constants``)."""
        scale = self.layer.scale.reshape(folds, self.pe)
        consts = self._fold_constants(
            m, done, folds, {"scale": (scale, self.layer.scale_format.bits)}
        )
        products = []
        for k in range(self.pe):
            # Exact: every channel's product lies in requant_range, within requant_bits.
            prod = Signal(signed(self.requant_bits), name=f"scaled{k}")
            m.d.sync += prod.eq(accs[k] * consts["scale"][k])
            products.append(prod)
        done_r = Signal(name="scaled_done")
        m.d.sync += done_r.eq(done)
        return products, done_r

    def elaborate(self, platform: object) -> Module:
        m = Module()
        layer, pe, depth = self.layer, self.pe, self.depth
        folds = layer.bias.shape[0] // pe
        planes = isinstance(layer.weight_format, Planes)
        if planes:  # plane sums from 0; the bias comes with their combination
            lo, hi = plane_range(layer, self.in_format)
            array_bits = signed_bits(int(lo.min()), int(hi.max()))
            bias = np.zeros((folds, pe * layer.weight_format.planes), dtype=np.int64)
        else:
            array_bits, bias = self.acc_bits, layer.bias.reshape(folds, pe)
        m.submodules.mac = mac = MACArray(
            layer.weight_format, self.in_format, pe, self.simd, array_bits, bias
        )
        m.submodules.rom = rom = WeightROM(
            width=rom_width(layer, pe, self.simd),
            depth=depth,
            init=self.words,
            style=self.rom_style,
            init_file=rom_file(layer.name),
        )

        # Credit: i.ready is a register (see the class docstring), never the consumer's ready.
        depth_out = self.out_depth
        m.submodules.out = out = SyncFIFO(width=len(self.o.payload.as_value()), depth=depth_out)
        ready = Signal(init=1)
        pending = Signal(range(depth_out + 1))
        take = self.i.valid & ready
        # A result left the FIFO last cycle: the consumer's handshake, a register away from
        # pending (the MAC's output FIFO to pending, 5.2 ns of routing: 98.5 MHz on ResNet-20).
        pop = Signal()
        m.d.sync += pop.eq(out.r_rdy & self.o.ready)
        m.d.comb += self.i.ready.eq(ready)
        m.d.sync += [
            pending.eq(pending + (take & self.i.payload.last) - pop),
            ready.eq(pending <= depth_out - 2),
        ]

        addr = Signal(range(depth), name="addr")  # address of the next beat
        fold = Signal.like(mac.fold)
        first = Signal(init=1)  # the next beat starts a repetition
        with m.If(take):
            m.d.sync += [
                addr.eq(Mux(addr == depth - 1, 0, addr + 1)),
                first.eq(self.i.payload.last),
            ]
            if folds > 1:
                with m.If(self.i.payload.last):
                    m.d.sync += fold.eq(Mux(fold == folds - 1, 0, fold + 1))
        # The ROM reads the taken beat's word; its data meets the beat in the array's input,
        # after rom.latency - 1 more register stages on the beat's side.
        beat = [take, self.i.payload.data, first, self.i.payload.last, fold]
        for stage in range(rom.latency - 1):
            held = [
                Signal(name=f"beat{stage}_valid"),
                Signal.like(self.i.payload.data, name=f"beat{stage}_act", reset_less=True),
                Signal(name=f"beat{stage}_first", reset_less=True),
                Signal(name=f"beat{stage}_last", reset_less=True),
                Signal.like(fold, name=f"beat{stage}_fold", reset_less=True),
            ]
            m.d.sync += [h.eq(b) for h, b in zip(held, beat, strict=True)]
            beat = held
        m.d.sync += [
            port.eq(b)
            for port, b in zip(
                [mac.valid, mac.act, mac.first, mac.last, mac.fold], beat, strict=True
            )
        ]
        m.d.comb += [rom.addr.eq(addr), mac.codes.eq(rom.data)]

        results, done = [mac.acc[k] for k in range(pe)], mac.done
        if planes:
            sums = [mac.acc[g] for g in range(pe * mac.planes)]
            results, done = self._combined(m, sums, done, folds)
        if layer.scale is not None:
            results, done = self._scaled(m, results, done, folds)
        shift = requant_frac(layer, self.in_format) - layer.out_format.frac
        out_bits = layer.out_format.bits
        for k in range(pe):
            rq = Requantizer(self.requant_bits, shift, layer.out_format, layer.relu)
            m.submodules[f"requant{k}"] = rq
            m.d.comb += rq.i.eq(results[k])
            m.d.sync += out.w_data[k * out_bits : (k + 1) * out_bits].eq(rq.o)
        m.d.sync += out.w_en.eq(done)
        m.d.comb += [
            self.o.payload.eq(out.r_data),
            self.o.valid.eq(out.r_rdy),
            out.r_en.eq(self.o.ready),
        ]
        return m
