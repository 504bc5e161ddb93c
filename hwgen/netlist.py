"""Netlist passes on Yosys's JSON between synthesis and place-and-route.

``absorb_bram_outregs``: Yosys maps a memory's synchronous read to an ECP5 DP16KD in
``NOREG`` mode, and a register after it (the weight ROMs' bank registers, hwgen.hw.rom) to
fabric flip-flops. The block RAM's clock-to-out without its output register is about
5.6 ns, so the path block RAM -> flip-flop alone caps a design near 145 MHz. DP16KD has an
output register per port (``REGMODE_x = "OUTREG"``: the data one clock later, from a
register inside the block): the same function as block RAM + flip-flop, with a fast
clock-to-out. Yosys does not use it (its ECP5 memory library has no such option), so this
pass moves each such flip-flop into the block.

A read port is absorbed only when the function is certainly the same:

- an 18-bit or narrower port of a true dual-port configuration: ``REGMODE_A`` /
  ``REGMODE_B`` register ``DOA`` / ``DOB`` on ``CLKA`` / ``CLKB``. The 36-bit
  configuration (``DATA_WIDTH_A = 36``, pseudo dual-port) has one read port on ``CLKB``
  whose 36 bits come out of ``DOA`` and ``DOB`` both: it is absorbed as a whole, with both
  ``REGMODE``s ``OUTREG`` and both ``OCE``s driven alike, as in the DP16KD nextpnr itself
  makes of a ``PDPW16KD`` with ``REGMODE = "OUTREG"`` (it copies ``REGMODE`` to both
  halves and drives ``OCEB`` by ``OCER``, leaving ``OCEA`` at 1);
- every output bit of the port that is used drives exactly one cell input, the ``DI`` of
  a ``TRELLIS_FF``, and nothing else (no module port);
- each such flip-flop is clocked by the port's clock (both uninverted), has no set/reset
  (no ``LSR``, or ``LSR`` tied to 0) and resets to 0 (``REGSET = "RESET"``, the output
  register's value after configuration); all of them have the same clock enable (an
  uninverted ``CE`` net, or none): it becomes the output register's ``OCE``;
- the port's ``RST`` inputs are tied to 0 (the output register would obey them).

The flip-flops are removed, their ``Q`` nets driven by the block's outputs, ``REGMODE``
set to ``OUTREG`` and ``OCE`` (the output register's clock enable) driven by their enable.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

PDP_WIDTH = 36  # DATA_WIDTH_A of the pseudo dual-port (one 36-bit read port) mode


def _param(cell: dict[str, Any], name: str) -> str:
    """A cell parameter as text (Yosys writes numbers as binary strings)."""
    value = cell["parameters"].get(name, "")
    return value.rstrip() if isinstance(value, str) else str(value)


def _width(cell: dict[str, Any], port: str) -> int:
    text = _param(cell, f"DATA_WIDTH_{port}")
    return int(text, 2) if set(text) <= {"0", "1"} and text else int(text or 0)


def _tied(cell: dict[str, Any], port: str, value: str) -> bool:
    return cell["connections"].get(port) == [value]


def _ff_enable(ff: dict[str, Any], clock: list[Any]) -> list[Any] | None:
    """The clock enable (``["1"]`` when always enabled) of a reset-free flip-flop on
    ``clock`` that starts at 0; None for any other cell."""
    cemux = _param(ff, "CEMUX")
    no_reset = _param(ff, "LSRMUX") == "LSR" and _tied(ff, "LSR", "0")
    if not (
        ff["type"] == "TRELLIS_FF"
        and _param(ff, "CLKMUX") == "CLK"
        and ff["connections"].get("CLK") == clock
        and no_reset
        and _param(ff, "REGSET") == "RESET"
    ):
        return None
    if cemux == "1":
        return ["1"]
    return ff["connections"].get("CE") if cemux == "CE" else None


def _read_ports(bram: dict[str, Any]) -> list[tuple[str, str]]:
    """A block's read ports as (output halves, clock port letter)."""
    if _width(bram, "A") == PDP_WIDTH:
        return [("AB", "B")]
    return [(p, p) for p in "AB" if _width(bram, p) <= 18]


def absorb_bram_outregs(netlist: dict[str, Any], top: str) -> int:
    """Move eligible flip-flops after DP16KD read ports into the blocks' output registers
    (see the module docstring), in place. Returns the number of flip-flops moved."""
    module = netlist["modules"][top]
    cells: dict[str, dict[str, Any]] = module["cells"]
    sinks: dict[Any, list[tuple[str, str]]] = defaultdict(list)
    for name, cell in cells.items():
        for port, bits in cell["connections"].items():
            if cell["port_directions"].get(port) == "input":
                for bit in bits:
                    sinks[bit].append((name, port))
    outputs = {b for p in module["ports"].values() for b in p["bits"]}

    absorbed = 0
    for name in sorted(n for n, c in cells.items() if c["type"] == "DP16KD"):
        bram = cells[name]
        for halves, p in _read_ports(bram):
            if any(_param(bram, f"REGMODE_{h}") != "NOREG" for h in halves):
                continue
            clock = bram["connections"].get(f"CLK{p}")
            if _param(bram, f"CLK{p}MUX") != f"CLK{p}" or not all(
                _tied(bram, f"RST{h}", "0") for h in halves
            ):
                continue
            pins = [k for k in bram["connections"] if k.startswith(tuple(f"DO{h}" for h in halves))]
            moves = []  # (pin, flip-flop name)
            enables = set()
            ok = True
            for pin in sorted(pins):
                (bit,) = bram["connections"][pin]
                users = sinks.get(bit, [])
                if not users and bit not in outputs:
                    continue
                if bit in outputs or len(users) != 1 or users[0][1] != "DI":
                    ok = False
                    break
                enable = _ff_enable(cells[users[0][0]], clock)
                if enable is None:
                    ok = False
                    break
                enables.add(tuple(enable))
                moves.append((pin, users[0][0]))
            # one output register, so one clock enable (OCE) for all its bits
            if not ok or not moves or len(enables) != 1:
                continue
            (oce,) = enables
            for pin, ff_name in moves:
                bram["connections"][pin] = cells[ff_name]["connections"]["Q"]
                del cells[ff_name]
            for h in halves:
                bram["parameters"][f"REGMODE_{h}"] = "OUTREG"
                bram["connections"][f"OCE{h}"] = list(oce)
            absorbed += len(moves)
    return absorbed


def absorb_file(path: Path, top: str) -> int:
    """``absorb_bram_outregs`` on a Yosys JSON file, rewritten only when something moved."""
    netlist = json.loads(path.read_text())
    moved = absorb_bram_outregs(netlist, top)
    if moved:
        path.write_text(json.dumps(netlist))
    return moved
