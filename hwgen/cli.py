"""The ``hwgen`` command line: subcommands only, the work lives in the modules they call.

Every user error is one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from hwgen.errors import HwgenError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no multi-line usage dump), raised as HwgenError."""

    def error(self, message: str) -> NoReturn:
        raise HwgenError(f"{self.prog}: {message} (see --help)")


QUANT_SCHEMES = (
    "auto", "fixed", "inq", "pow2", "ternary", "binary", "bc", "twn", "lab", "lat", "dqc",
    "ttq", "amq",
)  # fmt: skip
TUNE_SCHEMES = tuple(s for s in QUANT_SCHEMES if s != "auto")
EPOCHS_HELP = (
    "retraining epochs: per INQ step (inq, ternary, binary), in all (bc, twn, lab, lat, dqc, "
    "ttq, amq)"
)


def _not_yet(issue: int) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        raise HwgenError(f"hwgen {args.command}: not available yet (tracked in issue #{issue})")

    return run


def _cmd_golden(args: argparse.Namespace) -> None:
    from hwgen.commands import golden

    golden(args.model, args.input, args.output)


def _cmd_demo(args: argparse.Namespace) -> None:
    from hwgen.commands import make_console
    from hwgen.demo import run
    from hwgen.fsutil import check_output

    check_output(args.output, "folder", replaced=False)  # the demo writes into its folder
    run(args.output, console=make_console())


def _cmd_tune(args: argparse.Namespace) -> None:
    from hwgen.commands import tune

    compression = {
        "max_sparsity": args.max_sparsity,
        "block": args.block,
        "sweep": args.compression_sweep,
        "max_pe": args.pe,
        "max_simd": args.simd,
        "folding": args.folding,
    }
    tune(args.model, args.scheme, args.max_drop, args.data, args.epochs, args.output, compression)


def _cmd_quantize(args: argparse.Namespace) -> None:
    from hwgen.commands import quantize

    quantize(
        args.model,
        args.output,
        scheme=args.scheme,
        bits=args.bits,
        act_bits=args.act_bits,
        precision_path=args.precision,
        data=args.data,
        epochs=args.epochs,
        prune=args.prune,
        block=args.block,
        lowrank=args.lowrank,
        lowrank_energy=args.lowrank_energy,
        lowrank_layers=args.lowrank_layers,
        zero=not args.no_zero,
    )


def _cmd_build(args: argparse.Namespace) -> None:
    from hwgen.commands import build

    build(
        args.model,
        args.output,
        args.pe,
        args.simd,
        args.folding,
        args.rom_style,
        args.vectors,
        args.board,
        args.clock_mhz,
        args.baud,
        target_fps=args.target_fps,
        device=args.device,
        engine=args.engine,
        pnr_seed=args.pnr_seed,
    )


def _cmd_sim(args: argparse.Namespace) -> None:
    from hwgen.commands import sim

    targets = [args.layer] if args.layer else (["network"] if args.network else None)
    ok = sim(
        args.build_dir,
        targets,
        args.simulator,
        args.images or args.vectors,
        args.stalls,
        args.waves,
        args.seed,
    )
    if not ok:
        raise SystemExit(1)


def _cmd_synth(args: argparse.Namespace) -> None:
    from hwgen.commands import synth

    synth(args.build_dir, args.device, args.target_mhz)


def _cmd_run(args: argparse.Namespace) -> None:
    from hwgen.commands import run

    run(args.port, args.build_dir, args.images, args.baud)


