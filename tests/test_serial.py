"""The board's serial core in Verilator (cocotb), at the serial-line level: reply == golden."""

import json
from pathlib import Path

import numpy as np
from amaranth.back import verilog

from hwgen import golden, toolchain
from hwgen.host import Wire, decode_reply, encode_image
from hwgen.hw.board import SerialCore
from hwgen.simulate import SIM_DIR, VERILATOR_ARGS, VERILATOR_MAKEFLAGS
from tests.conftest import example_network
from tests.test_hw_network import _foldings, _inputs

DIVISOR = 8  # clock cycles per bit: a fast line keeps the simulation short


def test_serial_core_answers_like_the_golden_model(tmp_path, monkeypatch):
    from cocotb_tools.runner import get_runner

    net = example_network(seed=9)
    core = SerialCore(net, _foldings(net, 2, 2), DIVISOR)
    src = tmp_path / "serial_core.v"
    src.write_text(verilog.convert(core, name="serial_core", emit_src=False))
    x = _inputs(net, 2, seed=4)
    wire = Wire(net.input_format.bits, net.input_format.signed, 10, net.output_format.signed)
    cfg = {
        "divisor": DIVISOR,
        "reply_bytes": 2 + 2 * wire.n_out,
        "requests": [list(encode_image(img, wire)) for img in x],
        "result": str(tmp_path / "replies.json"),
    }
    (tmp_path / "bench.json").write_text(json.dumps(cfg))

    toolchain.activate(toolchain.find_simulator("verilator"))
    monkeypatch.setenv("MAKEFLAGS", VERILATOR_MAKEFLAGS)
    monkeypatch.syspath_prepend(str(SIM_DIR))
    runner = get_runner("verilator")
    runner.build(
        sources=[src],
        hdl_toplevel="serial_core",
        build_dir=tmp_path / "build",
        build_args=list(VERILATOR_ARGS),
        timescale=("1ns", "1ps"),
        log_file=tmp_path / "build.log",
    )
    runner.test(
        test_module="test_serial",
        hdl_toplevel="serial_core",
        build_dir=tmp_path / "build",
        test_dir=tmp_path,
        extra_env={"HWGEN_BENCH": str(tmp_path / "bench.json")},
        results_xml=str(tmp_path / "results.xml"),
        log_file=tmp_path / "sim.log",
    )

    replies = json.loads(Path(cfg["result"]).read_text())
    logits = golden.forward(net, x)[-1]
    assert len(replies) == len(x)
    for reply, expected in zip(replies, logits, strict=True):
        cls, got = decode_reply(bytes(reply), wire)
        assert np.array_equal(got, expected)
        assert cls == int(np.argmax(expected))
