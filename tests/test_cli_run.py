"""``hwgen run`` against a board played by the golden model on a pseudo-terminal."""

import json
import os
import threading

import numpy as np
import pytest

from hwgen import golden, hwq
from hwgen.cli import main
from hwgen.emit import BuildOptions, build
from tests.conftest import example_network


def _board(fd: int, net, n_images: int) -> None:
    """Answer ``n_images`` requests on the pty master like the board's host link would."""
    c, h, w = net.input_shape
    fmt = net.input_format
    for _ in range(n_images):
        need, buf = 1 + c * h * w, b""
        while len(buf) < need:
            buf += os.read(fd, need - len(buf))
        values = np.frombuffer(buf[1:], dtype=np.uint8).astype(np.int64)
        if fmt.signed:
            values = np.where(values >= 128, values - 256, values)
        image = values.reshape(1, h, w, c).transpose(0, 3, 1, 2)
        out = golden.forward(net, image)[-1][0]
        os.write(fd, bytes([0x5A, int(np.argmax(out))]) + out.astype("<i2").tobytes())


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_run_prints_the_boards_classes(tmp_path, capsys):
    net = example_network(seed=8)
    build(net, tmp_path / "b", BuildOptions(vectors=1))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["board"] = {"name": "ulx3s-85f", "baud": 115200, "bitstream": "board/top.bit"}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    x = np.random.default_rng(0).integers(-128, 128, size=(3, *net.input_shape))
    np.save(tmp_path / "x.npy", x)
    master, slave = os.openpty()
    board = threading.Thread(target=_board, args=(master, net, len(x)), daemon=True)
    board.start()
    rc = main(
        [
            "run",
            str(tmp_path / "x.npy"),
            "--port",
            os.ttyname(slave),
            "--build",
            str(tmp_path / "b"),
        ]
    )
    board.join(timeout=10)
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert [int(line.split()[3]) for line in out] == golden.predict(net, x).tolist()


def test_run_needs_a_board_build(tmp_path, capsys):
    net = example_network(seed=8)
    hwq.save(net, tmp_path / "m.hwq")
    build(net, tmp_path / "b", BuildOptions(vectors=1))
    np.save(tmp_path / "x.npy", np.zeros((1, *net.input_shape), dtype=np.int64))
    rc = main(
        ["run", str(tmp_path / "x.npy"), "--port", "/dev/null", "--build", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "without --board" in err[0]
