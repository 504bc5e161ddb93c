"""Folding: PE and SIMD per layer for a target rate within a device's LUT and block RAM.

A network of streaming engines runs at the rate of its slowest engine, so the folding is
balanced like FINN's target-fps folding: every engine starts at (PE, SIMD) = (1, 1) and the
slowest one is widened, to its cheapest folding that is faster, until the slowest engine's
cycles per image meet the target, no engine can be widened, or the next widening would
exceed the device's budget (``LUT_SHARE`` of its LUT4s, ``BRAM_SHARE`` of its block RAMs).
A MAC engine widens SIMD up to ``MAX_SIMD`` (an adder tree of SIMD terms is one pipeline
stage: wider trees cost Fmax) and PE up to its output channels; the other engines are
PE-only (``hwgen.hw.engine``'s rules: PE divides their channels).

The estimates, per engine (LUT4, with ECP5 carry cells as two, as hwgen.synth counts):

- a lane of a MAC array: Pow2 ``LANE_POW2 * (in_bits + max_shift)`` (a shift-and-add lane,
  ~70 at 8-bit activations and pow2 5-bit weights); Fixed
  ``in_bits * w_bits + 2 * (in_bits + w_bits)`` (a multiplier in LUTs and its adder);
  ternary/binary ``3 * in_bits`` (a negation and an adder); Planes ``M * 3 * in_bits`` (M
  binary lanes); Codebook ``W * (2**bits / 2 +
  two-digit magnitudes / PE + 2)`` with shared products (half a LUT4 per mux input and
  bit), ``W * (0.75 * 2**bits + 3)`` with two digit muxes and an adder
  (``hwgen.hw.mac.shares_products``), ``W = in_bits + `` the largest entry's magnitude bits
  (Yosys synth_ecp5, 8-bit activations, |e| <= 64, PE 4 x SIMD 4, LUT4 per lane measured
  vs estimated: 3 index bits 121 vs 109, 4 bits 186 vs 184, TTQ's 3 entries 40 vs 63, 5
  bits 369 vs 378);
- a PE: accumulator, bias table and requantiser, ``PE_LUTS_PER_ACC_BIT * acc_bits``;
- the window and control: ``WINDOW_LUTS`` plus ``4 * SIMD * in_bits``; the other engines
  ``ENGINE_LUTS`` plus ``3 * PE * bits``; the FIFO after each engine ``out lanes * bits``;
- a ROM in logic (``hwgen.hw.rom.rom_storage``): ``width * ceil(depth / 16)`` (a LUT4 holds
  16 entries of one bit);
- an unrolled engine (hwgen.hw.unrolled, PE = Cout, SIMD = Cin, no ROM):
  ``UNROLLED_LUTS_PER_DIGIT * (in_bits + 3)`` per nonzero CSD digit of its weights (an adder
  of about the input's width per digit, less what the shared subexpressions save) plus the
  requantisers and the window; calibrated on bench/vs_da4ml.py's two dense 16 -> 8 layers.

Block RAMs: the layer's ROM in block RAM (``hwgen.hw.rom.bram_blocks`` of its width and
depth), the window's row buffer (``(K_h + S_h) * W * C/SIMD`` words of ``SIMD * bits``)
when deeper than ``LUTRAM_MAX_DEPTH`` words, and the skip FIFOs of the residual branches
(``hwgen.hw.network.skip_fifo_depths``). The constants are calibrated against Yosys on a
CIFAR-shaped chain of 19 convs (pow2 5-bit, 8-bit activations, 582 lanes at PE 4 x SIMD 8:
63,309 LUT4 with carries counted twice); the estimates guide the search, the synthesis
report is the truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from hwgen.errors import HwgenError
from hwgen.hw.cmvm import csd
from hwgen.hw.engine import MAX_LANES, MAX_UNROLLED_WEIGHTS, engine_info
from hwgen.hw.mac import shares_products
from hwgen.hw.rom import bram_blocks, rom_storage, rom_width
from hwgen.hw.sparse import fold_schedule, is_dense, pixel_beats, window_beats
from hwgen.ir import (
    INPUT,
    AvgPool2d,
    Codebook,
    Conv2d,
    Fixed,
    Flatten,
    Linear,
    MaxPool2d,
    Network,
    Planes,
    SubsamplePad,
    acc_bits,
)
from hwgen.synth import DEVICES

MAX_SIMD = 8
LUT_SHARE = 0.9  # place-and-route needs some slack, and the board's UART and host link
BRAM_SHARE = 0.95
LANE_POW2 = 4.6
PE_LUTS_PER_ACC_BIT = 4.0
ENGINE_LUTS = 300
WINDOW_LUTS = 600  # a MAC engine's window, address and fold counters
LUTRAM_MAX_DEPTH = 64
DEFAULT_CLOCK_MHZ = 100.0
UNROLLED_LUTS_PER_DIGIT = 0.75


@dataclass(frozen=True)
class LayerPlan:
    """One engine's folding and what it costs (estimates)."""

    name: str
    kind: str
    pe: int
    simd: int
    cycles: int  # per image: the slowest of its MAC cycles, input and output beats
    luts: int
    brams: int
    rom_bits: int
    rom_storage: str  # "block", "logic" or "" (no ROM)
    rom_blocks: int
    buffer_blocks: int
    engine: str = "folded"


