"""The board's host protocol: UART bytes to the network's input stream, results back as bytes.

Host → board: the sync byte ``0xA5``, then the image's ``C*H*W`` input integers in H, W, C
order (channels fastest), each one byte (input formats up to 8 bits) or two bytes little
endian (9 to 16 bits), two's complement when signed.

Board → host, once the network has produced its last output for the image: the sync byte
``0x5A``, the predicted class (one byte: the first index of the maximum logit), then every
logit as two bytes little endian, two's complement, in output order.

The host sends one image and waits for its answer before sending the next (a UART has no
flow control: the receive FIFO only covers short stalls of the network).
"""

from typing import TYPE_CHECKING

from amaranth import Array, Module, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError

if TYPE_CHECKING:
    from hwgen.hw.engine import EngineInfo

SYNC_IN = 0xA5
SYNC_OUT = 0x5A


def in_payload(bits: int, is_signed: bool, lanes: int) -> data.StructLayout:
    """Input beat layout: ``lanes`` values and ``last`` (end of image, AXI4-Stream tlast)."""
    shape = signed(bits) if is_signed else unsigned(bits)
    return data.StructLayout({"data": data.ArrayLayout(shape, lanes), "last": 1})


class HostLink(wiring.Component):
    """Bridges UART byte streams and the network's streams (protocol in the module docstring).

    Members
    -------
    rx : In(stream.Signature(8))
        Bytes from the UART receiver (never stalled: a FIFO here absorbs network stalls).
    tx : Out(stream.Signature(8))
        Bytes to the UART transmitter.
    net_i : Out(stream.Signature(in_payload(...)))
        Input beats for the network, ``last`` set on each image's final beat.
    net_o : In(stream.Signature(ArrayLayout(out shape, out_lanes)))
        The network's output beats (logits).
    last_class : Out(8)
        The class most recently sent to the host.
    """

    def __init__(
        self,
        *,
        n_in: int,
        in_bits: int,
        in_signed: bool,
        in_lanes: int,
        n_out: int,
        out_bits: int,
        out_signed: bool,
        out_lanes: int,
        fifo_depth: int = 32,
    ) -> None:
        if in_bits > 16 or out_bits > 16:
            raise HwgenError(f"host link carries at most 16-bit values, not {in_bits}/{out_bits}")
        if n_in % in_lanes or n_out % out_lanes:
            raise HwgenError(
                f"lanes must divide the value counts ({n_in}/{in_lanes}, {n_out}/{out_lanes})"
            )
        if not 1 <= n_out <= 256:
            raise HwgenError(f"the class index is one byte: at most 256 outputs, not {n_out}")
        self.n_in, self.in_bits, self.in_lanes = n_in, in_bits, in_lanes
        self.n_out, self.out_bits, self.out_lanes = n_out, out_bits, out_lanes
        self.in_bytes = 1 if in_bits <= 8 else 2
        self.fifo_depth = fifo_depth
        out_shape = signed(out_bits) if out_signed else unsigned(out_bits)
        self.out_shape = out_shape
        super().__init__(
            {
                "rx": In(stream.Signature(8)),
                "tx": Out(stream.Signature(8)),
                "net_i": Out(stream.Signature(in_payload(in_bits, in_signed, in_lanes))),
                "net_o": In(stream.Signature(data.ArrayLayout(out_shape, out_lanes))),
                "last_class": Out(8),
            }
        )

    @classmethod
    def for_engines(cls, first: "EngineInfo", last: "EngineInfo") -> "HostLink":
        """The link for a network whose first and last engines are ``first`` and ``last``."""
        return cls(
            n_in=first.in_beats * first.in_lanes,
            in_bits=first.in_bits,
            in_signed=first.in_signed,
            in_lanes=first.in_lanes,
            n_out=last.out_beats * last.out_lanes,
            out_bits=last.out_bits,
            out_signed=last.out_signed,
            out_lanes=last.out_lanes,
        )

    def elaborate(self, platform: object) -> Module:
        m = Module()
        m.submodules.fifo = rxf = fifo.SyncFIFOBuffered(width=8, depth=self.fifo_depth)
        m.d.comb += [
            rxf.w_data.eq(self.rx.payload),
            rxf.w_en.eq(self.rx.valid),
            self.rx.ready.eq(1),
        ]
        self._receive(m, rxf)
        self._send(m)
        return m

    def _receive(self, m: Module, rxf: fifo.SyncFIFOBuffered) -> None:
        beats = self.n_in // self.in_lanes
        lane = Signal(range(self.in_lanes))
        beat = Signal(range(beats))
        low = Signal(8)
        second = Signal()  # the next byte is a value's high byte
        lanes = Array(self.net_i.payload.data[k] for k in range(self.in_lanes))
        hold = Signal()  # a full beat waits for the network
        m.d.comb += self.net_i.valid.eq(hold)
        with m.If(self.net_i.valid & self.net_i.ready):
            m.d.sync += hold.eq(0)
        with m.FSM():
            with m.State("SYNC"):
                m.d.comb += rxf.r_en.eq(1)
                with m.If(rxf.r_rdy & (rxf.r_data == SYNC_IN)):
                    m.d.sync += [lane.eq(0), beat.eq(0), second.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += rxf.r_en.eq(~hold)
                with m.If(rxf.r_rdy & ~hold):
                    complete = Signal()
                    if self.in_bytes == 1:
                        m.d.comb += complete.eq(1)
                        m.d.sync += lanes[lane].eq(rxf.r_data)
                    else:
                        m.d.comb += complete.eq(second)
                        m.d.sync += [second.eq(~second), low.eq(rxf.r_data)]
                        m.d.sync += lanes[lane].eq((rxf.r_data << 8) | low)
                    with m.If(complete):
                        m.d.sync += lane.eq(lane + 1)
                        with m.If(lane == self.in_lanes - 1):
                            m.d.sync += [
                                lane.eq(0),
                                beat.eq(beat + 1),
                                hold.eq(1),
                                self.net_i.payload.last.eq(beat == beats - 1),
                            ]
                            with m.If(beat == beats - 1):
                                m.next = "SYNC"

    def _send(self, m: Module) -> None:
        n, lanes = self.n_out, self.out_lanes
        logits = Array(Signal(self.out_shape, name=f"logit{k}") for k in range(n))
        count = Signal(range(n + 1))
        best = Signal(self.out_shape)
        best_idx = Signal(range(n))
        cand = Signal(self.out_shape)  # logit idx - 1, registered before its compare
        idx = Signal(range(n + 1))
        byte = Signal()
        with m.FSM():
            with m.State("COLLECT"):
                m.d.comb += self.net_o.ready.eq(1)
                with m.If(self.net_o.valid):
                    for k in range(lanes):
                        value = self.net_o.payload[k]
                        pos = count + k
                        m.d.sync += logits[pos].eq(value)
                    m.d.sync += count.eq(count + lanes)
                    with m.If(count + lanes == n):
                        m.d.sync += idx.eq(0)
                        m.next = "ARGMAX"
            with m.State("ARGMAX"):
                # One logit per cycle, read into a register and compared the cycle after:
                # the logit mux and the compare in one cycle were the board top's slowest
                # path (95 MHz). '>' keeps the first index of the maximum.
                with m.If((idx != 0) & ((idx == 1) | (cand > best))):
                    m.d.sync += [best.eq(cand), best_idx.eq(idx - 1)]
                m.d.sync += [cand.eq(logits[idx]), idx.eq(idx + 1)]
                with m.If(idx == n):
                    m.next = "HEAD"
            with m.State("HEAD"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(SYNC_OUT)]
                with m.If(self.tx.ready):
                    m.next = "CLASS"
            with m.State("CLASS"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(best_idx)]
                with m.If(self.tx.ready):
                    m.d.sync += [idx.eq(0), byte.eq(0), self.last_class.eq(best_idx)]
                    m.next = "LOGITS"
            with m.State("LOGITS"):
                wide = Signal(16)
                m.d.comb += [
                    wide.eq(logits[idx]),
                    self.tx.valid.eq(1),
                    self.tx.payload.eq(wide.word_select(byte, 8)),
                ]
                with m.If(self.tx.ready):
                    m.d.sync += byte.eq(~byte)
                    with m.If(byte):
                        m.d.sync += idx.eq(idx + 1)
                        with m.If(idx == n - 1):
                            m.d.sync += count.eq(0)
                            m.next = "COLLECT"
