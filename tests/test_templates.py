"""Vendor project templates: every placeholder filled, sources listed, nothing else changed."""

import pytest

from hwgen.errors import HwgenError
from hwgen.templates import fill, template, vendor_projects


def test_vendor_projects_are_filled():
    files = vendor_projects("digits_top", ["rtl/conv1.v", "rtl/digits_top.v"], 125.0)
    assert set(files) == {
        "vivado/build.tcl",
        "vivado/arty_a7.xdc",
        "quartus/digits_top.qsf",
        "quartus/digits_top.sdc",
    }
    for text in files.values():
        assert "@" not in text
    assert (
        "read_verilog ../rtl/conv1.v\nread_verilog ../rtl/digits_top.v" in files["vivado/build.tcl"]
    )
    assert "set top digits_top" in files["vivado/build.tcl"]
    assert "-period 8.000" in files["vivado/arty_a7.xdc"]
    assert "VERILOG_FILE ../rtl/digits_top.v" in files["quartus/digits_top.qsf"]
    # Apart from the placeholders, the template text is kept as written.
    assert files["vivado/build.tcl"].startswith(template("vivado/build.tcl").split("@")[0])


def test_unknown_placeholder_is_an_error():
    with pytest.raises(HwgenError, match="@MISSING@"):
        fill("x @MISSING@ y", {})


def test_rom_template_exists():
    assert "$readmemh" in template("hwgen_rom.v")
