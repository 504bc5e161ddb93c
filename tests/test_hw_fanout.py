"""Register copies: kept apart through Yosys, each driving its share of the loads."""

import json
from pathlib import Path

import numpy as np
from amaranth import Module, Signal
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hwgen.hw.fanout import SLICE_BITS, copies, slices
from hwgen.hw.rom import WeightROM
from hwgen.synth import synthesize


class Fanned(wiring.Component):
    """Four copies of one register, each into its own register of a different function."""

    a: In(8)
    s: In(3)
    o: Out(32)

    def __init__(self, n: int) -> None:
        self.n = n
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        regs = copies(m, self.a, self.n, "a")
        for k in range(4):
            out = Signal(8, name=f"o{k}")
            m.d.sync += out.eq(regs[k % self.n] << (self.s + k))
            m.d.comb += self.o[8 * k : 8 * k + 8].eq(out)
        return m


def ffs_driving(netlist: dict, prefix: str) -> int:
    """Flip-flops whose output is a bit of a net named ``prefix...``."""
    module = netlist["modules"]["top"]
    qs = {c["connections"]["Q"][0] for c in module["cells"].values() if c["type"] == "TRELLIS_FF"}
    bits = {
        b for name, n in module["netnames"].items() if name.startswith(prefix) for b in n["bits"]
    }
    return len(qs & bits)


def synthesized(tmp_path: Path, dut: wiring.Component) -> dict:
    tmp_path.mkdir(exist_ok=True)
    src = tmp_path / "top.v"
    src.write_text(verilog.convert(dut, name="top", emit_src=False))
    synthesize([src], "top", place_route=False, workdir=tmp_path / "work")
    return json.loads((tmp_path / "work" / "netlist.json").read_text())


def test_slices_cover_the_word():
    assert slices(160) == [(0, 32), (32, 64), (64, 96), (96, 128), (128, 160)]
    assert slices(40) == [(0, SLICE_BITS), (SLICE_BITS, 40)] and slices(5) == [(0, 5)]


def test_copies_load_every_cycle_and_stay_apart_in_yosys(tmp_path):
    m = Module()
    a = Signal(8)
    regs = copies(m, a, 3, "a")
    got = []

    async def bench(ctx):
        for v in (0x81, 0x3C, 0xFF):
            ctx.set(a, v)
            await ctx.tick()
            got.append([ctx.get(r) for r in regs])

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert got == [[v] * 3 for v in (0x81, 0x3C, 0xFF)]
    assert all(r.attrs == {"keep": 1} for r in regs)
    assert ffs_driving(synthesized(tmp_path / "four", Fanned(4)), "a_c") == 4 * 8
    # one register: the same loads share it
    assert ffs_driving(synthesized(tmp_path / "one", Fanned(1)), "a") == 8


def test_logic_rom_reads_each_slice_at_its_own_address_copy(tmp_path):
    rng = np.random.default_rng(0)
    init = [int(v) for v in rng.integers(0, 1 << 62, 72)]
    wide = [v | (v << 62) | (v << 98) for v in init]  # 160 bits
    net = synthesized(tmp_path, WeightROM(width=160, depth=72, init=wide, storage="logic"))
    # banks of 32, 32 and 8 words, five 32-bit slices each; the select's last register
    # once per slice
    assert ffs_driving(net, "bank0_addr_c") == ffs_driving(net, "bank1_addr_c") == 5 * 5
    assert ffs_driving(net, "bank2_addr_c") == 5 * 3
    assert ffs_driving(net, "bank_sel2_c") == 5 * 2
