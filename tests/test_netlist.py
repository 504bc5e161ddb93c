"""The block-RAM output-register pass on real Yosys netlists and on hand-made ones."""

import json
from pathlib import Path

import pytest
from amaranth import Module, Signal, unsigned
from amaranth.back import verilog
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out
from conftest import tiny_netlist

from hwgen.hw.rom import WeightROM
from hwgen.netlist import absorb_bram_outregs
from hwgen.synth import synthesize


class EnabledRead(wiring.Component):
    """A ROM whose read data goes to a register with an enable."""

    addr: In(9)
    en: In(1)
    data: Out(16)

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = memory.Memory(
            shape=unsigned(16), depth=512, init=[i * 7 % 65536 for i in range(512)]
        )
        rd = mem.read_port()
        held = Signal(16, reset_less=True)
        m.d.comb += [rd.addr.eq(self.addr), self.data.eq(held)]
        with m.If(self.en):
            m.d.sync += held.eq(rd.data)
        return m


def synthesized(tmp_path: Path, dut: wiring.Component) -> tuple[dict, int, int]:
    """(netlist after the pass, TRELLIS_FF count before, after)."""
    tmp_path.mkdir(exist_ok=True)
    src = tmp_path / "top.v"
    src.write_text(verilog.convert(dut, name="top", emit_src=False))
    res = synthesize([src], "top", place_route=False, workdir=tmp_path / "work")
    stat = json.loads((tmp_path / "work" / "stat.json").read_text())
    before = stat["modules"]["\\top"]["num_cells_by_type"]["TRELLIS_FF"]
    return json.loads((tmp_path / "work" / "netlist.json").read_text()), before, res.resources.ffs


def brams(netlist: dict) -> list[dict]:
    return [c for c in netlist["modules"]["top"]["cells"].values() if c["type"] == "DP16KD"]


def data_register_inputs(netlist: dict) -> set:
    """The nets into the flip-flops that drive the module's ``data`` port."""
    module = netlist["modules"]["top"]
    data = set(module["ports"]["data"]["bits"])
    return {
        c["connections"]["DI"][0]
        for c in module["cells"].values()
        if c["type"] == "TRELLIS_FF" and c["connections"]["Q"][0] in data
    }


def test_an_18_bit_bank_register_moves_into_the_block(tmp_path):
    init = [(i * 2654435761) % (1 << 18) for i in range(600)]
    netlist, before, after = synthesized(tmp_path, WeightROM(width=18, depth=600, init=init))
    (bram,) = brams(netlist)
    ports = {p for p in "AB" if bram["parameters"][f"REGMODE_{p}"] == "OUTREG"}
    assert len(ports) == 1 and before - after == 18
    (p,) = ports
    assert bram["connections"][f"OCE{p}"] == ["1"]
    # The block's outputs now drive the nets the flip-flops drove: the inputs of the
    # registers of the module's data port (the bank's second register).
    last = data_register_inputs(netlist)
    assert {bram["connections"][f"DO{p}{k}"][0] for k in range(18)} == last and len(last) == 18


def test_a_36_bit_block_moves_its_whole_read_port_into_both_halves(tmp_path):
    # 40 x 300: two blocks in the pseudo dual-port 36-bit mode, one read port on CLKB whose
    # bits come out of DOA and DOB
    wide = WeightROM(width=40, depth=300, init=[(i * 2654435761) % (1 << 40) for i in range(300)])
    netlist, before, after = synthesized(tmp_path, wide)
    blocks = brams(netlist)
    assert len(blocks) == 2 and before - after == 40
    driven = set()
    for b in blocks:
        assert int(b["parameters"]["DATA_WIDTH_A"], 2) == 36
        assert b["parameters"]["REGMODE_A"] == b["parameters"]["REGMODE_B"] == "OUTREG"
        assert b["connections"]["OCEA"] == b["connections"]["OCEB"] == ["1"]
        driven |= {v[0] for k, v in b["connections"].items() if k.startswith("DO")}
    assert data_register_inputs(netlist) <= driven