@dataclass(frozen=True)
class FoldingPlan:
    """A folding of every engine and its totals on a device."""

    device: str
    clock_mhz: float
    layers: tuple[LayerPlan, ...]
    fifo_blocks: int  # the skip FIFOs of residual branches

    @property
    def cycles(self) -> int:
        return max(p.cycles for p in self.layers)

    @property
    def fps(self) -> float:
        return self.clock_mhz * 1e6 / self.cycles

    @property
    def luts(self) -> int:
        return sum(p.luts for p in self.layers)

    @property
    def brams(self) -> int:
        return sum(p.brams for p in self.layers) + self.fifo_blocks

    @property
    def foldings(self) -> dict[str, tuple[int, int]]:
        return {p.name: (p.pe, p.simd) for p in self.layers}

    @property
    def engines(self) -> dict[str, str]:
        """The layers with an unrolled engine (the others are folded)."""
        return _unrolled(self.layers)

    def to_toml(self) -> str:
        """``folding.toml`` as ``--folding`` reads it; the estimates are comments."""
        head = (
            f"# hwgen folding for {self.device} at {self.clock_mhz:g} MHz: "
            f"{self.cycles} cycles per image ({self.fps:,.0f} per second), "
            f"~{self.luts} LUT4, ~{self.brams} block RAMs\n"
        )
        parts = [head]
        for p in self.layers:
            rom = f", ROM {p.rom_bits} bits in {p.rom_storage}" if p.rom_storage else ""
            engine = f'engine = "{p.engine}"\n' if p.engine != "folded" else ""
            parts.append(
                f"\n[layers.{p.name}]  # {p.kind}: {p.cycles} cycles, ~{p.luts} LUT4, "
                f"~{p.brams} BRAM{rom}\n{engine}pe = {p.pe}\nsimd = {p.simd}\n"
            )
        return "".join(parts)


def _unrolled(plans: Iterable[LayerPlan]) -> dict[str, str]:
    return {p.name: p.engine for p in plans if p.engine != "folded"}


def _macs(layer: object) -> bool:
    return isinstance(layer, (Conv2d, Linear))


