"""The command line: ``hwgen golden`` end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import example_network

from hwgen import golden as gm
from hwgen import hwq
from hwgen.cli import main


@pytest.fixture
def model(tmp_path) -> Path:
    return hwq.save(example_network(), tmp_path / "model.hwq")


@pytest.fixture
def x_int(tmp_path) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(5).integers(-128, 128, size=(3, 1, 8, 8)).astype(np.int8)
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy", x


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("hwgen: error: ")
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_golden_writes_every_layer(tmp_path, capsys, model, x_int):
    x_path, x = x_int
    out = tmp_path / "sub" / "out.npz"
    assert main(["golden", str(model), str(x_path), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    got = _read(out)
    net = hwq.load(model)
    assert list(got) == sorted(["input", *net.names])
    assert np.array_equal(got["input"], x)
    for name, want in zip(net.names, gm.forward(net, x), strict=True):
        assert got[name].dtype == np.int64 and np.array_equal(got[name], want), name
    # Deterministic: the same run gives the same bytes.
    again = tmp_path / "again.npz"
    assert main(["golden", str(model), str(x_path), "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_golden_quantises_float_input(tmp_path, model):
    fmt = hwq.load(model).input_format  # s8.f4: step 1/16, range [-8, 7.9375]
    values = np.array([0.03125, -0.03125, 0.09375, 100.0, -100.0, 1.0 / 3.0], dtype=np.float32)
    x = np.broadcast_to(values[:, None, None, None], (6, 1, 8, 8))
    np.save(tmp_path / "xf.npy", x)
    assert (
        main(["golden", str(model), str(tmp_path / "xf.npy"), "-o", str(tmp_path / "o.npz")]) == 0
    )
    got = _read(tmp_path / "o.npz")
    q = got["input"].reshape(6, -1)[:, 0]
    assert q.tolist() == [1, 0, 2, 127, -128, 5]  # rhu: 0.5 -> 1, -0.5 -> 0, 1.5 -> 2; saturated
    assert np.array_equal(got["input"], gm.quantize_input(x, fmt))
    assert np.array_equal(got["fc2"], gm.forward(hwq.load(model), got["input"])[-1])


def _corrupt_json(path: Path) -> None:
    _rewrite(path, "model.json", lambda b: b[: len(b) // 2])


def _weight_out_of_range(path: Path) -> None:
    net = hwq.load(path)
    doc = hwq.to_json(net)
    arrays = {
        f"{lyr.name}.{k}": getattr(lyr, k)
        for lyr in net.layers
        if hasattr(lyr, "weight")
        for k in ("weight", "bias")
    }
    arrays["fc2.weight"] = arrays["fc2.weight"].copy()
    arrays["fc2.weight"][3, 4] = 1000
    path.unlink()
    path.mkdir()
    (path / "model.json").write_text(json.dumps(doc))
    np.savez(path / "weights.npz", **arrays)


def _drop_weights(path: Path) -> None:
    _rewrite(path, "weights.npz", None)


def _rewrite(path: Path, member: str, fn) -> None:
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    if fn is None:
        del files[member]
    else:
        files[member] = fn(files[member])
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_corrupt_json, "model.json is not valid JSON"),
        (_weight_out_of_range, "layer fc2: weight[3, 4] = 1000 is not in fixed8.f5"),
        (_drop_weights, "model.hwq: missing weights.npz"),
    ],
)
def test_golden_on_a_corrupted_model(tmp_path, capsys, model, x_int, corrupt, message):
    corrupt(model)
    out = tmp_path / "out.npz"
    _one_line_error(capsys, ["golden", str(model), str(x_int[0]), "-o", str(out)], message)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.hwq", "x.npy"]


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (
            np.full((2, 1, 8, 8), 128, dtype=np.int16),
            "input value 128 is outside the input format s8.f4",
        ),
        (np.zeros((2, 8, 8), dtype=np.int8), "input has shape (2, 8, 8), expected (N, 1, 8, 8)"),
        (np.full((1, 1, 8, 8), np.nan), "input contains NaN or Inf"),
        (np.zeros((1, 1, 8, 8), dtype=bool), "input must be an integer array, not dtype bool"),
        (np.array([None], dtype=object), "not a readable .npy array"),
    ],
)
def test_golden_on_bad_input(tmp_path, capsys, model, x, message):
    np.save(tmp_path / "bad.npy", x, allow_pickle=True)
    out = tmp_path / "out.npz"
    _one_line_error(
        capsys, ["golden", str(model), str(tmp_path / "bad.npy"), "-o", str(out)], message
    )
    assert not out.exists()


def test_golden_unwritable_output(tmp_path, capsys, model, x_int):
    (tmp_path / "dir").mkdir()
    _one_line_error(
        capsys,
        ["golden", str(model), str(x_int[0]), "-o", str(tmp_path / "dir")],
        "is a folder: give a file name",
    )
    assert list((tmp_path / "dir").iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: command"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["golden", "m.hwq", "x.npy"], "the following arguments are required: -o/--output"),
        (["golden", "m.hwq"], "the following arguments are required: input"),
        (["golden", "m.hwq", "x.npy", "-o", "o.npz", "--bogus"], "unrecognized arguments: --bogus"),
        (["golden", "nope.hwq", "x.npy", "-o", "o.npz"], "nope.hwq: no such file or directory"),
    ],
)
def test_argument_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, argv, message)
    assert list(tmp_path.iterdir()) == []


def test_real_entry_point(tmp_path, model, x_int):
    """The installed ``hwgen`` script: success, then a corrupted model is one line, exit 2."""
    hwgen = Path(sys.executable).with_name("hwgen")
    cmd = [str(hwgen)] if hwgen.exists() else [sys.executable, "-m", "hwgen.cli"]
    out = tmp_path / "out.npz"
    ok = subprocess.run(
        [*cmd, "golden", str(model), str(x_int[0]), "-o", str(out)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert np.array_equal(_read(out)["fc2"], gm.forward(hwq.load(model), x_int[1])[-1])
    out.unlink()
    _corrupt_json(model)
    bad = subprocess.run(
        [*cmd, "golden", str(model), str(x_int[0]), "-o", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stdout == "" and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("hwgen: error: ") and "model.json is not valid JSON" in bad.stderr
    assert not out.exists()


def test_a_refused_build_prints_no_library_warning(tmp_path):
    """A build refused after its engines exist (a layer named like another's FIFO): the one
    error line, and no Amaranth UnusedElaboratable warnings after it."""
    from dataclasses import replace

    from hwgen.ir import Network

    net = example_network(0)
    layers = list(net.layers)
    layers[1] = replace(layers[1], name="conv1_fifo")
    layers[2] = replace(layers[2], inputs=("conv1_fifo",))
    model = hwq.save(Network(net.input_shape, net.input_format, tuple(layers)), tmp_path / "m.hwq")
    out = tmp_path / "b"
    proc = subprocess.run(
        [sys.executable, "-m", "hwgen.cli", "build", str(model), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "name clashes" in proc.stderr, proc.stderr
    assert not out.exists()


def test_scheme_auto_on_a_float_model(tmp_path, capsys):
    out = tmp_path / "d.hwq"
    _one_line_error(
        capsys,
        ["quantize", "digits", "--scheme", "auto", "-o", str(out)],
        "weights are not on any grid, so this model is not quantized; "
        "use --scheme fixed|inq|pow2|ternary|binary",
    )
    assert not out.exists()


def test_scheme_auto_help_says_what_it_is_for(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "auto keeps the weights of a model already quantized elsewhere" in text


def test_build_warns_once_per_clamped_layer(tmp_path, capsys, model):
    """conv2 has 6 output channels: --pe 4 gives PE 3; fc1 has 6 inputs: --simd 4 gives 3."""
    out = tmp_path / "build"
    assert main(["build", str(model), "-o", str(out), "--pe", "4", "--simd", "4"]) == 0
    captured = capsys.readouterr()
    # Written to a log (not a terminal): no blank lines, nothing wrapped at 80 columns.
    lines = captured.out.splitlines()
    assert all(line.strip() for line in lines) and max(map(len, lines)) > 80
    assert any(line.endswith(f"folding in {out / 'folding.toml'}") for line in lines)
    err = captured.err.splitlines()
    assert err == [
        "hwgen: warning: layer conv2: --pe 4 gives PE 3, the largest divisor of its 6 output "
        "channels up to 4",
        "hwgen: warning: layer pool2: --pe 4 gives PE 3, the largest divisor of its 6 channels "
        "up to 4",
        "hwgen: warning: layer relu2: --pe 4 gives PE 3, the largest divisor of its 6 channels "
        "up to 4",
        "hwgen: warning: layer fc1: --simd 4 gives SIMD 3, the largest divisor of its 6 input "
        "channels up to 4",
        "hwgen: warning: layer fc2: --pe 4 gives PE 2, the largest divisor of its 10 output "
        "channels up to 4",
    ]
    foldings = json.loads((out / "manifest.json").read_text())["foldings"]
    assert foldings["conv2"] == [3, 4] and foldings["fc1"] == [4, 3] and foldings["fc2"] == [2, 4]
    # Limits the layers meet exactly, or are wider than (conv1 has 1 input), warn about nothing.
    assert main(["build", str(model), "-o", str(out), "--pe", "2", "--simd", "2"]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- output paths

_OUTPUT_ARGV = {
    "build": lambda model, out: ["build", str(model), "-o", str(out)],
    "quantize": lambda model, out: ["quantize", "digits", "--scheme", "fixed", "-o", str(out)],
    "tune": lambda model, out: ["tune", "digits", "--max-drop", "1", "-o", str(out)],
    "demo": lambda model, out: ["demo", "-o", str(out)],
}


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("command", "case"),
    [
        (command, case)
        for command in _OUTPUT_ARGV
        for case in ("existing file", "under a file", "read-only", "mount point")
        if (command, case) != ("demo", "mount point")  # written into, not replaced: fine
    ],
)
def test_output_path_errors(tmp_path, capsys, monkeypatch, model, command, case):
    """Every refusal comes before any work: one line, exit 2, nothing written."""
    from hwgen import fsutil

    (tmp_path / "afile").write_bytes(b"not hwgen's")
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(fsutil, "_mount_points", lambda: {os.path.realpath(tmp_path / "mnt")})
    p = tmp_path
    out, message = {
        "existing file": (
            p / "afile",
            f"output {p}/afile exists and is not a .hwq model: not overwriting it"
            if command == "quantize"
            else f"output {p}/afile is a file, not a folder",
        ),
        "under a file": (
            p / "afile" / "x",
            f"cannot create output {p}/afile/x: {p}/afile is a file",
        ),
        "read-only": (p / "new", f"cannot write output {p}/new: {p}: read-only file system"),
        "mount point": (
            p / "mnt",
            f"output {p}/mnt is a folder: give a file name"
            if command == "quantize"
            else f"output {p}/mnt is a mount point and hwgen replaces its output as a whole",
        ),
    }[case]
    if case == "read-only":

        def refuse(folder: Path) -> None:
            raise OSError(errno.EROFS, "Read-only file system", str(folder))

        monkeypatch.setattr(fsutil, "_probe_writable", refuse)
    before = _tree(tmp_path)
    _one_line_error(capsys, _OUTPUT_ARGV[command](model, out), message)
    assert _tree(tmp_path) == before


def test_synth_output_errors(tmp_path, capsys, monkeypatch):
    from hwgen import fsutil

    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({"format": "hwgen-build"}))
    (build / "reports").write_bytes(b"")
    _one_line_error(
        capsys, ["synth", str(build)], f"output {build}/reports is a file, not a folder"
    )
    (build / "reports").unlink()

    def refuse(folder: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(fsutil, "_probe_writable", refuse)
    message = f"cannot write output {build}/reports: {build}: read-only file system"
    _one_line_error(capsys, ["synth", str(build)], message)
    assert _tree(tmp_path) == ["build", "build/manifest.json"]


_NAMESPACE_SCRIPT = """
mount --bind ro ro && mount -o remount,bind,ro ro && mount --bind mnt mnt || exit 77
"$PYTHON" -c '
import sys
from hwgen.cli import main
for argv in sys.argv[1:]:
    print(main(argv.split()))
' "build model.hwq -o ro/b" "quantize digits --scheme fixed -o ro/q.hwq" \\
  "tune digits --max-drop 1 -o ro/t" "demo -o ro/d" "synth ro/build" \\
  "build model.hwq -o mnt" "tune digits --max-drop 1 -o mnt"
"""


def test_output_paths_on_a_real_read_only_mount(tmp_path, model):
    """The same refusals from the file system itself: a read-only bind mount and a mount
    point, in a private mount namespace (needs root and unshare; skipped otherwise)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private read-only bind mount")
    (tmp_path / "ro" / "build").mkdir(parents=True)
    (tmp_path / "ro" / "build" / "manifest.json").write_text(json.dumps({"format": "hwgen-build"}))
    (tmp_path / "mnt").mkdir()
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", _NAMESPACE_SCRIPT],
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    if proc.returncode == 77:
        pytest.skip(f"no private bind mounts here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    errors = proc.stderr.splitlines()
    assert proc.stdout.split() == ["2"] * 7, errors
    ro = "ro: read-only file system"
    assert errors == [
        f"hwgen: error: cannot write output ro/b: {ro}",
        f"hwgen: error: cannot write output ro/q.hwq: {ro}",
        f"hwgen: error: cannot write output ro/t: {ro}",
        f"hwgen: error: cannot write output ro/d: {ro}",
        "hwgen: error: cannot write output ro/build/reports: ro/build: read-only file system",
        "hwgen: error: output mnt is a mount point and hwgen replaces its output as a whole: "
        "give a path inside it",
        "hwgen: error: output mnt is a mount point and hwgen replaces its output as a whole: "
        "give a path inside it",
    ]
    assert _tree(tmp_path / "ro") == ["build", "build/manifest.json"]
    assert _tree(tmp_path / "mnt") == []


def test_build_folders_follow_the_umask_and_keep_their_mode(tmp_path, model):
    old = os.umask(0o027)
    try:
        out = tmp_path / "build"
        assert main(["build", str(model), "-o", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o750
        assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o640
        assert stat.S_IMODE((out / "rtl").stat().st_mode) == 0o750
        out.chmod(0o701)
        assert main(["build", str(model), "-o", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o701
    finally:
        os.umask(old)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"hwgen {version('hwgen')}\n"


# ---------------------------------------------------------------- no silent waits


def test_phases_in_a_log_are_plain_lines():
    from rich.console import Console

    from hwgen.commands import Phases

    log = io.StringIO()
    phases = Phases(Console(file=log, width=40))
    with phases("Yosys: a layer with a name longer than forty columns (1/2)"):
        pass
    with phases("nextpnr: network (2/2)"):
        pass
    lines = log.getvalue().splitlines()
    assert lines[0] == "Yosys: a layer with a name longer than forty columns (1/2) ..."
    assert re.fullmatch(r"Yosys: a layer .* \(1/2\): \d+\.\d s", lines[1]), lines[1]
    assert lines[2] == "nextpnr: network (2/2) ..."
    assert re.fullmatch(r"nextpnr: network \(2/2\): \d+\.\d s", lines[3]) and len(lines) == 4


def test_phases_on_a_terminal_end_with_their_time():
    from rich.console import Console

    from hwgen.commands import Phases

    screen = io.StringIO()
    with Phases(Console(file=screen, force_terminal=True, width=80))("Yosys: conv1"):
        pass
    assert re.search(r"Yosys: conv1: \d+\.\d s\n$", screen.getvalue())


def test_a_board_far_too_small_is_refused_before_synthesis(tmp_path, capsys, model):
    """The estimate is over 1.5 times the UP5K's LUT4s: no Yosys, an answer at once."""
    from hwgen.emit import BuildOptions, choose_foldings
    from hwgen.hw.folding import plan

    net = hwq.load(model)
    estimate = plan(net, choose_foldings(net, BuildOptions(16, 16)), "up5k", 24.0)
    assert estimate.luts > 1.5 * 5280  # the premise
    out = tmp_path / "board"
    argv = ["build", str(model), "-o", str(out), "--board", "icebreaker", "--pe", "16"]
    t0 = time.perf_counter()
    _one_line_error(
        capsys,
        [*argv, "--simd", "16"],
        f"the network does not fit up5k: ~{estimate.luts} LUT4 estimated, 5280 available; "
        "use narrower folding (--pe/--simd), fewer bits or a bigger device",
    )
    assert time.perf_counter() - t0 < 30  # Yosys alone takes minutes on such a design
    assert not out.exists()


def _phase_lines(out: str) -> list[str]:
    """The phase lines of a log: each start ("... ...") followed by its end ("...: N s")."""
    lines = out.splitlines()
    starts = [k for k, line in enumerate(lines) if line.endswith(" ...")]
    for k in starts:
        assert re.fullmatch(re.escape(lines[k][:-4]) + r": \d+\.\d s", lines[k + 1]), lines[k + 1]
    return [lines[k][:-4] for k in starts]


@pytest.mark.slow
def test_synth_shows_its_phases(tmp_path, capsys, model):
    out = tmp_path / "b"
    assert main(["build", str(model), "-o", str(out), "--pe", "1", "--simd", "1"]) == 0
    names = [e["name"] for e in json.loads((out / "manifest.json").read_text())["layers"]]
    capsys.readouterr()
    assert main(["synth", str(out)]) == 0
    n = len(names) + 1
    assert _phase_lines(capsys.readouterr().out) == [
        *(f"Yosys: {name} ({k}/{n})" for k, name in enumerate(names, 1)),
        f"Yosys: network ({n}/{n})",
        f"nextpnr: network ({n}/{n}), place and route on ecp5-85f for 150 MHz",
    ]
    doc = json.loads((out / "reports" / "synth.json").read_text())
    assert doc["critical_path"]["delay_ns"] * doc["fmax_mhz"] == pytest.approx(1000, rel=0.01)
    assert "Critical path: " in (out / "reports" / "synth.md").read_text()


@pytest.mark.slow
def test_board_build_shows_its_phases(tmp_path, capsys, model):
    out = tmp_path / "board"
    argv = ["build", str(model), "-o", str(out), "--board", "icebreaker", "--pe", "1"]
    assert main([*argv, "--simd", "1"]) == 0
    assert _phase_lines(capsys.readouterr().out) == [
        "Yosys: icebreaker bitstream",
        "nextpnr: icebreaker bitstream",
        "pack: icebreaker bitstream",
    ]
    bitstream = json.loads((out / "manifest.json").read_text())["board"]["bitstream"]
    assert bitstream == "board/top.bin" and (out / bitstream).stat().st_size > 0


def test_a_title_wider_than_its_table_stays_on_one_line():
    from rich.console import Console

    from hwgen.commands import LOG_WIDTH, titled

    title = "hwgen synth " + "/a/long/build/folder" * 5 + " (ecp5-85f, target 150 MHz)"
    table = titled(title)
    table.add_column("LUT4")
    table.add_row("1")
    log = io.StringIO()
    Console(file=log, width=LOG_WIDTH).print(table)
    assert log.getvalue().splitlines()[0].strip() == title


def test_tune_keeps_its_folders_mode_and_follows_the_umask(tmp_path):
    out = tmp_path / "tune"
    out.mkdir()
    out.chmod(0o701)
    old = os.umask(0o027)
    try:
        argv = ["tune", "digits", "--scheme", "fixed", "--max-drop", "100", "-o", str(out)]
        assert main(argv) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o701
    assert stat.S_IMODE((out / "report.md").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "plots").stat().st_mode) == 0o750


@pytest.mark.parametrize(
    ("scheme", "bits", "message"),
    [
        ("bc", "2", "--bits/--act-bits: scheme bc has 1-bit weights, not 2"),
        ("lab", "2", "--bits/--act-bits: scheme lab has 1-bit weights, not 2"),
        ("twn", "1", "--bits/--act-bits: scheme twn has 2-bit weights, not 1"),
        ("lat", "3", "--bits/--act-bits: scheme lat has 2-bit weights, not 3"),
        ("ttq", "3", "--bits/--act-bits: scheme ttq has 2-bit weights, not 3"),
        ("dqc", "6", "--bits/--act-bits: weight bits 6 out of range [3, 5] for dqc"),
        ("amq", "5", "--bits/--act-bits: weight bits 5 out of range [2, 4] for amq"),
    ],
)
def test_quantize_learned_schemes_refuse_other_bits(tmp_path, capsys, scheme, bits, message):
    out = tmp_path / "q.hwq"
    _one_line_error(
        capsys, ["quantize", "digits", "--scheme", scheme, "--bits", bits, "-o", str(out)], message
    )
    assert not out.exists()


def test_cli_scheme_lists_match_the_quantizer():
    from hwgen.cli import QUANT_SCHEMES, TUNE_SCHEMES
    from hwgen.quant.precision import SCHEMES
    from hwgen.quant.tune import TUNE_SCHEMES as TUNED

    assert set(QUANT_SCHEMES) == set(SCHEMES) and set(TUNE_SCHEMES) == set(TUNED)


@pytest.mark.parametrize(("scheme", "bits"), [("lab", None), ("dqc", "3"), ("amq", "3")])
def test_quantize_learned_scheme_and_its_precision_round_trip(tmp_path, capsys, scheme, bits):
    """--scheme X [--bits N] --epochs 1 writes a .hwq whose meta precision, given back as
    --precision, reproduces the same network (the same retraining, same seed)."""
    out = tmp_path / "q.hwq"
    argv = ["quantize", "digits", "--scheme", scheme, "--epochs", "1", "-o", str(out)]
    assert main(argv + (["--bits", bits] if bits else [])) == 0
    printed = capsys.readouterr().out
    net, meta = hwq.load(out), hwq.load_meta(out)
    assert meta["scheme"] == scheme and 0.5 < meta["test_accuracy"] <= 1
    toml = tmp_path / "precision.toml"
    toml.write_text(meta["precision"])
    assert f'scheme = "{scheme}"' in meta["precision"]
    if bits:
        assert f"weight_bits = {bits}\n" in meta["precision"]
    if scheme == "lab":  # codes with a scale per output channel
        assert all(layer.scale is not None for layer in net.layers if hasattr(layer, "scale"))
        assert "x scale fixed8" in printed
    if scheme == "dqc":
        for name in ("conv1", "conv2", "fc"):
            fmt = net.layer(name).weight_format
            assert meta["formats"][name]["weight"] == str(fmt) and len(fmt.entries) == 8
    again = tmp_path / "again.hwq"
    assert (
        main(["quantize", "digits", "--precision", str(toml), "--epochs", "1", "-o", str(again)])
        == 0
    )
    assert hwq.load(again) == net


def test_dqc_without_zero_learns_every_entry(tmp_path):
    """--no-zero: DQC's codebooks have no pinned 0 (the trained entries avoid it here); the
    flag is refused for a scheme without a learned codebook."""
    out = tmp_path / "nz.hwq"
    argv = ["quantize", "digits", "--scheme", "dqc", "--bits", "3", "--epochs", "1"]
    assert main([*argv, "--no-zero", "-o", str(out)]) == 0
    net, meta = hwq.load(out), hwq.load_meta(out)
    assert meta["codebook_zero"] is False
    assert all(0 not in net.layer(n).weight_format.entries for n in ("conv1", "conv2", "fc"))
    assert main([*argv, "-o", str(tmp_path / "z.hwq")]) == 0
    assert all(0 in hwq.load(tmp_path / "z.hwq").layer(n).weight_format.entries for n in ("fc",))
    bad = ["quantize", "digits", "--scheme", "ttq", "--no-zero", "-o", str(tmp_path / "t.hwq")]
    assert main(bad) == 2


# ---------------------------------------------------------------- pruning and low rank (#12)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prune", "1.5"], "--prune 1.5: the pruned fraction must be in [0, 1)"),
        (["--prune", "0.5", "--block", "0"], "--block 0: must be a positive integer"),
        (["--lowrank", "0"], "--lowrank 0: must be a positive integer"),
        (["--lowrank-energy", "1.5"], "--lowrank-energy 1.5: must be in (0, 1]"),
        (["--lowrank", "2", "--lowrank-energy", "0.9"], "not allowed with argument --lowrank"),
        (["--lowrank-layers", "conv2"], "--lowrank-layers: give --lowrank or --lowrank-energy"),
        (["--lowrank", "2", "--lowrank-layers", "nope"], "lowrank: no conv/linear layer named"),
        (["--block", "4"], "block 4: no layer is pruned"),
        (["--prune", "0.5", "--scheme", "bc"], "scheme bc cannot keep pruned weights at zero"),
        (["--prune", "0.5", "--scheme", "binary"], "scheme binary cannot keep pruned weights"),
        (["--prune", "0.5", "--bits", "1"], "layer conv2: scheme pow2 at 1 bit has no zero"),
    ],
)
def test_quantize_bad_compression_is_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "q.hwq"
    argv = ["quantize", "digits", "--scheme", "pow2", *extra, "-o", str(out)]
    _one_line_error(capsys, argv, message)
    assert list(tmp_path.iterdir()) == []


def test_quantize_prune_of_a_model_without_data_is_one_line(tmp_path, capsys):
    argv = ["quantize", "resnet20", "--scheme", "pow2", "--prune", "0.5", "-o", str(tmp_path / "q")]
    _one_line_error(capsys, argv, "no bundled data; pass --data with labelled x_train/y_train")
    assert list(tmp_path.iterdir()) == []


def test_quantize_prune_needs_labels(tmp_path, capsys):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8)))
    out = tmp_path / "q.hwq"
    argv = ["quantize", "digits", "--scheme", "pow2", "--prune", "0.5", "--data", str(data)]
    _one_line_error(capsys, [*argv, "-o", str(out)], "retraining needs labels")
    assert not out.exists()


