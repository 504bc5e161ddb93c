"""The ``hwgen`` command line: subcommands only, the work lives in the modules they call.

Every user error is one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from hwgen.errors import HwgenError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no multi-line usage dump), raised as HwgenError."""

    def error(self, message: str) -> NoReturn:
        raise HwgenError(f"{self.prog}: {message} (see --help)")


def _not_yet(issue: int) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        raise HwgenError(f"hwgen {args.command}: not available yet (tracked in issue #{issue})")

    return run


def _cmd_golden(args: argparse.Namespace) -> None:
    from hwgen.commands import golden

    golden(args.model, args.input, args.output)


def _cmd_demo(args: argparse.Namespace) -> None:
    from hwgen.commands import demo

    demo(args.output)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hwgen", description="Quantized CNNs to verified shift-and-add FPGA hardware.")
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

    for name, issue, text in (
        ("quantize", 3, "quantize a float model to a .hwq"),
        ("tune", 3, "search per-layer bit widths; write a report and precision.toml"),
        ("build", 4, "generate Verilog, ROM contents and test vectors from a .hwq"),
        ("sim", 4, "simulate a build in cocotb against the golden model"),
        ("synth", 5, "synthesise a build with Yosys/nextpnr and report resources and Fmax"),
    ):
        s = sub.add_parser(name, help=f"{text} (not available yet)", add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_not_yet(issue))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except HwgenError as e:
        print(f"hwgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