def test_an_enabled_register_moves_with_its_enable_as_the_output_clock_enable(tmp_path):
    netlist, before, after = synthesized(tmp_path, EnabledRead())
    (bram,) = brams(netlist)
    (p,) = (p for p in "AB" if bram["parameters"][f"REGMODE_{p}"] == "OUTREG")
    assert before > 0 and after == 0  # (the 4 high bits of every word are 0)
    en = netlist["modules"]["top"]["ports"]["en"]["bits"]
    assert bram["connections"][f"OCE{p}"] == en


def pdp(n: dict) -> dict:
    """``n``'s block in the 36-bit mode, its DOA0 feeding a second flip-flop on CLKB."""
    top = n["modules"]["top"]
    ram = top["cells"]["ram"]
    ram["parameters"]["DATA_WIDTH_A"] = ram["parameters"]["DATA_WIDTH_B"] = f"{36:032b}"
    ram["port_directions"] |= {"RSTA": "input", "OCEA": "input", "DOA0": "output"}
    ram["connections"] |= {"CLKA": ["0"], "RSTA": ["0"], "OCEA": ["0"], "DOA0": [20]}
    ff2 = json.loads(json.dumps(top["cells"]["ff"]))
    ff2["parameters"] = {"CLKMUX": "CLK", "CEMUX": "1", "LSRMUX": "LSR", "REGSET": "RESET"}
    ff2["connections"] |= {"DI": [20], "Q": [21]}
    top["cells"]["ff2"] = ff2
    top["ports"]["q2"] = {"direction": "output", "bits": [21]}
    return n


@pytest.mark.parametrize(
    ("change", "moved"),
    [
        ({}, 2),
        ({"RSTA": [5]}, 0),  # the output register would obey RSTA
        ({"CLKA": [2], "CLKB": [3]}, 0),  # the registers are on CLKA's net, not the read clock
    ],
)
def test_a_36_bit_read_port_moves_as_a_whole_or_not_at_all(change, moved):
    n = pdp(tiny_netlist({}))
    ram = n["modules"]["top"]["cells"]["ram"]
    ram["connections"] |= change
    assert absorb_bram_outregs(n, "top") == moved
    regmodes = {ram["parameters"]["REGMODE_A"], ram["parameters"]["REGMODE_B"]}
    assert regmodes == ({"OUTREG"} if moved else {"NOREG"})
    if moved:
        assert ram["connections"]["OCEA"] == ram["connections"]["OCEB"] == ["1"]
        assert ram["connections"]["DOA0"] == [21] and ram["connections"]["DOB0"] == [11]


@pytest.mark.parametrize(
    ("ff_params", "extra_sink", "out_port", "moved"),
    [
        ({}, False, False, 1),
        ({"CEMUX": "CE"}, False, False, 0),  # CE unconnected
        ({"CEMUX": "CE", "CE": [7]}, False, False, 1),  # OCEB = CE's net
        ({"CEMUX": "INV", "CE": [7]}, False, False, 0),  # enabled when the net is 0
        ({"REGSET": "SET"}, False, False, 0),  # starts at 1
        ({"CLKMUX": "INV"}, False, False, 0),
        ({"CEMUX": "0"}, False, False, 0),  # never enabled
        ({"LSRMUX": "INV"}, False, False, 0),  # LSR tied 0, inverted: always in reset
        ({}, True, False, 0),  # DOB0 also feeds a LUT
        ({}, False, True, 0),  # DOB0 is also a module output
    ],
)
def test_only_a_plain_register_alone_on_the_output_moves(ff_params, extra_sink, out_port, moved):
    ce = ff_params.pop("CE", None)
    n = tiny_netlist(ff_params, extra_sink, out_port)
    if ce:
        ff = n["modules"]["top"]["cells"]["ff"]
        ff["port_directions"]["CE"] = "input"
        ff["connections"]["CE"] = ce
    assert absorb_bram_outregs(n, "top") == moved
    ram = n["modules"]["top"]["cells"]["ram"]
    assert (ram["parameters"]["REGMODE_B"] == "OUTREG") == bool(moved)
    if moved:
        assert ram["connections"]["DOB0"] == [11] and "ff" not in n["modules"]["top"]["cells"]
        assert ram["connections"]["OCEB"] == (ce or ["1"])
