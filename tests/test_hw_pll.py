"""PLL divider search: legal dividers, closest frequency."""

import pytest

from hwgen.errors import HwgenError
from hwgen.hw.pll import ecp5_pll_config, ice40_pll_config


@pytest.mark.parametrize("fout", [25, 50, 75, 100, 125, 150])
def test_ecp5_dividers_legal_and_close(fout):
    cfg = ecp5_pll_config(25, fout)
    assert 400 <= cfg.vco_mhz <= 800
    assert 3.125 <= 25 / cfg.clki_div <= 400
    assert 1 <= cfg.clkfb_div <= 80 and 1 <= cfg.clkop_div <= 128
    assert cfg.fout_mhz == pytest.approx(fout)  # these are all exactly reachable from 25 MHz


def test_ecp5_known_setting():
    # 25 -> 100 MHz: the well-known CLKI_DIV=1, CLKFB_DIV=4, CLKOP_DIV=6 (VCO 600) or an
    # equivalent with a lower VCO.
    cfg = ecp5_pll_config(25, 100)
    assert (cfg.clki_div, cfg.clkfb_div) == (1, 4)
    assert cfg.vco_mhz == 400 and cfg.clkop_div == 4


@pytest.mark.parametrize("fout", [24, 30, 36, 48])
def test_ice40_dividers_legal_and_close(fout):
    cfg = ice40_pll_config(12, fout)
    pfd = 12 / (cfg.divr + 1)
    assert 10 <= pfd <= 133 and 533 <= pfd * (cfg.divf + 1) <= 1066
    assert abs(cfg.fout_mhz - fout) < 0.5


def test_unreachable_frequency():
    with pytest.raises(HwgenError, match="500 MHz"):
        ecp5_pll_config(25, 500)
