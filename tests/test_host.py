"""Host protocol end to end: encode_image -> HostLink + network RTL -> decode_reply == golden."""

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from hwgen import golden
from hwgen.errors import HwgenError
from hwgen.host import Wire, decode_reply, encode_image, run_images
from hwgen.hw.hostlink import HostLink
from hwgen.hw.network import NetworkTop
from tests.conftest import example_network
from tests.test_hw_network import _foldings, _inputs


def _board_sim(net, images: np.ndarray) -> list[bytes]:
    """The board's link and network without the UART: request bytes in, reply bytes out."""
    top = NetworkTop(net, _foldings(net, 2, 2))
    first, last = top.infos[0], top.infos[-1]
    link = HostLink.for_engines(first, last)
    m = Module()
    m.submodules.top, m.submodules.link = top, link
    m.d.comb += [
        top.i.payload.eq(link.net_i.payload.data),
        top.i.valid.eq(link.net_i.valid),
        link.net_i.ready.eq(top.i.ready),
    ]
    wiring.connect(m, top.o, link.net_o)
    wire = Wire(
        net.input_format.bits, net.input_format.signed, link.n_out, net.output_format.signed
    )
    size = 2 + 2 * link.n_out
    replies: list[bytes] = []

    async def bench(ctx):
        ctx.set(link.tx.ready, 1)
        for image in images:
            for byte in encode_image(image, wire):
                ctx.set(link.rx.payload, byte)
                ctx.set(link.rx.valid, 1)
                await ctx.tick()
                ctx.set(link.rx.valid, 0)
                await ctx.tick()  # a UART delivers far slower than one byte a cycle
            reply = []
            while len(reply) < size:
                await ctx.tick()
                if ctx.get(link.tx.valid):
                    reply.append(ctx.get(link.tx.payload))
            replies.append(bytes(reply))

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return replies, wire


def test_board_answers_like_the_golden_model():
    net = example_network(seed=5)
    x = _inputs(net, 3, seed=2)
    replies, wire = _board_sim(net, x)
    logits = golden.forward(net, x)[-1]
    for reply, expected in zip(replies, logits, strict=True):
        cls, got = decode_reply(reply, wire)
        assert np.array_equal(got, expected)
        assert cls == int(np.argmax(expected))


class _FakePort:
    """A board that answers from the golden model (for the client loop alone)."""

    def __init__(self, net, wire, mute=False):
        self.net, self.wire, self.mute, self.pending = net, wire, mute, b""

    def write(self, data):
        values = np.frombuffer(data[1:], dtype="<u1").astype(np.int64)
        c, h, w = self.net.input_shape
        fmt = self.net.input_format
        if fmt.signed:
            values = np.where(values >= 128, values - 256, values)
        image = values.reshape(1, h, w, c).transpose(0, 3, 1, 2)
        out = golden.forward(self.net, image)[-1][0]
        self.pending = bytes([0x5A, int(np.argmax(out))]) + out.astype("<i2").tobytes()

    def read(self, size):
        return b"" if self.mute else self.pending[:size]


def test_run_images_client_loop():
    net = example_network(seed=6)
    wire = Wire(net.input_format.bits, net.input_format.signed, 10, True)
    x = _inputs(net, 4, seed=3)
    got = [cls for cls, _ in run_images(_FakePort(net, wire), x, wire)]
    assert got == golden.predict(net, x).tolist()
    with pytest.raises(HwgenError, match="no answer"):
        list(run_images(_FakePort(net, wire, mute=True), x, wire))
