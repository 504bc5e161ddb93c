from dataclasses import replace

import numpy as np
import pytest
from test_quant_tune import residual_problem

from hwgen import golden as gm
from hwgen.errors import HwgenError
from hwgen.frontend.graph import FAdd, FConv2d, FFlatten, FLinear, FloatNet, FMaxPool2d
from hwgen.ir import ActFormat, Add, Conv2d, Fixed, GlobalAvgPool, Linear, Network, SubsamplePad
from hwgen.quant.activations import ActSpec, float_activations, greedy_network
from hwgen.quant.weights import best_weight_frac, quantize_fixed


def _net(rng: np.random.Generator) -> FloatNet:
    return FloatNet(
        (2, 6, 6),
        (
            FConv2d("c1", rng.normal(0, 0.5, (4, 2, 3, 3)), rng.normal(0, 0.1, 4), (1, 1), (1, 1),
                    relu=True),
            FMaxPool2d("p1", (2, 2), (2, 2)),
            FConv2d("c2", rng.normal(0, 0.3, (3, 4, 3, 3)), rng.normal(0, 0.1, 3)),
            FFlatten("f"),
            FLinear("fc", rng.normal(0, 0.4, (5, 3)), rng.normal(0, 1.0, 5)),
        ),
    )  # fmt: skip


def _weights(fnet: FloatNet, bits: int = 6) -> dict:
    out = {}
    for fl in fnet.layers:
        if isinstance(fl, (FConv2d, FLinear)):
            fmt = Fixed(bits, best_weight_frac(fl.weight, bits))
            out[fl.name] = (fmt, quantize_fixed(fl.weight, fmt))
    return out


def _error(net: Network, x: np.ndarray, i: int, ref: np.ndarray) -> float:
    out = gm.forward(net, gm.quantize_input(x, net.input_format))[i]
    return float(np.sum((out * 2.0 ** -net.formats[net.layers[i].name].frac - ref) ** 2))


def test_greedy_frac_is_best_given_earlier_layers():
    rng = np.random.default_rng(3)
    fnet = _net(rng)
    x = rng.uniform(-1, 1, (40, 2, 6, 6))
    specs = {n: ActSpec(6) for n in ("c1", "c2", "fc")}
    net, curves = greedy_network(fnet, _weights(fnet), ActSpec(6), specs, x)
    refs = float_activations(fnet, x)
    assert net.input_format.signed and set(curves) == {"input", "c1", "c2", "fc"}
    assert net.layer("c1").out_format.signed is False  # ReLU fused: unsigned, one more bit
    assert net.layer("c2").out_format.signed and net.layer("fc").out_format.signed
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, (Conv2d, Linear)):
            continue
        chosen = _error(net, x, i, refs[i])
        assert dict(curves[layer.name])[layer.out_format.frac] == pytest.approx(chosen)
        # every other frac of this layer, with the later layers as they are, is no better
        for f in range(-6, 16):
            other = replace(layer, out_format=replace(layer.out_format, frac=f))
            trial = replace(net, layers=(*net.layers[:i], other, *net.layers[i + 1 :]))
            assert _error(trial, x, i, refs[i]) >= chosen


def test_given_fracs_are_kept_and_input_unsigned_for_nonnegative_data():
    rng = np.random.default_rng(4)
    fnet = _net(rng)
    x = rng.uniform(0, 1, (10, 2, 6, 6))
    specs = {"c1": ActSpec(8, frac=3), "c2": ActSpec(4, frac=-1, signed=True), "fc": ActSpec(8)}
    net, _ = greedy_network(fnet, _weights(fnet), ActSpec(8), specs, x)
    assert net.input_format == ActFormat(8, 8, False)
    assert net.layer("c1").out_format == ActFormat(8, 3, False)
    assert net.layer("c2").out_format == ActFormat(4, -1, True)


