"""simulate_layer on a stand-in stream component (lane-wise ReLU with a throttle) and on a
residual network's build."""

import json

import numpy as np
import pytest
from amaranth import Module, Signal, signed
from amaranth.back import verilog
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hwgen import golden
from hwgen.emit import BuildOptions, build
from hwgen.errors import HwgenError
from hwgen.fsutil import npz_bytes
from hwgen.ir import ActFormat, Conv2d, Fixed, Network, Pow2
from hwgen.simulate import check_outputs, simulate_layer
from tests.conftest import residual_network, weight_array


class _Relu(wiring.Component):
    """Registered lane-wise ReLU that accepts one beat every ``every`` cycles."""

    def __init__(self, lanes: int, bits: int, every: int) -> None:
        self.lanes, self.every = lanes, every
        lay = data.ArrayLayout(signed(bits), lanes)
        super().__init__({"i": In(stream.Signature(lay)), "o": Out(stream.Signature(lay))})

    def elaborate(self, platform):
        m = Module()
        wait = Signal(range(self.every + 1))
        with m.If(wait != 0):
            m.d.sync += wait.eq(wait - 1)
        m.d.comb += self.i.ready.eq((wait == 0) & (~self.o.valid | self.o.ready))
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [self.o.valid.eq(1), wait.eq(self.every - 1)]
            for k in range(self.lanes):
                v = self.i.payload[k]
                m.d.sync += self.o.payload[k].eq(v)
                with m.If(v < 0):
                    m.d.sync += self.o.payload[k].eq(0)
        return m


def _build(tmp_path, c=8, h=4, w=4, lanes=4, bits=8, n=3, every=1):
    (tmp_path / "rtl").mkdir()
    (tmp_path / "vectors").mkdir()
    v = verilog.convert(_Relu(lanes, bits, every), name="relu1", emit_src=False)
    (tmp_path / "rtl/relu1.v").write_text(v)
    x = np.random.default_rng(0).integers(-(1 << bits - 1), 1 << bits - 1, (n, c, h, w))
    x[-1], x[-2] = (1 << bits - 1) - 1, -(1 << bits - 1)  # extremes
    y = np.maximum(x, 0)

    def st(a):
        return a.transpose(0, 2, 3, 1).reshape(n, -1, lanes)

    (tmp_path / "vectors/relu1.npz").write_bytes(
        npz_bytes({"input": x, "output": y, "input_stream": st(x), "output_stream": st(y)})
    )
    beats = c * h * w // lanes
    entry = {
        "name": "relu1",
        "module": "relu1",
        "sources": ["rtl/relu1.v"],
        "in_lanes": lanes,
        "in_bits": bits,
        "in_signed": True,
        "out_lanes": lanes,
        "out_bits": bits,
        "out_signed": True,
        "out_shape": [c, h, w],
        "in_beats": beats,
        "out_beats": beats,
        "ideal_cycles": beats * every,
        "vectors": "vectors/relu1.npz",
        "vector_images": n,
    }
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": "hwgen-build", "layers": [entry]})
    )
    return entry


def test_check_outputs_names_the_first_bad_value():
    entry = {"name": "c1", "out_shape": [8, 4, 4]}
    exp = np.zeros((2, 32, 4), dtype=np.int64)
    got = exp.reshape(-1, 4).copy()
    got[32 + 5, 2] = 7
    r = check_outputs(entry, exp, got)
    assert r["mismatches"] == 1 and r["outputs_checked"] == 256
    assert r["first_mismatch"] == "layer c1: image 1, row 0, col 2, channel 6: expected 0, got 7"
    r = check_outputs(entry, exp, got[:-1])
    assert r["mismatches"] == 5