def _version() -> str:
    try:
        return importlib.metadata.version("hwgen")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hwgen", description="Quantized CNNs to verified shift-and-add FPGA hardware.")
    p.add_argument("--version", action="version", version=f"hwgen {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("golden", help="run the integer golden model; write every layer's output")
    g.add_argument("model", type=Path, help="quantized model (.hwq)")
    g.add_argument(
        "input",
        type=Path,
        help="input batch, NCHW .npy (integers in the input format, or floats to quantise with it)",
    )
    g.add_argument("-o", "--output", type=Path, required=True, help="output .npz")
    g.set_defaults(func=_cmd_golden)

    d = sub.add_parser("demo", help="the whole flow on the bundled digits example")
    d.add_argument("-o", "--output", type=Path, default=Path("hwgen-demo"), help="output folder")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("tune", help="search per-layer bit widths; write report + precision.toml")
    t.add_argument("model", help="ONNX file or built-in example (digits, digits-res, resnet20)")
    t.add_argument(
        "--scheme",
        choices=TUNE_SCHEMES,
        default="fixed",
        help="quantisation scheme searched (default: fixed); see hwgen quantize --help",
    )
    t.add_argument(
        "--max-drop",
        type=float,
        required=True,
        metavar="POINTS",
        help="accuracy drop allowed against the float model, in percentage points",
    )
    t.add_argument(
        "--data",
        type=Path,
        help="calibration/evaluation .npz: x, y (optional x_test, y_test, x_train, y_train)",
    )
    t.add_argument("--epochs", type=int, help=EPOCHS_HELP)
    t.add_argument(
        "--max-sparsity",
        type=float,
        metavar="FRACTION",
        help="after the bits, raise each layer's block-prune fraction (0.25, 0.5, 0.75, 0.9, "
        "up to this) while the accuracy stays within the budget, retrained (fixed, pow2, inq, "
        "ternary, twn, lat, ttq, dqc)",
    )
    t.add_argument(
        "--block",
        type=int,
        default=4,
        help="prune in blocks of this many input channels (default 4: the build's SIMD)",
    )
    t.add_argument(
        "--compression-sweep",
        action="store_true",
        help="also measure accuracy, weight ROM bits and cycles per inference at network-wide "
        "prune fractions 0.25-0.9 and low ranks 1-8 of the conv layers, for the report",
    )
    t.add_argument("--pe", type=int, help="the sweep's folding: as hwgen build --pe")
    t.add_argument("--simd", type=int, help="the sweep's folding: as hwgen build --simd")
    t.add_argument("--folding", type=Path, help="the sweep's folding: as hwgen build --folding")
    t.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    t.set_defaults(func=_cmd_tune)

    q = sub.add_parser("quantize", help="quantize a float model to a .hwq")
    q.add_argument("model", help="ONNX file or built-in example (digits, digits-res, resnet20)")
    q.add_argument(
        "--scheme",
        choices=QUANT_SCHEMES,
        metavar="SCHEME",
        help="quantisation scheme (needed without --precision; overrides its scheme): fixed, "
        "pow2 (no retraining), inq, ternary, binary (INQ); learned, retrained: bc "
        "(BinaryConnect), twn, lab, lat (loss-aware binary/ternary), each with a scale per "
        "output channel; dqc, ttq (shift-add codebooks); amq (alternating multi-bit); auto "
        "keeps the weights of a model already quantized elsewhere, whose float weights sit "
        "exactly on a power-of-two or fixed-point grid, and only chooses activation formats",
    )
    q.add_argument(
        "--bits",
        type=int,
        help="weight bits of every layer (overrides --precision); bc, lab: 1; twn, lat, ttq: "
        "2; dqc: codebook index bits 3-5; amq: binary planes 2-4",
    )
    q.add_argument(
        "--no-zero",
        action="store_true",
        help="dqc: learn every codebook entry (no entry pinned at 0)",
    )
    q.add_argument("--act-bits", type=int, help="activation bits of every layer and the input")
    q.add_argument("--precision", type=Path, help="per-layer precision.toml (from hwgen tune)")
    q.add_argument(
        "--data",
        type=Path,
        help="calibration .npz: x (float NCHW); optional y, x_train/y_train, x_test/y_test",
    )
    q.add_argument(
        "--epochs",
        type=int,
        help=EPOCHS_HELP + "; per step of --prune and in all for --lowrank",
    )
    q.add_argument(
        "--prune",
        type=float,
        metavar="SPARSITY",
        help="prune this fraction of the weights (or blocks) of every conv/linear layer but "
        "the first (it sees the raw image; set it in --precision), gradually with retraining, "
        "before the weight scheme; with fixed, pow2, inq, ternary, twn, lat, ttq, dqc (they "
        "keep zeros)",
    )
    q.add_argument(
        "--block",
        type=int,
        help="with --prune: prune blocks of this many consecutive input channels of one "
        "output channel (default: single weights); make it the build's SIMD so that the "
        "engine can skip whole zero blocks",
    )
    rank = q.add_mutually_exclusive_group()
    rank.add_argument(
        "--lowrank",
        type=int,
        metavar="RANK",
        help="split each KxK conv into Kx1 then 1xK convs of this rank (truncated SVD), "
        "retrained, before pruning and the weight scheme",
    )
    rank.add_argument(
        "--lowrank-energy",
        type=float,
        metavar="E",
        help="as --lowrank, at the smallest rank keeping this fraction (0..1] of the energy",
    )
    q.add_argument(
        "--lowrank-layers",
        metavar="NAMES",
        help="comma-separated conv/linear layers to split (default: every conv layer; a "
        "dense layer becomes two thinner ones)",
    )
    q.add_argument("-o", "--output", type=Path, required=True, help="output .hwq")
    q.set_defaults(func=_cmd_quantize)

    b = sub.add_parser("build", help="generate Verilog, ROM contents and test vectors from a .hwq")
    b.add_argument("model", type=Path, help="quantized model (.hwq)")
    b.add_argument("-o", "--output", type=Path, required=True, help="build folder")
    b.add_argument(
        "--pe", type=int, help="upper limit of PE per layer (default 4; none with a target)"
    )
    b.add_argument(
        "--simd", type=int, help="upper limit of SIMD per layer (default 4; 8 with a target)"
    )
    b.add_argument("--folding", type=Path, help="folding.toml: [layers.<name>] pe = .., simd = ..")
    b.add_argument(
        "--target-fps",
        type=float,
        help="fold for this many inferences per second at --clock-mhz (default 100 MHz, or "
        "the board's), balanced within the device's LUT and block RAM",
    )
    b.add_argument(
        "--device",
        choices=("ecp5-85f", "up5k"),
        help="fold for the fastest rate that fits this device (default: the --board's)",
    )
    b.add_argument(
        "--engine",
        choices=("folded", "unrolled", "auto"),
        default="folded",
        help="conv and dense layers: folded PE x SIMD lanes with weight ROMs, unrolled "
        "(weights as constants in a shared adder graph, a kernel window at once), or auto "
        "(with --target-fps: unrolled where cheaper for the rate)",
    )
    b.add_argument(
        "--rom-style",
        choices=("inline", "file"),
        default="inline",
        help="ROM contents inline in the Verilog, or $readmemh from rom/*.hex",
    )
    b.add_argument(
        "--vectors",
        type=int,
        default=8,
        help="test images per vector file, besides the all-max and all-min ones",
    )
    b.add_argument(
        "--board",
        choices=("ulx3s-85f", "icebreaker"),
        help="also build a bitstream: the network behind a UART on this board",
    )
    b.add_argument(
        "--clock-mhz",
        type=float,
        help="the network's clock on the board (PLL; default 50 ulx3s, 24 icebreaker) and "
        "for --target-fps",
    )
    b.add_argument("--baud", type=int, default=115200, help="UART baud rate (default 115200)")
    b.add_argument(
        "--pnr-seed",
        type=int,
        help="nextpnr's placement seed for --board (Fmax varies a few percent between seeds)",
    )
    b.set_defaults(func=_cmd_build)

    sm = sub.add_parser("sim", help="simulate a build in cocotb against the golden model")
    sm.add_argument("build_dir", type=Path, help="folder written by hwgen build")
    which = sm.add_mutually_exclusive_group(required=True)
    which.add_argument("--layer", help="one layer's engine")
    which.add_argument("--all", action="store_true", help="every layer's engine")
    which.add_argument("--network", action="store_true", help="the whole network")
    sm.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator")
    sm.add_argument("--vectors", type=int, help="images to simulate (default: all)")
    sm.add_argument("--images", type=int, help="with --network: same as --vectors")
    sm.add_argument(
        "--stalls",
        type=float,
        default=0.0,
        help="probability of an idle input / refused output cycle (0..1)",
    )
    sm.add_argument("--waves", action="store_true", help="write a VCD waveform")
    sm.add_argument("--seed", type=int, default=0, help="stall pattern seed")
    sm.set_defaults(func=_cmd_sim)

    sy = sub.add_parser("synth", help="synthesise a build (Yosys/nextpnr): resources and Fmax")
    sy.add_argument("build_dir", type=Path, help="folder written by hwgen build")
    sy.add_argument(
        "--device", choices=("ecp5-85f", "up5k"), help="default: the build's board, else ecp5-85f"
    )
    sy.add_argument(
        "--target-mhz", type=float, default=150.0, help="clock nextpnr optimises for (default 150)"
    )
    sy.set_defaults(func=_cmd_synth)

    r = sub.add_parser("run", help="send images to a board over UART and print the classes")
    r.add_argument("images", type=Path, help="NCHW .npy: integers in the input format, or floats")
    r.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0")
    r.add_argument(
        "--build",
        type=Path,
        required=True,
        dest="build_dir",
        help="the folder of hwgen build --board",
    )
    r.add_argument("--baud", type=int, help="default: the baud rate the board was built for")
    r.set_defaults(func=_cmd_run)
    return p


def _error(message: str) -> int:
    """Print the one line of a refused command; return its exit code."""
    # Hardware components built before the error are never elaborated: Amaranth would warn
    # about each one when it is collected, after the error line.
    from amaranth.hdl import UnusedElaboratable

    warnings.filterwarnings("ignore", category=UnusedElaboratable)
    print(f"hwgen: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except HwgenError as e:
        return _error(str(e))
    except OSError as e:  # the file system failed under a checked path (disk full, ...)
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("hwgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
