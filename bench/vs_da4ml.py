"""hwgen's unrolled engine against da4ml (distributed arithmetic, TRETS'25) on the same layer.

Two dense 16 -> 8 layers from the same integer weights in both tools: INQ powers of two
``{0, ±1/8 ... ±1}`` (``Pow2(4, 0)``) and 8-bit fixed point Q1.7 (``Fixed(8, 7)``); input
8-bit unsigned (``u8.f8``), no bias, output ``s8.f5`` rounded half up and saturated.

1. Equality: da4ml's interpreter (the traced combinational logic and its pipeline) against
   hwgen's golden model on random vectors plus all-zero and all-max inputs.
2. Cost: da4ml pipelined with ``latency_cutoff=3`` (its Verilog) and hwgen's datapath
   (``hwgen.hw.unrolled.MatVec``, a register every 2 adder levels), each synthesised by
   hwgen's own flow (``hwgen.synth``: Yosys ``synth_ecp5``, nextpnr-ecp5 on the ECP5-85F
   at a 150 MHz target). Both tops have the same register wrapper: the input vector and the
   output vector are registers inside the module, and nothing else is around them. "LUT" is
   LUT4 + 2 x CCU2C, as hwgen.synth counts. For information, the whole pow2 stream engine
   (``UnrolledEngine``: the datapath plus its output FIFO and credit flow control) too.

The last lines printed are ``unrolled/da4ml LUT ratio pow2: X``, ``unrolled/da4ml LUT
ratio fixed: X`` and ``unrolled/da4ml Fmax ratio pow2: X``. Needs the ``bench`` extra
(``pip install -e ".[bench]"``).

    python bench/vs_da4ml.py [--vectors N] [--levels L] [--skip-engine]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from amaranth.back import verilog

from hwgen.golden import layer_forward
from hwgen.hw.unrolled import DEFAULT_LEVELS, MatVec, UnrolledEngine, layer_matrix
from hwgen.ir import ActFormat, Fixed, Linear, Pow2, WeightFormat, acc_bits, acc_frac
from hwgen.synth import SynthResult, synthesize

CIN, COUT = 16, 8
IN_FORMAT = ActFormat(8, 8, signed=False)
OUT_FORMAT = ActFormat(8, 5)
LATENCY_CUTOFF = 3
TARGET_MHZ = 150.0
FORMATS: dict[str, WeightFormat] = {"pow2": Pow2(4, 0), "fixed": Fixed(8, 7)}


def make_layer(wfmt: WeightFormat, rng: np.random.Generator) -> Linear:
    """The dense layer with random on-grid integer weights (a fifth zeros for pow2)."""
    shape = (COUT, CIN)
    if isinstance(wfmt, Fixed):
        w = rng.integers(wfmt.lo, wfmt.hi, size=shape, endpoint=True)
    else:
        mag = np.left_shift(1, rng.integers(0, wfmt.max_shift + 1, size=shape))
        w = np.where(rng.random(shape) < 0.2, 0, mag * rng.choice([-1, 1], size=shape))
    return Linear("fc", CIN, COUT, wfmt, OUT_FORMAT, w, np.zeros(COUT, dtype=np.int64))


def da4ml_logic(layer: Linear) -> object:
    """The layer traced by da4ml: its combinational logic (a ``CombLogic``)."""
    from da4ml.trace import FixedVariableArrayInput, comb_trace
    from da4ml.trace.ops import quantize

    inp = FixedVariableArrayInput(CIN)
    # quantizers' (keep_negative, integer bits without sign, fraction bits)
    x = quantize(inp, 0, IN_FORMAT.bits - IN_FORMAT.frac, IN_FORMAT.frac)
    w = layer.weight.T.astype(np.float64) * 2.0**-layer.weight_format.frac
    fo = OUT_FORMAT
    y = quantize(x @ w, 1, fo.bits - 1 - fo.frac, fo.frac, "SAT", "RND")
    return comb_trace(inp, y)


def check_equal(layer: Linear, logic: object, n: int, rng: np.random.Generator) -> int:
    """da4ml's interpreter (combinational and pipelined) == hwgen's golden model."""
    from da4ml.trace import to_pipeline

    x = rng.integers(IN_FORMAT.lo, IN_FORMAT.hi, size=(n, CIN), endpoint=True)
    x[:2] = [[IN_FORMAT.lo], [IN_FORMAT.hi]]
    golden = layer_forward(layer, x, IN_FORMAT)
    real = x * 2.0**-IN_FORMAT.frac
    pipe = to_pipeline(logic, LATENCY_CUTOFF, verbose=False)
    for name, model in (("combinational", logic), ("pipelined", pipe)):
        got = np.array([model(v) for v in real]) * 2.0**OUT_FORMAT.frac
        if not np.array_equal(got, golden):
            bad = int(np.argmax((got != golden).any(1)))
            sys.exit(f"da4ml {name} != golden on vector {bad}: {got[bad]} vs {golden[bad]}")
    return n


def synth_da4ml(logic: object, work: Path) -> SynthResult:
    from da4ml.codegen import VerilogModel

    VerilogModel(logic, "dense", work / "da4ml", latency_cutoff=LATENCY_CUTOFF).write()
    src = work / "da4ml" / "src"
    # Its static library also holds a table and a multiplier module that this layer does
    # not use (the table reads a .mem file): only the modules it instantiates.
    files = sorted(src.glob("*.v")) + [
        p
        for p in sorted((src / "static").glob("*.v"))
        if p.stem in ("shift_adder", "negative", "mux")
    ]
    return synthesize(files, "dense", target_mhz=TARGET_MHZ, workdir=work / "da4ml_synth")


def synth_amaranth(component: object, work: Path, name: str) -> SynthResult:
    path = work / f"{name}.v"
    path.write_text(verilog.convert(component, name=name, emit_src=False))
    return synthesize([path], name, target_mhz=TARGET_MHZ, workdir=work / f"{name}_synth")


def matvec(layer: Linear, levels: int) -> MatVec:
    shift = acc_frac(layer, IN_FORMAT) - layer.out_format.frac
    return MatVec(
        layer_matrix(layer),
        layer.bias,
        IN_FORMAT,
        layer.out_format,
        shift,
        layer.relu,
        acc_bits(layer, IN_FORMAT),
        levels,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=2000, help="random vectors checked")
    parser.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="adder levels/stage")
    parser.add_argument("--skip-engine", action="store_true", help="no whole-engine synthesis")
    args = parser.parse_args(argv)
    try:
        import da4ml
    except ImportError:
        sys.exit('da4ml is not installed: pip install -e ".[bench]"')
    rng = np.random.default_rng(2026)
    results: dict[str, tuple[SynthResult, SynthResult]] = {}
    print(f"dense {CIN}->{COUT}, input {IN_FORMAT}, output {OUT_FORMAT}, da4ml {da4ml.__version__}")
    with tempfile.TemporaryDirectory(prefix="vs_da4ml-") as tmp:
        work = Path(tmp)
        for kind, wfmt in FORMATS.items():
            layer = make_layer(wfmt, rng)
            logic = da4ml_logic(layer)
            n = check_equal(layer, logic, args.vectors, rng)
            print(f"{kind} ({wfmt}): da4ml interpreter == hwgen golden on {n} vectors")
            core = matvec(layer, args.levels)
            print(
                f"{kind}: hwgen adder graph {len(core.graph.nodes)} adders, latency "
                f"{core.latency} cycles; da4ml estimated cost {logic.cost:g}"
            )
            (work / kind).mkdir()
            results[kind] = (
                synth_amaranth(core, work / kind, "unrolled"),
                synth_da4ml(logic, work / kind),
            )
        engine = None
        if not args.skip_engine:
            layer = make_layer(FORMATS["pow2"], np.random.default_rng(2026))
            engine = synth_amaranth(
                UnrolledEngine(layer, IN_FORMAT, (CIN,), args.levels), work, "engine"
            )

    print(f"\n{'design (ECP5-85F)':34} {'LUT':>6} {'FF':>6} {'DSP':>4} {'Fmax MHz':>9}")
    for kind, (ours, theirs) in results.items():
        for name, r in ((f"hwgen unrolled, {kind}", ours), (f"da4ml pipelined, {kind}", theirs)):
            r_ = r.resources
            print(f"{name:34} {r_.luts:>6} {r_.ffs:>6} {r_.dsps:>4} {r.fmax_mhz:>9.1f}")
    if engine is not None:
        r_ = engine.resources
        name = "hwgen stream engine, pow2"
        print(f"{name:34} {r_.luts:>6} {r_.ffs:>6} {r_.dsps:>4} {engine.fmax_mhz:>9.1f}")
    print()
    for kind, (ours, theirs) in results.items():
        print(f"unrolled/da4ml LUT ratio {kind}: {ours.resources.luts / theirs.resources.luts:.3f}")
    ours, theirs = results["pow2"]
    print(f"unrolled/da4ml Fmax ratio pow2: {ours.fmax_mhz / theirs.fmax_mhz:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