def test_quantize_pruned_digits_table_meta_and_precision_round_trip(tmp_path, capsys):
    """--prune 0.75 --block 4 (pow2, 1 epoch a step): the table gives each layer's zero
    blocks, the first layer stays dense, and the meta precision reproduces the network."""
    from hwgen.quant.prune import block_sparsity

    out = tmp_path / "q.hwq"
    argv = ["quantize", "digits", "--scheme", "pow2", "--prune", "0.75", "--block", "4"]
    assert main([*argv, "--epochs", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    net, meta = hwq.load(out), hwq.load_meta(out)
    assert meta["prune"]["block"] == 4 and meta["prune"]["sparsity"] == {"conv2": 0.75, "fc": 0.75}
    for name in ("conv1", "conv2", "fc"):
        achieved = block_sparsity(net.layer(name).weight, 4)
        assert meta["prune"]["achieved"][name] == achieved
        assert re.search(rf"│ {name} .*│ {100 * achieved:.1f}% +│", printed), printed
    assert meta["prune"]["achieved"]["conv2"] >= 0.75 and meta["prune"]["achieved"]["conv1"] < 0.5
    assert "block = 4\n" in meta["precision"] and "prune = 0.75\n" in meta["precision"]
    toml = tmp_path / "precision.toml"
    toml.write_text(meta["precision"])
    again = tmp_path / "again.hwq"
    assert (
        main(["quantize", "digits", "--precision", str(toml), "--epochs", "1", "-o", str(again)])
        == 0
    )
    assert again.read_bytes() == out.read_bytes()


def test_quantize_lowrank_digits_builds(tmp_path, capsys):
    out = tmp_path / "q.hwq"
    argv = ["quantize", "digits", "--scheme", "pow2", "--lowrank", "4", "--epochs", "1"]
    assert main([*argv, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = hwq.load_meta(out)
    # conv1 8x8x8 x 9 + conv2 4x4x16 x 72 + fc 2560 = 25600; split at rank 4 the conv2 pair
    # is 4x4x4 x (8 x 3) + 4x4x16 x (4 x 3)
    assert meta["lowrank"] == {
        "rank": 4, "layers": ["conv1", "conv2"], "macs": 11776, "macs_before": 25600,
    }  # fmt: skip
    assert "MACs per inference: 11776 (0.46x the 25600 unsplit)" in printed
    assert 'lowrank = 4\nlowrank_layers = [\n    "conv1",\n    "conv2",\n]' in meta["precision"]
    assert main(["build", str(out), "-o", str(tmp_path / "build")]) == 0
    manifest = json.loads((tmp_path / "build" / "manifest.json").read_text())
    assert "conv2_v" in json.dumps(manifest) and "conv2_h" in json.dumps(manifest)