def test_standin_bit_exact_with_stalls_then_corrupted(tmp_path):
    entry = _build(tmp_path)
    r = simulate_layer(tmp_path, "relu1")
    assert (r.outputs_checked, r.mismatches, r.first_mismatch) == (384, 0, None)
    assert r.cycles == r.ideal_cycles + 1  # one cycle of register latency
    # A second engine links Verilator's run-time library, compiled for the first one.
    relu2 = verilog.convert(_Relu(4, 8, 1), name="relu2", emit_src=False)
    (tmp_path / "rtl/relu2.v").write_text(relu2)
    second = entry | {"name": "relu2", "module": "relu2", "sources": ["rtl/relu2.v"]}
    manifest = {"format": "hwgen-build", "layers": [entry, second]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = simulate_layer(tmp_path, "relu2")
    assert (r.outputs_checked, r.mismatches, r.first_mismatch) == (384, 0, None)
    sim_build = tmp_path / "sim_build"
    (runtime,) = sim_build.glob("verilator-runtime-*")
    assert (runtime / "libverilated.a").is_file()
    assert (sim_build / "relu1" / "verilated.o").is_file()  # compiled there, then archived
    assert not list((sim_build / "relu2").glob("verilated*.o"))  # linked from the archive
    assert "libverilated.a,--no-whole-archive" in (sim_build / "relu2" / "build.log").read_text()
    r = simulate_layer(tmp_path, "relu1", stalls=0.3, seed=5)
    assert r.ok and r.cycles > r.ideal_cycles
    vec = dict(np.load(tmp_path / "vectors/relu1.npz"))
    vec["output_stream"][0, 5, 2] += 1
    (tmp_path / "vectors/relu1.npz").write_bytes(npz_bytes(vec))
    r = simulate_layer(tmp_path, "relu1", stalls=0.2, seed=1)
    assert r.mismatches == 1
    assert r.first_mismatch.startswith("layer relu1: image 0, row 0, col 2, channel 6: expected")
    assert r.waves is not None and r.waves.is_file()


def test_bad_build_folder_and_layer(tmp_path):
    with pytest.raises(HwgenError, match="not a hwgen build folder"):
        simulate_layer(tmp_path, "x")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "hwgen-build", "layers": []}))
    with pytest.raises(HwgenError, match="no layer named 'x'"):
        simulate_layer(tmp_path, "x")


def test_residual_network_build_and_sim(tmp_path):
    """A residual network through hwgen build and Verilator: an add engine alone (two
    input drivers with random stalls) and the whole DAG top."""
    net = residual_network(seed=5)
    manifest = build(net, tmp_path / "b", BuildOptions(max_pe=2, max_simd=2, vectors=3))
    entries = {e["name"]: e for e in manifest["layers"]}
    assert entries["b1_add"]["inputs"] == ["b1_conv2", "stem"]
    assert entries["b1_add"]["kind"] == "add" and entries["b2_short"]["kind"] == "subsample_pad"
    with np.load(tmp_path / "b/vectors/b1_add.npz") as vec:
        expected = golden.layer_forward(
            net.layer("b1_add"),
            [vec["input"], vec["input_b"]],
            [net.formats["b1_conv2"], net.formats["stem"]],
        )
        assert np.array_equal(vec["output"], expected)
        assert vec["input_b_stream"].shape == (7, 4 * 8 * 8 // 2, 2)
    for name in ("b1_add", "network"):
        r = simulate_layer(tmp_path / "b", name, stalls=0.3, seed=2)
        assert r.first_mismatch is None, r.first_mismatch
        assert r.ok and r.outputs_checked > 0
    assert r.images_equal == r.images == 5


def test_padding_wider_than_the_kernel_build_and_sim(tmp_path):
    """A 1x1 conv with padding 1 and a 3x3 stride-2 conv with padding 3 (windows wholly in the
    padding give the bias alone): built, and the network top RTL == golden under stalls."""
    rng = np.random.default_rng(7)
    w1 = weight_array(rng, Pow2(5, 0), (4, 2, 1, 1), "random")
    w2 = weight_array(rng, Fixed(6, 4), (4, 4, 3, 3), "random")
    layers = (
        Conv2d("c1", 2, 4, 1, Pow2(5, 0), ActFormat(8, 2), w1, rng.integers(-64, 65, 4), padding=1),
        Conv2d(
            "c2", 4, 4, 3, Fixed(6, 4), ActFormat(8, 0), w2, rng.integers(-512, 513, 4),
            stride=2, padding=3, relu=True,
        ),
    )  # fmt: skip
    net = Network((2, 5, 5), ActFormat(8, 4), layers, name="wide_pad")
    assert net.shapes["c1"] == (4, 7, 7) and net.shapes["c2"] == (4, 6, 6)
    build(net, tmp_path / "b", BuildOptions(max_pe=2, max_simd=2, vectors=3))
    r = simulate_layer(tmp_path / "b", "network", stalls=0.3, seed=3)
    assert r.first_mismatch is None, r.first_mismatch
    assert r.ok and r.images_equal == r.images == 5


def test_runtime_objects_read_from_verilators_make_file(tmp_path):
    from hwgen.simulate import _runtime_objects, _save_runtime

    (tmp_path / "Vtop_classes.mk").write_text(
        "VM_CLASSES_FAST += \\\n  Vtop \\\n\n"
        "VM_GLOBAL_FAST += \\\n  verilated \\\n  verilated_vpi \\\n\n"
        "VM_GLOBAL_SLOW += \\\n  verilated_extra \\\n\n"
    )
    assert _runtime_objects(tmp_path) == ["verilated.o", "verilated_vpi.o", "verilated_extra.o"]
    runtime = tmp_path / "verilator-runtime-x"
    _save_runtime(tmp_path, runtime)  # objects missing: nothing is kept, builds compile their own
    assert not runtime.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "Vtop_classes.mk"
    ]
