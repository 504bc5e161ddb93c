"""The host side of the board's serial protocol (hwgen.hw.hostlink): send images, read classes.

Serial settings: 8 data bits, no parity, 1 stop bit, no flow control, at the baud rate the
board was built for (``manifest.json``: ``board.baud``; 115200 by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hwgen.errors import HwgenError
from hwgen.golden import flatten_hwc
from hwgen.hw.hostlink import SYNC_IN, SYNC_OUT


class Port(Protocol):
    def write(self, data: bytes) -> int | None: ...
    def read(self, size: int) -> bytes: ...


@dataclass(frozen=True)
class Wire:
    """How values travel: input and output value widths and signedness."""

    in_bits: int
    in_signed: bool
    n_out: int
    out_signed: bool


def encode_image(image: np.ndarray, wire: Wire) -> bytes:
    """One (C, H, W) integer image as the host's request: sync byte, then H,W,C values."""
    values = flatten_hwc(np.asarray(image, dtype=np.int64)[None])[0]
    nbytes = 1 if wire.in_bits <= 8 else 2
    raw = (values & ((1 << (8 * nbytes)) - 1)).astype(f"<u{nbytes}")
    return bytes([SYNC_IN]) + raw.tobytes()


def decode_reply(reply: bytes, wire: Wire) -> tuple[int, np.ndarray]:
    """(class, logits) from the board's reply bytes."""
    if len(reply) != 2 + 2 * wire.n_out or reply[0] != SYNC_OUT:
        raise HwgenError(f"board reply is malformed ({len(reply)} bytes: {reply[:4].hex()}...)")
    logits = np.frombuffer(reply[2:], dtype="<i2" if wire.out_signed else "<u2").astype(np.int64)
    return reply[1], logits


def run_images(port: Port, images: np.ndarray, wire: Wire) -> Iterator[tuple[int, np.ndarray]]:
    """Send each image and wait for its answer (the protocol has no flow control)."""
    size = 2 + 2 * wire.n_out
    for image in images:
        port.write(encode_image(image, wire))
        reply = port.read(size)
        if len(reply) < size:
            raise HwgenError(f"no answer from the board (got {len(reply)} of {size} bytes)")
        yield decode_reply(reply, wire)


def open_port(name: str, baud: int, timeout_s: float = 5.0) -> Port:
    """Open a serial port with pyserial (8N1, no flow control)."""
    import serial

    try:
        return serial.Serial(name, baudrate=baud, timeout=timeout_s)
    except (serial.SerialException, ValueError) as e:
        raise HwgenError(f"serial port {name}: {e}") from None