def test_bias_at_accumulator_scale_follows_input_format():
    rng = np.random.default_rng(5)
    fnet = _net(rng)
    x = rng.uniform(-1, 1, (10, 2, 6, 6))
    specs = {n: ActSpec(8) for n in ("c1", "c2", "fc")}
    w = _weights(fnet)
    net, _ = greedy_network(fnet, w, ActSpec(8, frac=5), specs, x)
    fl = fnet.layers[0]
    facc = 5 + w["c1"][0].frac
    assert net.layer("c1").bias.tolist() == np.floor(fl.bias * 2.0**facc + 0.5).tolist()


def test_calibration_shape_checked():
    fnet = _net(np.random.default_rng(0))
    specs = {n: ActSpec(8) for n in ("c1", "c2", "fc")}
    with pytest.raises(HwgenError, match=r"calibration data has shape \(3, 1, 6, 6\)"):
        greedy_network(fnet, _weights(fnet), ActSpec(8), specs, np.zeros((3, 1, 6, 6)))


def test_residual_net_greedy_add_frac_is_best_given_earlier_layers():
    fnet, x, _ = residual_problem(n=60)
    names = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear, FAdd))]
    net, curves = greedy_network(
        fnet, _weights(fnet), ActSpec(6), dict.fromkeys(names, ActSpec(6)), x
    )
    refs = float_activations(fnet, x)
    assert [lyr.inputs for lyr in net.layers] == [fl.inputs for fl in fnet.layers]
    assert isinstance(net.layer("gap"), GlobalAvgPool)
    assert net.layer("short") == SubsamplePad("short", (2, 2), (2, 2), ("add1",))
    assert net.formats["short"] == net.formats["add1"]
    assert set(curves) == {"input", *names}
    assert net.layer("add1").out_format.signed  # a plain sum is signed
    assert net.layer("add2").out_format == ActFormat(6, net.formats["add2"].frac, False)  # ReLU
    adds = [i for i, lyr in enumerate(net.layers) if isinstance(lyr, Add)]
    assert len(adds) == 2
    for i in adds:
        layer = net.layers[i]
        chosen = _error(net, x, i, refs[i])
        assert dict(curves[layer.name])[layer.out_format.frac] == pytest.approx(chosen)
        for f in range(-4, 12):  # given the quantised inputs, no other frac does better
            other = replace(layer, out_format=replace(layer.out_format, frac=f))
            trial = replace(net, layers=(*net.layers[:i], other, *net.layers[i + 1 :]))
            assert _error(trial, x, i, refs[i]) >= chosen


def test_add_specs_are_kept():
    fnet, x, _ = residual_problem(n=20)
    names = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    specs = dict.fromkeys(names, ActSpec(8))
    specs |= {"add1": ActSpec(5, frac=2), "add2": ActSpec(7, frac=1, signed=True)}
    net, _ = greedy_network(fnet, _weights(fnet), ActSpec(8), specs, x)
    assert net.layer("add1").out_format == ActFormat(5, 2, True)
    assert net.layer("add2").out_format == ActFormat(7, 1, True)
    assert net.layer("add2").relu  # a signed format does not undo the fused ReLU


def test_add_of_far_apart_fracs_is_refused_before_it_overflows():
    fnet = FloatNet(
        (1, 2, 2),
        (
            FConv2d("a", np.ones((1, 1, 1, 1)), np.zeros(1)),
            FConv2d("b", np.ones((1, 1, 1, 1)), np.zeros(1), inputs=("input",)),
            FAdd("s", ("a", "b")),
        ),
    )
    w = {n: (Fixed(8, 0), np.ones((1, 1, 1, 1), np.int64)) for n in ("a", "b")}
    specs = {"a": ActSpec(24, frac=-32), "b": ActSpec(24, frac=32), "s": ActSpec(8)}
    message = r"layer s: aligning s24\.f-32 with s24\.f32 needs 89 bits"
    with pytest.raises(HwgenError, match=message):
        greedy_network(fnet, w, ActSpec(8), specs, np.ones((2, 1, 2, 2)))
