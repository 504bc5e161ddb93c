"""cocotb valid/ready stream driver and monitor with idle and backpressure inserters.

Ports follow Amaranth's Verilog naming of a ``stream.Signature`` member ``x``:
``x__payload``, ``x__valid``, ``x__ready``. A payload is ``lanes`` lanes of ``bits`` bits,
lane k at bits [k*bits, (k+1)*bits); signed lanes are sign-extended here.

Speed: Python only wakes when something can happen. The driver waits on a rising edge
of ``ready`` instead of polling every clock while the DUT is busy, the monitor on a rising
edge of ``valid``; both decide in the ReadOnly phase, where every signal has settled.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Sequence

from cocotb.handle import SimHandleBase
from cocotb.triggers import ReadOnly, RisingEdge
from cocotb.utils import get_sim_time


class Inserter:
    """Per-cycle go/stall decisions: a repeating ``pattern`` (1 = go) or random stalls.

    ``Inserter(p=0.25, seed=1)`` stalls each cycle with probability 0.25 (seeded, so a run
    repeats exactly); ``Inserter(pattern=[1, 1, 1, 0])`` stalls every fourth cycle.
    """

    def __init__(self, p: float = 0.0, seed: int = 0, pattern: Sequence[int] | None = None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"stall probability must be in [0, 1), not {p}")
        self._cycle = itertools.cycle(pattern) if pattern else None
        self._rng = random.Random(seed)
        self.p = p

    def go(self) -> bool:
        """True if this cycle moves data (valid for a driver, ready for a monitor)."""
        if self._cycle is not None:
            return bool(next(self._cycle))
        return self.p == 0.0 or self._rng.random() >= self.p


def pack(lanes: Iterable[int], bits: int) -> int:
    """Lane values (lane 0 first) as one payload integer, lane 0 at the LSB."""
    mask = (1 << bits) - 1
    return sum((int(v) & mask) << (k * bits) for k, v in enumerate(lanes))


def unpack(word: int, lanes: int, bits: int, signed: bool) -> list[int]:
    """A payload integer as lane values, sign-extended when ``signed``."""
    mask, half = (1 << bits) - 1, 1 << (bits - 1)
    out = []
    for k in range(lanes):
        v = (word >> (k * bits)) & mask
        out.append(v - (1 << bits) if signed and v & half else v)
    return out


def _now_ns() -> float:
    return get_sim_time(unit="ns")


class StreamDriver:
    """Drives ``<prefix>__payload/valid`` and obeys ``<prefix>__ready``."""

    def __init__(
        self,
        dut: SimHandleBase,
        prefix: str,
        clk: SimHandleBase,
        bits: int,
        idle: Inserter | None = None,
    ) -> None:
        self.payload = getattr(dut, f"{prefix}__payload")
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.clk, self.bits = clk, bits
        self.idle = idle or Inserter()
        self.accept_times: list[float] = []  # sim time (ns) of each accepted beat
        self.valid.value = 0

    async def send(self, beats: Iterable[Sequence[int]]) -> None:
        """Send every beat (a sequence of lane values), in order; returns after the last."""
        for beat in beats:
            while not self.idle.go():
                self.valid.value = 0
                await RisingEdge(self.clk)
            self.payload.value = pack(beat, self.bits)
            self.valid.value = 1
            while True:
                await ReadOnly()
                if self.ready.value:
                    await RisingEdge(self.clk)  # the transfer happens on this edge
                    self.accept_times.append(_now_ns())
                    break
                await RisingEdge(self.ready)  # busy DUT: sleep until it can take data
        self.valid.value = 0


class StreamMonitor:
    """Collects beats from ``<prefix>__payload/valid``, driving ``<prefix>__ready``.

    Also checks the stream rule that a stalled beat holds still: while valid is high and
    ready low, valid must stay high and the payload must not change.
    """

    def __init__(
        self,
        dut: SimHandleBase,
        prefix: str,
        clk: SimHandleBase,
        lanes: int,
        bits: int,
        signed: bool,
        backpressure: Inserter | None = None,
    ) -> None:
        self.payload = getattr(dut, f"{prefix}__payload")
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.clk, self.lanes, self.bits, self.signed = clk, lanes, bits, signed
        self.backpressure = backpressure or Inserter()
        self.beats: list[list[int]] = []
        self.accept_times: list[float] = []
        self.violations: list[str] = []
        self.ready.value = 0

    async def collect(
        self, count: int, on_beat: Callable[[list[int]], None] | None = None
    ) -> list[list[int]]:
        """Receive ``count`` beats (lane value lists) and return them."""
        ready = self.backpressure.go()
        self.ready.value = int(ready)
        stalled: int | None = None  # payload of a beat we refused last cycle
        while len(self.beats) < count:
            await ReadOnly()
            valid = bool(self.valid.value)
            if stalled is not None:
                if not valid:
                    self.violations.append(f"valid dropped at {_now_ns()} ns before the transfer")
                elif int(self.payload.value) != stalled:
                    self.violations.append(f"payload changed at {_now_ns()} ns while stalled")
                stalled = None
            if not valid:
                await RisingEdge(self.valid)  # idle DUT: sleep until it has data
                continue
            word = int(self.payload.value)
            if ready:
                beat = unpack(word, self.lanes, self.bits, self.signed)
                self.beats.append(beat)
                if on_beat is not None:
                    on_beat(beat)
            else:
                stalled = word
            await RisingEdge(self.clk)
            if ready:
                self.accept_times.append(_now_ns())
            ready = self.backpressure.go()
            self.ready.value = int(ready)
        self.ready.value = 0
        return self.beats
