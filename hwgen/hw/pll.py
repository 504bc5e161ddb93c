"""PLL settings and instances for the boards' clock: ECP5 EHXPLLL and iCE40 SB_PLL40_PAD.

The divider search mirrors what the vendor tools and ``ecppll``/``icepll`` do: every legal
divider combination is tried and the one closest to the requested frequency wins (the
lowest VCO frequency breaks ties, for the smallest jitter-free power draw).
"""

from dataclasses import dataclass

from amaranth import ClockSignal, Instance, Signal

from hwgen.errors import HwgenError


@dataclass(frozen=True)
class ECP5PLLConfig:
    clki_div: int
    clkfb_div: int
    clkop_div: int
    fin_mhz: float

    @property
    def fout_mhz(self) -> float:
        return self.fin_mhz / self.clki_div * self.clkfb_div

    @property
    def vco_mhz(self) -> float:
        return self.fout_mhz * self.clkop_div


def ecp5_pll_config(fin_mhz: float, fout_mhz: float) -> ECP5PLLConfig:
    """Dividers for fout = fin / CLKI_DIV * CLKFB_DIV (feedback from CLKOP)."""
    best = None
    for clki in range(1, 129):
        pfd = fin_mhz / clki
        if not 3.125 <= pfd <= 400:
            continue
        for fb in range(1, 81):
            out = pfd * fb
            for op in range(1, 129):
                vco = out * op
                if not 400 <= vco <= 800:
                    continue
                key = (abs(out - fout_mhz), vco)
                if best is None or key < best[0]:
                    best = (key, ECP5PLLConfig(clki, fb, op, fin_mhz))
    if best is None or not 3.125 <= best[1].fout_mhz <= 400:
        raise HwgenError(f"no ECP5 PLL setting reaches {fout_mhz} MHz from {fin_mhz} MHz")
    return best[1]


def ecp5_pll(cfg: ECP5PLLConfig, clkin: Signal, domain: str, locked: Signal) -> Instance:
    """An EHXPLLL driving ``domain``'s clock from ``clkin``."""
    clkop = ClockSignal(domain)
    return Instance(
        "EHXPLLL",
        a_FREQUENCY_PIN_CLKI=f"{cfg.fin_mhz:g}",
        a_FREQUENCY_PIN_CLKOP=f"{cfg.fout_mhz:g}",
        a_ICP_CURRENT="12",
        a_LPF_RESISTOR="8",
        a_MFG_ENABLE_FILTEROPAMP="1",
        a_MFG_GMCREF_SEL="2",
        p_PLLRST_ENA="DISABLED",
        p_INTFB_WAKE="DISABLED",
        p_STDBY_ENABLE="DISABLED",
        p_DPHASE_SOURCE="DISABLED",
        p_OUTDIVIDER_MUXA="DIVA",
        p_CLKOP_ENABLE="ENABLED",
        p_CLKI_DIV=cfg.clki_div,
        p_CLKOP_DIV=cfg.clkop_div,
        p_CLKOP_CPHASE=(cfg.clkop_div - 1) // 2,
        p_CLKOP_FPHASE=0,
        p_FEEDBK_PATH="CLKOP",
        p_CLKFB_DIV=cfg.clkfb_div,
        i_RST=0,
        i_STDBY=0,
        i_CLKI=clkin,
        o_CLKOP=clkop,
        i_CLKFB=clkop,
        i_PHASESEL0=0,
        i_PHASESEL1=0,
        i_PHASEDIR=1,
        i_PHASESTEP=1,
        i_PHASELOADREG=1,
        i_PLLWAKESYNC=0,
        i_ENCLKOP=0,
        o_LOCK=locked,
    )


@dataclass(frozen=True)
class ICE40PLLConfig:
    divr: int
    divf: int
    divq: int
    fin_mhz: float

    @property
    def fout_mhz(self) -> float:
        return self.fin_mhz * (self.divf + 1) / ((self.divr + 1) * (1 << self.divq))

    @property
    def filter_range(self) -> int:
        pfd = self.fin_mhz / (self.divr + 1)
        for limit, rng in ((17, 1), (26, 2), (44, 3), (66, 4), (101, 5)):
            if pfd < limit:
                return rng
        return 6


def ice40_pll_config(fin_mhz: float, fout_mhz: float) -> ICE40PLLConfig:
    """Dividers for fout = fin * (DIVF+1) / ((DIVR+1) * 2**DIVQ), simple feedback."""
    best = None
    for divr in range(16):
        pfd = fin_mhz / (divr + 1)
        if not 10 <= pfd <= 133:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            if not 533 <= vco <= 1066:
                continue
            for divq in range(1, 7):
                out = vco / (1 << divq)
                key = (abs(out - fout_mhz), vco)
                if best is None or key < best[0]:
                    best = (key, ICE40PLLConfig(divr, divf, divq, fin_mhz))
    if best is None or not 16 <= best[1].fout_mhz <= 275:
        raise HwgenError(f"no iCE40 PLL setting reaches {fout_mhz} MHz from {fin_mhz} MHz")
    return best[1]


def ice40_pll(cfg: ICE40PLLConfig, pad: Signal, domain: str, locked: Signal) -> Instance:
    """An SB_PLL40_PAD (the clock pin feeds the PLL directly) driving ``domain``'s clock."""
    return Instance(
        "SB_PLL40_PAD",
        p_FEEDBACK_PATH="SIMPLE",
        p_DIVR=cfg.divr,
        p_DIVF=cfg.divf,
        p_DIVQ=cfg.divq,
        p_FILTER_RANGE=cfg.filter_range,
        i_PACKAGEPIN=pad,
        i_RESETB=1,
        i_BYPASS=0,
        o_PLLOUTGLOBAL=ClockSignal(domain),
        o_LOCK=locked,
    )
