"""cocotb bench of the board's serial link: bytes bit-banged on ``rx``, the reply read off ``tx``.

Parameters come from the JSON file named by ``HWGEN_BENCH``: ``divisor`` (clock cycles per
bit), ``requests`` (one byte list per image) and where to write the replies. This checks the
UARTs, the host link and the network together at the serial-line level, as a host sees them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, with_timeout

CLOCK_NS = 10


async def send_byte(dut: object, byte: int, divisor: int) -> None:
    """8N1: start bit, eight data bits LSB first, stop bit."""
    for level in [0, *((byte >> k) & 1 for k in range(8)), 1]:
        dut.rx.value = level
        await ClockCycles(dut.clk, divisor)


async def receive_byte(dut: object, divisor: int) -> int:
    """Wait for a start bit, then sample each data bit in its middle."""
    await FallingEdge(dut.tx)
    await ClockCycles(dut.clk, divisor + divisor // 2)
    byte = 0
    for k in range(8):
        byte |= int(dut.tx.value) << k
        await ClockCycles(dut.clk, divisor)
    assert int(dut.tx.value) == 1, "stop bit missing"
    return byte


@cocotb.test()
async def serial_images(dut: object) -> None:
    cfg = json.loads(Path(os.environ["HWGEN_BENCH"]).read_text())
    divisor, size = cfg["divisor"], cfg["reply_bytes"]
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    dut.rx.value = 1
    dut.rst.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 4)
    replies = []
    for request in cfg["requests"]:
        for byte in request:
            await send_byte(dut, byte, divisor)
        reply = []
        for _ in range(size):
            reply.append(
                await with_timeout(
                    receive_byte(dut, divisor), 200 * divisor * size * CLOCK_NS, "ns"
                )
            )
        replies.append(reply)
    Path(cfg["result"]).write_text(json.dumps(replies))
