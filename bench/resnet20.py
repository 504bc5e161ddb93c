"""ResNet-20 (CIFAR-10, option-A shortcuts) on the ULX3S (ECP5-85F): fold, build, verify, place.

The network is the built-in ``resnet20`` (``hwgen.examples.resnet``) with seeded random
weights and BatchNorm statistics, imported from its ``nn.Module`` and quantised pow2 5-bit
post-training with calibration on random images (no CIFAR here). ``hwgen.hw.folding``
folds it for the target rate on the ECP5-85F, and it is built with a ULX3S bitstream
(``hwgen build --board ulx3s-85f``: the network behind a UART, its clock from the PLL at
``--clock-mhz``; nextpnr fails the build when that clock is not met, and then the Fmax it
reached, from its kept log, is what this bench prints, the network rebuilt without the
board for the simulation). The build is
simulated whole (cocotb + Verilator, random stalls on both ends) against the golden model
and its steady-state cycles per inference measured by the difference method,
``(cycles(N images) - cycles(M images)) / (N - M)`` without stalls, over the slowest
layer's ideal ``MACs / (PE*SIMD)``. LUT4 (nextpnr's TRELLIS_COMB: LUT4s and carry halves),
block RAMs and Fmax are the board build's nextpnr figures (``board/top.tim``), so they
include the UART and host link; inferences per second are Fmax over cycles.

The last lines printed are ``resnet20 RTL == golden: K/N images``, ``resnet20
cycles/ideal: X``, ``resnet20 LUT4: N``, ``resnet20 BRAM: N``, ``resnet20 fmax MHz: X`` and
``resnet20 inferences per second: X``.

    python bench/resnet20.py [-o DIR] [--images N] [--fps F] [--clock-mhz F] [--skip-board]
    python bench/resnet20.py -o DIR --reuse   # an earlier build of this bench, or of
                                              # hwgen build --board ulx3s-85f
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from hwgen.commands import Phases, make_console
from hwgen.emit import BuildOptions, build
from hwgen.errors import HwgenError
from hwgen.examples.resnet import CIFAR_SHAPE, random_resnet20
from hwgen.frontend.graph import FAdd, FConv2d, FLinear, FloatNet
from hwgen.frontend.torch_import import from_module
from hwgen.hw.folding import FoldingPlan, solve
from hwgen.ir import Network
from hwgen.quant import quantize
from hwgen.quant.precision import Precision, for_layers
from hwgen.simulate import simulate_layer
from hwgen.synth import DEVICES, nextpnr_log_summary

DEVICE = "ecp5-85f"
BOARD = "ulx3s-85f"


def quantized(fnet: FloatNet, seed: int) -> Network:
    """pow2 5-bit post-training, activations calibrated on random images."""
    macs = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    adds = [fl.name for fl in fnet.layers if isinstance(fl, FAdd)]
    p = for_layers(Precision("pow2"), macs, adds).override("pow2", 5, None)
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(64, *fnet.input_shape))
    return quantize(fnet, p, x, progress=False).net


def print_plan(plan: FoldingPlan) -> None:
    w = max(len(p.name) for p in plan.layers)
    print(f"{'layer':{w}} {'PE':>3} {'SIMD':>4} {'cycles':>7} {'LUT4~':>6} {'BRAM~':>5}  ROM")
    for p in plan.layers:
        rom = f"{p.rom_bits} bits in {p.rom_storage} ({p.rom_blocks} blocks)" if p.rom_bits else ""
        print(f"{p.name:{w}} {p.pe:3} {p.simd:4} {p.cycles:7} {p.luts:6} {p.brams:5}  {rom}")
    print(
        f"slowest {plan.cycles} cycles ({plan.fps:,.0f}/s at {plan.clock_mhz:g} MHz), "
        f"~{plan.luts} LUT4, ~{plan.brams} block RAMs (skip FIFOs {plan.fifo_blocks})"
    )


def network_run(out: Path, images: int, stalls: float, seed: int) -> tuple[int, int, int]:
    """(images equal, images, cycles) of one whole-network simulation."""
    r = simulate_layer(out, "network", stalls, seed, vectors=images)
    if not r.ok:
        print(f"mismatch: {r.first_mismatch}", file=sys.stderr)
    return r.images_equal, r.images, r.cycles


def board_figures(log: Path) -> tuple[int, int, float]:
    """(LUT4, block RAMs, Fmax MHz of the slowest clock) from the board build's nextpnr log,
    zeros when there is none (a build copied before its bitstream finished)."""
    if not log.is_file():
        print(f"no nextpnr log {log}: no LUT4, BRAM or Fmax", file=sys.stderr)
        return 0, 0, 0.0
    clocks, util = nextpnr_log_summary(log.read_text())
    print(f"nextpnr: clocks {clocks}; utilisation {json.dumps(util)}")
    return util["TRELLIS_COMB"][0], util["DP16KD"][0], min(clocks.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path("resnet20-build"))
    ap.add_argument("--images", type=int, default=20, help="random images (>= 20)")
    ap.add_argument("--fps", type=float, default=1000.0, help="target inferences per second")
    ap.add_argument("--clock-mhz", type=float, default=100.0)
    ap.add_argument("--stalls", type=float, default=0.3)
    ap.add_argument("--skip-board", action="store_true", help="no bitstream (and no Fmax)")
    ap.add_argument("--reuse", action="store_true", help="simulate the build already in -o")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pnr-seed", type=int, help="nextpnr's placement seed")
    args = ap.parse_args()

    t0 = time.perf_counter()
    failed_log: Path | None = None
    if args.reuse:
        manifest = json.loads((args.output / "manifest.json").read_text())
    else:
        fnet = from_module(random_resnet20(args.seed), CIFAR_SHAPE, name="resnet20")
        net = quantized(fnet, args.seed + 1)
        plan = solve(net, DEVICE, args.clock_mhz, args.fps)
        print_plan(plan)
        board = None if args.skip_board else BOARD
        opts = BuildOptions(
            folding=plan.foldings,
            vectors=args.images,
            seed=args.seed,
            board=board,
            board_mhz=args.clock_mhz,
            pnr_seed=args.pnr_seed,
        )
        try:
            manifest = build(net, args.output, opts, phase=Phases(make_console()))
        except HwgenError as e:  # e.g. nextpnr missed the clock: its kept log has the Fmax
            print(f"board build failed: {e}", file=sys.stderr)
            failed_log = args.output.parent / f"{args.output.name}.logs" / "top.tim"
            opts = replace(opts, board=None)
            manifest = build(net, args.output, opts, phase=Phases(make_console()))
        print(f"quantised and built in {time.perf_counter() - t0:.0f} s")

    total = manifest["top"]["vector_images"]  # with the build's all-max and all-min images
    t0 = time.perf_counter()
    equal, images, _ = network_run(args.output, total, args.stalls, args.seed)
    _, _, few = network_run(args.output, 2, 0.0, args.seed)
    _, _, many = network_run(args.output, total, 0.0, args.seed)
    cycles = (many - few) / (total - 2)
    ideal = max(e["ideal_cycles"] for e in manifest["layers"])
    print(f"simulated in {time.perf_counter() - t0:.0f} s: {few} cycles (2), {many} ({total})")

    luts = brams = 0
    fmax = 0.0
    if "board" in manifest or failed_log is not None:
        luts, brams, fmax = board_figures(failed_log or args.output / "board" / "top.tim")
        dev = DEVICES[DEVICE]
        print(f"{DEVICE}: {dev.luts} LUT4, {dev.brams} block RAMs")
    print(f"resnet20 RTL == golden: {equal}/{images} images")
    print(f"resnet20 cycles/ideal: {cycles / ideal:.3f}")
    print(f"resnet20 LUT4: {luts}")
    print(f"resnet20 BRAM: {brams}")
    print(f"resnet20 fmax MHz: {fmax:.1f}")
    print(f"resnet20 inferences per second: {fmax * 1e6 / cycles:.0f}")


if __name__ == "__main__":
    main()
