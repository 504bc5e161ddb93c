"""The generic cocotb bench of one stream component (a layer engine or the network top).

hwgen.simulate runs it; its parameters come from the JSON file named by the environment
variable ``HWGEN_BENCH``: the manifest entry (``in_lanes``, ``in_bits``, ``out_lanes``,
``out_bits``, ``out_signed``, ``out_shape``, ...), the vector file, how many images, the
stall probability, the seed and where to write the result. Every image is fed back to
back; every output beat is compared exactly with the golden stream. An add engine (``kind``
``"add"``) has two input streams, ``a`` and ``b``, each with its own driver and random stalls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, SimTimeoutError, with_timeout
from hwgen_stream import Inserter, StreamDriver, StreamMonitor

from hwgen.simulate import check_outputs, timeout_cycles

CLOCK_NS = 10


@cocotb.test()
async def stream_vectors(dut: object) -> None:
    """Feed every vector image; compare every output beat with the golden model's."""
    cfg = json.loads(Path(os.environ["HWGEN_BENCH"]).read_text())
    entry = cfg["entry"]
    # (port, vector key, bits) per input stream.
    ports = [("i", "input_stream", entry["in_bits"])]
    if entry.get("kind") == "add":
        ports = [
            ("a", "input_stream", entry["in_bits"]),
            ("b", "input_b_stream", entry["in_b_bits"]),
        ]
    with np.load(cfg["vectors"], allow_pickle=False) as vec:
        xs = [vec[key][: cfg["images"]] for _, key, _ in ports]
        expected = vec["output_stream"][: cfg["images"]]
    stalls, seed = cfg["stalls"], cfg["seed"]

    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    drivers = [
        StreamDriver(dut, port, dut.clk, bits, Inserter(stalls, seed + 2 * k))
        for k, (port, _, bits) in enumerate(ports)
    ]
    mon = StreamMonitor(
        dut,
        "o",
        dut.clk,
        entry["out_lanes"],
        entry["out_bits"],
        entry["out_signed"],
        Inserter(stalls, seed + 1),
    )
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0

    for drv, x in zip(drivers, xs, strict=True):
        cocotb.start_soon(drv.send(x.reshape(-1, x.shape[-1]).tolist()))
    timed_out = False
    limit = timeout_cycles(entry, len(expected), stalls)
    try:
        await with_timeout(
            mon.collect(expected.shape[0] * expected.shape[1]), limit * CLOCK_NS, "ns"
        )
    except SimTimeoutError:
        timed_out = True

    got = np.array(mon.beats, dtype=np.int64).reshape(-1, expected.shape[-1])
    result = check_outputs(entry, expected, got)
    t_in, t_out = drivers[0].accept_times, mon.accept_times
    result |= {
        "timed_out": timed_out,
        "timeout_cycles": limit,
        "violations": mon.violations[:10],
        "cycles": round((t_out[-1] - t_in[0]) / CLOCK_NS) + 1 if t_in and t_out else 0,
        "first_output_cycles": round((t_out[0] - t_in[0]) / CLOCK_NS) + 1 if t_in and t_out else 0,
    }
    # What the RTL produced, for callers that look past equality (predicted classes).
    np.save(Path(cfg["result"]).with_name("rtl_output.npy"), got)
    Path(cfg["result"]).write_text(json.dumps(result, indent=1))
    assert not timed_out, (
        f"timeout: {len(mon.beats)} of {expected.size // expected.shape[-1]} "
        f"output beats after {limit} cycles"
    )
    assert not mon.violations, mon.violations[0]
    assert result["mismatches"] == 0, result["first_mismatch"]
