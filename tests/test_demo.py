"""``hwgen demo``: the whole flow, its summary and the time of each step."""

from __future__ import annotations

import re

import pytest

from hwgen import demo, hwq
from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.quant.fakequant import accuracy
from hwgen.quant.tune import float_accuracy


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HwgenError, match="is not a hwgen demo folder"):
        demo.run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_demo_summary_is_measured_and_timed(tmp_path):
    out = tmp_path / "demo"
    summary = demo.run(out)
    fnet, d = digits_float_net()
    assert summary["float accuracy"] == f"{100 * float_accuracy(fnet, d.x_test, d.y_test):.2f}%"
    net = hwq.load(out / "digits.hwq")
    tuned = summary["tuned INQ accuracy (golden model)"]
    acc, bits = re.fullmatch(r"(.+)%, (\d+) weight ROM bits", tuned).groups()
    assert acc == f"{100 * accuracy(net, d.x_test, d.y_test):.2f}" and int(bits) < 15_000
    assert summary["RTL == golden"] == "360/360 images"
    steps = [k for k in summary if k.startswith("time: ")]
    names = ("train", "tune", "build", "simulate", "synthesise", "total")
    assert steps == [f"time: {s}" for s in names]
    assert all(re.fullmatch(r"\d+ s", summary[k]) for k in steps)
