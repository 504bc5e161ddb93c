"""Board-level designs: the AXI4-Stream network wrapper and the UART board top.

``AxiNetwork`` is the network top as users integrate it: one input and one output stream
with AXI4-Stream names at the Verilog boundary (``s_axis_tdata``/``tvalid``/``tready``/
``tlast``, ``m_axis_...``). ``tlast`` marks an image's final beat; the engines count beats
themselves, so an input ``tlast`` in the wrong place is reported on ``s_axis_error``
(sticky) rather than trusted.

``BoardTop`` puts it on a board: clock from a PLL at the target frequency, UART link to the
host (protocol in hwgen.hw.hostlink), the last predicted class on the LEDs.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from amaranth import ClockDomain, Const, Elaboratable, Instance, Module, Signal
from amaranth.lib import cdc, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError
from hwgen.hw.hostlink import HostLink
from hwgen.hw.network import NetworkTop
from hwgen.hw.pll import ecp5_pll, ecp5_pll_config, ice40_pll, ice40_pll_config
from hwgen.hw.uart import UARTRx, UARTTx
from hwgen.ir import Network


class AxiNetwork(wiring.Component):
    """The network with AXI4-Stream port names.

    Members
    -------
    s_axis_tdata : In(in_lanes * in_bits)
    s_axis_tvalid, s_axis_tlast : In(1)
    s_axis_tready : Out(1)
    m_axis_tdata : Out(out_lanes * out_bits)
    m_axis_tvalid, m_axis_tlast : Out(1)
    m_axis_tready : In(1)
    s_axis_error : Out(1)
        Sticky: an input ``tlast`` did not match the image's final beat.
    """

    def __init__(
        self,
        net: Network,
        foldings: Mapping[str, tuple[int, int]],
        rom_style: str = "inline",
        engines: Mapping[str, str] | None = None,
    ) -> None:
        self.top = NetworkTop(net, foldings, rom_style, engines=engines)
        self.in_beats = self.top.infos[0].in_beats
        self.out_beats = self.top.infos[-1].out_beats
        in_width = self.top.i.payload.shape().size
        out_width = self.top.o.payload.shape().size
        super().__init__(
            {
                "s_axis_tdata": In(in_width),
                "s_axis_tvalid": In(1),
                "s_axis_tready": Out(1),
                "s_axis_tlast": In(1),
                "m_axis_tdata": Out(out_width),
                "m_axis_tvalid": Out(1),
                "m_axis_tready": In(1),
                "m_axis_tlast": Out(1),
                "s_axis_error": Out(1),
            }
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        m.submodules.network = top = self.top
        m.d.comb += [
            top.i.payload.as_value().eq(self.s_axis_tdata),
            top.i.valid.eq(self.s_axis_tvalid),
            self.s_axis_tready.eq(top.i.ready),
            self.m_axis_tdata.eq(top.o.payload.as_value()),
            self.m_axis_tvalid.eq(top.o.valid),
            top.o.ready.eq(self.m_axis_tready),
        ]
        n_in = Signal(range(self.in_beats))
        n_out = Signal(range(self.out_beats))
        with m.If(self.s_axis_tvalid & self.s_axis_tready):
            final = n_in == self.in_beats - 1
            m.d.sync += n_in.eq(n_in + 1)
            with m.If(final):
                m.d.sync += n_in.eq(0)
            with m.If(self.s_axis_tlast != final):
                m.d.sync += self.s_axis_error.eq(1)
        m.d.comb += self.m_axis_tlast.eq(n_out == self.out_beats - 1)
        with m.If(self.m_axis_tvalid & self.m_axis_tready):
            m.d.sync += n_out.eq(n_out + 1)
            with m.If(self.m_axis_tlast):
                m.d.sync += n_out.eq(0)
        return m


@dataclass(frozen=True)
class Board:
    """A supported board: its amaranth-boards platform and clock."""

    name: str
    device: str  # hwgen.synth device name
    clock_mhz: float
    default_target_mhz: float


BOARDS = {
    "ulx3s-85f": Board("ulx3s-85f", "ecp5-85f", 25.0, 50.0),
    "icebreaker": Board("icebreaker", "up5k", 12.0, 24.0),
}


def platform_for(board: str) -> object:
    """The amaranth-boards platform; programming tools are not required (we only build)."""
    if board == "ulx3s-85f":
        from amaranth_boards.ulx3s import ULX3S_85F_Platform as base
    elif board == "icebreaker":
        from amaranth_boards.icebreaker import ICEBreakerPlatform as base
    else:
        raise HwgenError(f"unknown board {board!r} (known: {', '.join(BOARDS)})")

    class Platform(base):
        @property
        def required_tools(self) -> list[str]:
            return [t for t in super().required_tools if t not in ("openFPGALoader", "iceprog")]

    return Platform()


class SerialCore(wiring.Component):
    """The network behind a UART: what the board runs, without the board's clock and pins.

    Members
    -------
    rx : In(1)
        Serial line from the host (idle high).
    tx : Out(1)
        Serial line to the host.
    last_class : Out(8)
        The class most recently sent.
    """

    rx: In(1, init=1)
    tx: Out(1, init=1)
    last_class: Out(8)

    def __init__(
        self,
        net: Network,
        foldings: Mapping[str, tuple[int, int]],
        divisor: int,
        rom_style: str = "inline",
        engines: Mapping[str, str] | None = None,
    ) -> None:
        self.network = AxiNetwork(net, foldings, rom_style, engines)
        first, last = self.network.top.infos[0], self.network.top.infos[-1]
        self.link = HostLink.for_engines(first, last)
        self.divisor = divisor
        super().__init__()

    def elaborate(self, platform: object) -> Module:
        m = Module()
        m.submodules.rx = rx = UARTRx(self.divisor)
        m.submodules.tx = tx = UARTTx(self.divisor)
        m.submodules.link = link = self.link
        m.submodules.net = net = self.network
        m.d.comb += [rx.rx.eq(self.rx), self.tx.eq(tx.tx), self.last_class.eq(link.last_class)]
        wiring.connect(m, rx.o, link.rx)
        wiring.connect(m, link.tx, tx.i)
        m.d.comb += [
            net.s_axis_tdata.eq(link.net_i.payload.data.as_value()),
            net.s_axis_tlast.eq(link.net_i.payload.last),
            net.s_axis_tvalid.eq(link.net_i.valid),
            link.net_i.ready.eq(net.s_axis_tready),
            link.net_o.payload.as_value().eq(net.m_axis_tdata),
            link.net_o.valid.eq(net.m_axis_tvalid),
            net.m_axis_tready.eq(link.net_o.ready),
        ]
        return m


class BoardTop(Elaboratable):
    """The network behind a UART on a board, clocked from a PLL at ``target_mhz``."""

    def __init__(
        self,
        net: Network,
        foldings: Mapping[str, tuple[int, int]],
        board: str,
        target_mhz: float | None = None,
        baud: int = 115200,
        engines: Mapping[str, str] | None = None,
    ) -> None:
        if board not in BOARDS:
            raise HwgenError(f"unknown board {board!r} (known: {', '.join(BOARDS)})")
        self.board = BOARDS[board]
        self.net, self.foldings, self.engines = net, foldings, engines
        target_mhz = target_mhz or self.board.default_target_mhz
        if self.board.device == "ecp5-85f":
            self.pll = ecp5_pll_config(self.board.clock_mhz, target_mhz)
        else:
            self.pll = ice40_pll_config(self.board.clock_mhz, target_mhz)
        self.clk_mhz = self.pll.fout_mhz
        self.divisor = round(self.clk_mhz * 1e6 / baud)
        if abs(self.clk_mhz * 1e6 / self.divisor / baud - 1) > 0.02:
            raise HwgenError(f"baud {baud} is not reachable within 2 % from {self.clk_mhz} MHz")

    def elaborate(self, platform: object) -> Module:
        m = Module()
        m.domains.sync = cd_sync = ClockDomain("sync")
        locked = Signal()
        if self.board.device == "ecp5-85f":
            clk = platform.request("clk25", dir="i")
            m.submodules.pll = ecp5_pll(self.pll, clk.i, "sync", locked)
        else:
            pad = platform.request("clk12", dir="-")
            m.submodules.pll = ice40_pll(self.pll, pad.io, "sync", locked)
        platform.add_clock_constraint(cd_sync.clk, self.clk_mhz * 1e6)
        if self.board.device == "ecp5-85f":
            # The synchronised reset reaches every engine's counters: on fabric routing it
            # was ResNet-20's critical path (20.8 ns from one register across the chip), so
            # it drives a global buffer (DCCA), as the clock does.
            local = Signal()
            m.submodules.reset = cdc.AsyncFFSynchronizer(~locked, local, o_domain="sync")
            m.submodules.reset_buffer = Instance(
                "DCCA", i_CLKI=local, i_CE=Const(1), o_CLKO=cd_sync.rst
            )
        else:
            m.submodules.reset = cdc.ResetSynchronizer(~locked, domain="sync")

        uart = platform.request("uart", 0)
        m.submodules.core = core = SerialCore(
            self.net, self.foldings, self.divisor, engines=self.engines
        )
        m.d.comb += [core.rx.eq(uart.rx.i), uart.tx.o.eq(core.tx)]
        # The last class sent, on the LEDs: a sign of life without a host.
        leds = [platform.request("led", k) for k in range(2 if self.board.device == "up5k" else 8)]
        m.d.comb += [led.o.eq(core.last_class[k]) for k, led in enumerate(leds)]
        return m