def _engines(net: Network) -> list[int]:
    return [i for i, layer in enumerate(net.layers) if not isinstance(layer, Flatten)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(net: Network, index: int, max_pe: int, max_simd: int) -> list[tuple[int, int]]:
    """Every valid (PE, SIMD) of engine ``index`` within the limits (SIMD = PE without MACs)."""
    layer = net.layers[index]
    if isinstance(layer, (Conv2d, Linear)):
        cin, cout = layer.weight.shape[1], layer.weight.shape[0]
        return [
            (pe, simd)
            for pe in _divisors(cout)
            if pe <= max_pe
            for simd in _divisors(cin)
            if simd <= max_simd and pe * simd <= MAX_LANES
        ]
    channels = net.in_shape(layer)[0]
    counts = [channels]
    if isinstance(layer, SubsamplePad):
        counts += [n for n in layer.pad if n]
    return [
        (pe, pe)
        for pe in _divisors(channels)
        if pe <= min(max_pe, MAX_LANES) and all(n % pe == 0 for n in counts)
    ]


def _lane_luts(layer: Conv2d | Linear, in_bits: int, pe: int) -> float:
    fmt = layer.weight_format
    if isinstance(fmt, Codebook):
        kbits = max(-fmt.lo, fmt.hi).bit_length()
        width = in_bits + kbits
        if not shares_products(fmt):
            return width * (0.75 * (1 << fmt.bits) + 3)
        mags = {abs(e) for e in fmt.entries}
        adders = sum(len(csd(m)) == 2 for m in mags)
        return width * ((1 << fmt.bits) / 2 + adders / pe + 2)
    if isinstance(fmt, Planes):
        return fmt.planes * 3 * in_bits
    if isinstance(fmt, Fixed):
        return in_bits * fmt.bits + 2 * (in_bits + fmt.bits)
    if fmt.bits <= 2:
        return 3 * in_bits
    return LANE_POW2 * (in_bits + fmt.max_shift)


def plan_layer(
    net: Network, index: int, pe: int, simd: int, family: str = "ecp5", engine: str = "folded"
) -> LayerPlan:
    """Cycles, LUT and block RAM estimates of engine ``index`` at (PE, SIMD)."""
    layer = net.layers[index]
    if engine != "folded":
        return _plan_unrolled(net, index, family)
    fin, fout = net.in_format(layer), net.formats[layer.name]
    size_in = math.prod(net.in_shape(layer))
    size_out = math.prod(net.shapes[layer.name])
    fifo = pe * fout.bits  # the FIFO after the engine: 16 words of LUT RAM
    if not isinstance(layer, (Conv2d, Linear)):
        info = engine_info(net, index, pe, simd)
        cycles = max(info.ideal_cycles, info.in_beats, info.out_beats)
        luts = ENGINE_LUTS + 3 * pe * max(fin.bits, fout.bits) + fifo
        blocks = 0
        if isinstance(layer, (MaxPool2d, AvgPool2d)):  # a row buffer like the window's
            c, _, w = net.in_shape(layer)
            rows = layer.kernel[0] + layer.stride[0]  # the window's row slots
            blocks = _buffer_blocks(pe * fin.bits, rows * w * c // pe, family)
        return LayerPlan(
            layer.name, info.kind, pe, simd, cycles, round(luts), blocks, 0, "", 0, blocks
        )
    cin, cout = layer.weight.shape[1], layer.weight.shape[0]
    # A cycle and a ROM word per scheduled beat (hwgen.hw.sparse: zero blocks skipped).
    schedule = fold_schedule(layer, pe, simd)
    depth = pixel_beats(schedule)
    # A sparse window's schedule table: about 8 bits an entry, in logic like a shallow ROM.
    table_luts = 0 if is_dense(schedule, window_beats(layer, simd)) else 8 * math.ceil(depth / 16)
    cycles = max(size_out // cout * depth, size_in // simd, size_out // pe)
    width = rom_width(layer, pe, simd)
    storage = rom_storage(width, depth)
    rom_blocks = bram_blocks(width, depth, family) if storage == "block" else 0
    rom_luts = width * math.ceil(depth / 16) if storage == "logic" else 0
    if isinstance(layer, Conv2d):
        _, _, w = net.in_shape(layer)
        words = (layer.kernel[0] + layer.stride[0]) * w * cin // simd
    else:
        words = 2 * cin // simd
    buffer = _buffer_blocks(simd * fin.bits, words, family)
    luts = (
        pe * simd * _lane_luts(layer, fin.bits, pe)
        + pe * PE_LUTS_PER_ACC_BIT * acc_bits(layer, fin)
        + WINDOW_LUTS
        + 4 * simd * fin.bits
        + fifo
        + rom_luts
        + table_luts
    )
    return LayerPlan(
        layer.name,
        "conv" if isinstance(layer, Conv2d) else "dense",
        pe,
        simd,
        cycles,
        round(luts),
        rom_blocks + buffer,
        width * depth,
        storage,
        rom_blocks,
        buffer,
    )


def _plan_unrolled(net: Network, index: int, family: str) -> LayerPlan:
    layer = net.layers[index]
    cin, cout = layer.weight.shape[1], layer.weight.shape[0]
    info = engine_info(net, index, cout, cin, "unrolled")
    fin, fout = net.in_format(layer), net.formats[layer.name]
    digits = sum(len(csd(int(w))) for w in layer.weight.ravel())
    luts = (
        UNROLLED_LUTS_PER_DIGIT * digits * (fin.bits + 3)
        + cout * 2 * acc_bits(layer, fin)
        + (WINDOW_LUTS + 4 * cin * fin.bits if isinstance(layer, Conv2d) else 0)
        + 8 * cout * fout.bits  # the output FIFO, in LUT RAM
    )
    buffer = 0
    if isinstance(layer, Conv2d):
        _, _, w = net.in_shape(layer)
        buffer = _buffer_blocks(cin * fin.bits, (layer.kernel[0] + layer.stride[0]) * w, family)
    cycles = max(info.ideal_cycles, info.in_beats, info.out_beats)
    return LayerPlan(
        layer.name, info.kind, cout, cin, cycles, round(luts), buffer, 0, "", 0, buffer, "unrolled"
    )


def _buffer_blocks(width: int, depth: int, family: str) -> int:
    return bram_blocks(width, depth, family) if depth > LUTRAM_MAX_DEPTH else 0


def _fifo_blocks(
    net: Network,
    foldings: Mapping[str, tuple[int, int]],
    family: str,
    engines: Mapping[str, str] | None = None,
) -> int:
    """Block RAMs of the skip FIFOs (none in a chain)."""
    if net.is_chain:
        return 0
    from hwgen.hw.network import skip_fifo_depths

    total = 0
    for (reader, port), depth in skip_fifo_depths(net, foldings, engines).items():
        src = net.layer(reader).inputs[port]
        while src != INPUT and isinstance(net.layer(src), Flatten):
            src = net.layer(src).inputs[0]
        # The tensor's stream: its producer's PE, or the first engine's SIMD for the input.
        first = net.layers[_engines(net)[0]].name
        lanes = foldings[first][1] if src == INPUT else foldings[src][0]
        fmt = net.input_format if src == INPUT else net.formats[src]
        total += _buffer_blocks(lanes * fmt.bits, depth, family)
    return total


def _forked_producers(net: Network) -> set[str]:
    """Engines whose output stream is forked (read by several layers): their PE sets the
    skip FIFOs' width."""
    from hwgen.hw.network import _source

    reads: dict[str, int] = {}
    for layer in net.layers:
        if not isinstance(layer, Flatten):
            for src in layer.inputs:
                reads[_source(net, src)] = reads.get(_source(net, src), 0) + 1
    return {name for name, n in reads.items() if n > 1}


def plan(
    net: Network,
    foldings: Mapping[str, tuple[int, int]],
    device: str = "ecp5-85f",
    clock_mhz: float = DEFAULT_CLOCK_MHZ,
    engines: Mapping[str, str] | None = None,
) -> FoldingPlan:
    """The estimates of a given folding (every engine named; ``engines``: the layers with an
    unrolled engine)."""
    dev = _device(device)
    engines = dict(engines or {})
    layers = tuple(
        plan_layer(
            net,
            i,
            *foldings[net.layers[i].name],
            dev.family,
            engines.get(net.layers[i].name, "folded"),
        )
        for i in _engines(net)
    )
    return FoldingPlan(device, clock_mhz, layers, _fifo_blocks(net, foldings, dev.family, engines))


def build_target(
    device: str | None, board: str | None, clock_mhz: float | None
) -> tuple[str, float]:
    """The device and clock a build is folded for: ``device``, else the board's, else
    ``ecp5-85f``; ``clock_mhz``, else the board's default clock, else 100 MHz."""
    from hwgen.hw.board import BOARDS

    b = BOARDS.get(board) if board else None
    if device is not None and b is not None and device != b.device:
        raise HwgenError(f"--device {device} is not board {board}'s device {b.device}")
    device = device or (b.device if b else "ecp5-85f")
    _device(device)
    return device, clock_mhz or (b.default_target_mhz if b else DEFAULT_CLOCK_MHZ)


def _device(device: str) -> object:
    if device not in DEVICES:
        raise HwgenError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    return DEVICES[device]


def solve(
    net: Network,
    device: str = "ecp5-85f",
    clock_mhz: float = DEFAULT_CLOCK_MHZ,
    target_fps: float | None = None,
    fixed: Mapping[str, tuple[int, int]] | None = None,
    max_pe: int | None = None,
    max_simd: int = MAX_SIMD,
    budget: tuple[float, int] | None = None,
    engines: Mapping[str, str] | None = None,
    unrolled: bool = False,
) -> FoldingPlan:
    """The balanced folding for ``target_fps`` (None: the fastest within the budget).

    Engines named in ``fixed`` keep their folding, and those in ``engines`` their engine;
    with ``unrolled`` a conv or dense layer of at most ``MAX_UNROLLED_WEIGHTS`` weights may
    also widen to its unrolled engine, when that is the cheapest faster option. ``budget``
    (LUT4, block RAMs) replaces the device's shares. Raises a one-line HwgenError when the
    target cannot be met: the best rate reached and what stopped the search.
    """
    dev = _device(device)
    if target_fps is not None and not (math.isfinite(target_fps) and target_fps > 0):
        raise HwgenError(f"--target-fps must be a positive number, not {target_fps:g}")
    if not (math.isfinite(clock_mhz) and clock_mhz > 0):
        raise HwgenError(f"clock must be a positive number of MHz, not {clock_mhz:g}")
    fixed = dict(fixed or {})
    target = clock_mhz * 1e6 / target_fps if target_fps else 0.0  # cycles per image
    lut_budget, bram_budget = budget or (LUT_SHARE * dev.luts, math.floor(BRAM_SHARE * dev.brams))
    engines = dict(engines or {})
    cache: dict[tuple[int, int, int, str], LayerPlan] = {}

    def cost(index: int, folding: tuple[int, int, str]) -> LayerPlan:
        key = (index, *folding)
        if key not in cache:
            pe, simd, engine = folding
            cache[key] = plan_layer(net, index, pe, simd, dev.family, engine)
        return cache[key]

    current: dict[int, LayerPlan] = {}
    options: dict[int, list[tuple[int, int, str]]] = {}
    for i in _engines(net):
        layer = net.layers[i]
        full = (layer.weight.shape[0], layer.weight.shape[1], "unrolled") if _macs(layer) else None
        if layer.name in engines and full:
            options[i] = [full]
        elif layer.name in fixed:
            options[i] = [(*fixed[layer.name], "folded")]
        else:
            found = candidates(net, i, max_pe or MAX_LANES, max_simd)
            options[i] = [(pe, simd, "folded") for pe, simd in found]
            if unrolled and full and layer.weight.size <= MAX_UNROLLED_WEIGHTS:
                options[i].append(full)
        current[i] = cost(i, options[i][0])
    start = {net.layers[i].name: (p.pe, p.simd) for i, p in current.items()}
    fifo = _fifo_blocks(net, start, dev.family, _unrolled(current.values()))
    luts = sum(p.luts for p in current.values())
    brams = sum(p.brams for p in current.values()) + fifo
    names = {i: net.layers[i].name for i in current}
    forked = _forked_producers(net)

    def fifo_with(p: LayerPlan) -> int:
        """Skip FIFO blocks with ``p`` in place: their widths follow the forked producers' PE."""
        if p.name not in forked:
            return fifo
        folds = {names[i]: (q.pe, q.simd) for i, q in current.items()}
        plans = [q for q in current.values() if q.name != p.name] + [p]
        return _fifo_blocks(net, folds | {p.name: (p.pe, p.simd)}, dev.family, _unrolled(plans))

    stop = ""
    while True:
        slow = max(current, key=lambda i: current[i].cycles)
        now = current[slow]
        if now.cycles <= target:
            break
        faster = [cost(slow, f) for f in options[slow]]
        faster = [p for p in faster if p.cycles < now.cycles]
        if not faster:
            stop = f"layer {now.name} is at its widest folding (PE={now.pe}, SIMD={now.simd})"
            break
        # A widening may also free resources (a shallower buffer leaves block RAM).
        fits = [
            p
            for p in faster
            if (luts - now.luts + p.luts <= lut_budget or p.luts <= now.luts)
            and (
                brams - fifo - now.brams + p.brams + fifo_with(p) <= bram_budget
                or p.brams <= now.brams
            )
        ]
        if not fits:
            p = min(faster, key=lambda p: (p.luts, p.brams))
            over = []
            if luts - now.luts + p.luts > lut_budget:
                over.append(f"LUT4 ({luts} of {lut_budget:.0f} used)")
            if brams - now.brams + p.brams > bram_budget:
                over.append(f"block RAM ({brams} of {bram_budget} used)")
            stop = f"widening layer {now.name} runs out of {' and '.join(over)}"
            break
        best = min(fits, key=lambda p: (p.luts, p.brams, -p.simd))
        new_fifo = fifo_with(best)
        luts += best.luts - now.luts
        brams += best.brams - now.brams + new_fifo - fifo
        fifo = new_fifo
        current[slow] = best
    result = FoldingPlan(device, clock_mhz, tuple(current.values()), 0)
    fifo = _fifo_blocks(net, result.foldings, dev.family, result.engines)
    result = replace(result, fifo_blocks=fifo)
    if result.luts > lut_budget or result.brams > bram_budget:
        raise HwgenError(
            f"the network does not fit {device}: its folding needs about {result.luts} LUT4 "
            f"(budget {lut_budget:.0f}) and {result.brams} block RAMs (budget {bram_budget})"
        )
    if target_fps and result.cycles > target:
        raise HwgenError(
            f"--target-fps {target_fps:g} is out of reach on {device} at {clock_mhz:g} MHz: "
            f"the best is {result.fps:,.0f} per second ({result.cycles} cycles per image); "
            f"{stop}"
        )
    return result
