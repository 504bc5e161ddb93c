"""8N1 UART receiver and transmitter with byte streams, for the board top's host link.

Line format: idle high, one start bit (low), eight data bits LSB first, one stop bit
(high). ``divisor`` is the clock frequency divided by the baud rate, rounded (the board
top checks that the rounding error stays under 2 %).
"""

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hwgen.errors import HwgenError


def _check_divisor(divisor: int) -> None:
    if not isinstance(divisor, int) or divisor < 4:
        raise HwgenError(f"UART divisor (clock / baud) must be an integer >= 4, not {divisor!r}")


class UARTRx(wiring.Component):
    """Receiver: samples the line in the middle of each bit.

    Members
    -------
    rx : In(1)
        The serial line (already synchronised to the clock domain by the caller or not:
        two flip-flops are added here).
    o : Out(stream.Signature(8))
        Received bytes. The receiver cannot be stalled (a UART has no flow control);
        ``overrun`` is set, and sticks, if a byte arrives while the previous one is unread.
    overrun : Out(1)
    frame_error : Out(1)
        Sticky: a stop bit read as 0 (the byte is dropped).
    """

    rx: In(1, init=1)
    o: Out(stream.Signature(8))
    overrun: Out(1)
    frame_error: Out(1)

    def __init__(self, divisor: int) -> None:
        _check_divisor(divisor)
        self.divisor = divisor
        super().__init__()

    def elaborate(self, platform: object) -> Module:
        m = Module()
        d = self.divisor
        sync = Signal(2, init=0b11)
        m.d.sync += sync.eq((sync << 1) | self.rx)
        line = sync[1]

        timer = Signal(range(d + d // 2 + 1))
        bit = Signal(range(10))
        shreg = Signal(8)

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    # Wait 1.5 bits from the start edge: the middle of data bit 0.
                    m.d.sync += [timer.eq(d + d // 2 - 1), bit.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(timer == 0):
                    m.d.sync += [
                        shreg.eq((line << 7) | (shreg >> 1)),
                        timer.eq(d - 1),
                        bit.eq(bit + 1),
                    ]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("STOP"):
                with m.If(timer == 0):
                    with m.If(line):
                        m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                        with m.If(self.o.valid & ~self.o.ready):
                            m.d.sync += self.overrun.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += self.frame_error.eq(1)
                        m.next = "BREAK"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("BREAK"):
                with m.If(line):  # wait for the line to return to idle
                    m.next = "IDLE"
        return m


class UARTTx(wiring.Component):
    """Transmitter.

    Members
    -------
    i : In(stream.Signature(8))
        Bytes to send; one is taken when the previous one's stop bit has been sent.
    tx : Out(1)
        The serial line, idle high.
    """

    i: In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, divisor: int) -> None:
        _check_divisor(divisor)
        self.divisor = divisor
        super().__init__()

    def elaborate(self, platform: object) -> Module:
        m = Module()
        d = self.divisor
        timer = Signal(range(d))
        bits = Signal(range(11))
        shreg = Signal(10, init=0x3FF)  # stop bit, 8 data bits, start bit; LSB goes first
        m.d.comb += [self.tx.eq(shreg[0]), self.i.ready.eq(bits == 0)]
        with m.If(bits == 0):
            with m.If(self.i.valid):
                m.d.sync += [
                    shreg.eq((1 << 9) | (self.i.payload << 1)),
                    bits.eq(10),
                    timer.eq(d - 1),
                ]
        with m.Elif(timer == 0):
            m.d.sync += [shreg.eq((1 << 9) | (shreg >> 1)), bits.eq(bits - 1), timer.eq(d - 1)]
        with m.Else():
            m.d.sync += timer.eq(timer - 1)
        return m
