from dataclasses import replace

import numpy as np
import pytest
import torch
from test_quant_tune import residual_problem

from hwgen import golden as gm
from hwgen import hwq
from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.frontend.graph import FConv2d, FLinear, FloatNet
from hwgen.ir import (
    ROUNDINGS,
    ActFormat,
    Add,
    AvgPool2d,
    Conv2d,
    Fixed,
    Flatten,
    GlobalAvgPool,
    Linear,
    MaxPool2d,
    Network,
    Pow2,
    ReLU,
    SubsamplePad,
)
from hwgen.quant import quantize
from hwgen.quant.binarize import RetrainOptions
from hwgen.quant.fakequant import FakeQuantNet, accuracy, fake_quant_forward, fake_quant_predict
from hwgen.quant.inq import InqOptions, with_weights
from hwgen.quant.precision import LayerPrecision, Precision


def _random_net(rng: np.random.Generator, roundings=("half_up",) * 3) -> Network:
    wf = Pow2(4, -1)
    w1 = rng.choice([-4, -2, -1, 0, 1, 2, 4], size=(6, 3, 3, 3))
    w2 = rng.integers(-128, 128, size=(5, 6 * 2 * 2))
    r_in, r_c1, r_fc = roundings
    return Network(
        (3, 9, 9),
        ActFormat(6, 3, rounding=r_in),
        (
            Conv2d("c1", 3, 6, 3, wf, ActFormat(5, 2, False, r_c1), w1, rng.integers(-50, 50, 6),
                   stride=(2, 2), padding=(1, 1), relu=True),
            AvgPool2d("a1", (2, 2)),
            ReLU("r1"),
            MaxPool2d("m1", (1, 1)),
            Flatten("f"),
            Linear("fc", 24, 5, Fixed(8, 7), ActFormat(4, -1, rounding=r_fc), w2,
                   rng.integers(-900, 900, 5)),
        ),
    )  # fmt: skip


@pytest.mark.parametrize("rounding", [*ROUNDINGS, "mixed"])
def test_fake_quant_equals_golden_on_random_nets_with_ties_and_saturation(rounding):
    rng = np.random.default_rng(0)
    for _ in range(20):
        modes = rng.choice(ROUNDINGS, 3) if rounding == "mixed" else (rounding,) * 3
        net = _random_net(rng, tuple(str(m) for m in modes))
        # inputs on the half-step grid hit the rounding ties; large ones saturate
        x = rng.integers(-80, 80, size=(16, 3, 9, 9)) * 2.0**-4
        ref = gm.forward(net, gm.quantize_input(x, net.input_format))
        got = fake_quant_forward(net, x)
        for a, b in zip(ref, got, strict=True):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fake_quant_equals_golden_with_per_channel_scales(rounding):
    """Scales at the Fixed extremes, zero and negative on both MAC layers, every rounding."""
    rng = np.random.default_rng(1)
    for _ in range(10):
        net = _random_net(rng, (rounding,) * 3)
        layers = list(net.layers)
        for i, sfmt in ((0, Fixed(16, 12)), (5, Fixed(5, -2))):
            cout = layers[i].bias.shape[0]
            m = rng.integers(sfmt.lo, sfmt.hi, cout, endpoint=True)
            m[: min(4, cout)] = [sfmt.lo, sfmt.hi, 0, -1][: min(4, cout)]
            layers[i] = replace(layers[i], scale=m, scale_format=sfmt)
        net = replace(net, layers=tuple(layers))
        x = rng.integers(-80, 80, size=(16, 3, 9, 9)) * 2.0**-4
        ref = gm.forward(net, gm.quantize_input(x, net.input_format))
        got = fake_quant_forward(net, x)
        for a, b in zip(ref, got, strict=True):
            assert np.array_equal(a, b)
        assert len(np.unique(ref[-1])) > 2  # not all saturated


def test_fake_quant_refuses_a_scaled_accumulator_past_float64():
    w = np.full((1, 1), 2**15 - 1)
    layer = Linear(
        "fc", 1, 1, Fixed(16, 0), ActFormat(8, 0), w, [2**37], scale=[-(2**15)],
        scale_format=Fixed(16, 0),
    )  # fmt: skip
    net = Network((1,), ActFormat(8, 0), (layer,))
    with pytest.raises(HwgenError, match="layer fc: accumulator times scale of 54 bits is not"):
        FakeQuantNet(net)


def _random_residual_net(rng: np.random.Generator) -> Network:
    """conv -> [conv] + identity -> add -> subsample-pad + conv -> add -> global pool -> fc,
    with random formats: fracs far apart, signed or unsigned, fused ReLU or not."""

    def fmt() -> ActFormat:
        signed = bool(rng.integers(2))
        rounding = str(rng.choice(ROUNDINGS))
        return ActFormat(int(rng.integers(3, 9)), int(rng.integers(-3, 8)), signed, rounding)

    def conv(name: str, cin: int, cout: int, stride: int = 1, inputs=()) -> Conv2d:
        w = rng.integers(-7, 8, size=(cout, cin, 3, 3))
        return Conv2d(name, cin, cout, 3, Fixed(4, int(rng.integers(0, 4))), fmt(), w,
                      rng.integers(-300, 300, cout), stride=(stride, stride), padding=(1, 1),
                      relu=bool(rng.integers(2)), inputs=inputs)  # fmt: skip

    return Network(
        (2, 8, 8),
        fmt(),
        (
            conv("c0", 2, 3),
            conv("c1", 3, 3),
            Add("a1", fmt(), ("c1", "c0"), relu=bool(rng.integers(2))),
            conv("c2", 3, 5, stride=2),
            SubsamplePad("s", (2, 2), (1, 1), ("a1",)),
            Add("a2", fmt(), ("s", "c2"), relu=bool(rng.integers(2))),
            GlobalAvgPool("g"),
            Flatten("f"),
            Linear("fc", 5, 4, Fixed(6, 3), fmt(), rng.integers(-31, 32, (4, 5)),
                   rng.integers(-99, 99, 4)),
        ),
    )  # fmt: skip


def test_fake_quant_equals_golden_on_random_residual_nets():
    rng = np.random.default_rng(7)
    for _ in range(30):
        net = _random_residual_net(rng)
        x = rng.integers(-80, 80, size=(8, 2, 8, 8)) * 2.0**-4  # ties and saturation
        ref = gm.forward(net, gm.quantize_input(x, net.input_format))
        got = fake_quant_forward(net, x)
        for layer, a, b in zip(net.layers, ref, got, strict=True):
            assert np.array_equal(a, b), layer.name


def test_half_to_even_would_differ():
    # the same input with torch.round would give 0 for 0.5 and 2 for 1.5: floor(x + 0.5) does not
    net = Network((1,), ActFormat(4, 0), (ReLU("r"),))
    x = np.array([[0.5], [1.5], [-0.5], [2.5]])
    assert fake_quant_forward(net, x)[0].ravel().tolist() == [1, 2, 0, 3]
    assert torch.round(torch.tensor([0.5, 2.5])).tolist() == [0.0, 2.0]


TIES = {  # -3.5 ... 3.5 in each mode (docs/hwq-format.md §3)
    "half_up": [-3, -2, -1, 0, 1, 2, 3, 4],
    "half_even": [-4, -2, -2, 0, 0, 2, 2, 4],
    "floor": [-4, -3, -2, -1, 0, 1, 2, 3],
}


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_each_rounding_at_ties_of_both_signs(rounding):
    """Input ties, then linear-output ties (acc = 2q - 1 + k at frac 1), equal to golden."""
    x = np.arange(-7, 9, 2)[:, None] / 2.0  # -3.5 ... 3.5
    fc = Linear("fc", 1, 1, Fixed(3, 1), ActFormat(8, 0, rounding=rounding), [[2]], [-1])
    net = Network((1,), ActFormat(8, 0, rounding=rounding), (fc,))
    got = fake_quant_forward(net, x)
    q = gm.quantize_input(x, net.input_format)
    assert q.ravel().tolist() == TIES[rounding]
    # acc = 2q - 1 at frac 1 is always a tie, q - 1/2: up to q, down to q - 1, or the even one
    q = q.ravel()
    want = {"half_up": q, "floor": q - 1, "half_even": q - (q & 1)}[rounding]
    assert got[0].ravel().tolist() == want.tolist()
    assert got[0].tolist() == gm.forward(net, q[:, None])[0].tolist()


def test_fake_quant_net_is_a_module():
    net = _random_net(np.random.default_rng(1))
    out = FakeQuantNet(net)(torch.zeros(2, 3, 9, 9))
    assert len(out) == len(net.layers) and out[-1].dtype == torch.float64


@pytest.fixture(scope="module")
def digits():
    return digits_float_net()


def _on_grid_float_net(fnet: FloatNet, nets: dict[str, Network]) -> FloatNet:
    """``fnet`` with the real values of each named layer's integer weights in ``nets``."""
    params = {}
    for fl in fnet.layers:
        if isinstance(fl, (FConv2d, FLinear)):
            layer = nets[fl.name].layer(fl.name)
            params[fl.name] = (layer.weight * 2.0**-layer.weight_format.frac, fl.bias)
    return with_weights(fnet, params)


@pytest.mark.parametrize("scheme", ["fixed", "pow2", "inq", "ternary", "binary", "auto"])
def test_fake_quant_equals_golden_on_digits(digits, scheme, tmp_path):
    fnet, data = digits
    if scheme == "auto":  # float weights already on fixed / pow2 grids, detected losslessly
        fixed = quantize(fnet, Precision("fixed"), data.x_train).net
        pow2 = quantize(
            fnet, Precision("pow2", {"fc": LayerPrecision(weight_bits=3)}), data.x_train
        )
        fnet = _on_grid_float_net(fnet, {"conv1": fixed, "conv2": pow2.net, "fc": pow2.net})
    r = quantize(
        fnet, Precision(scheme), data.x_train, (data.x_train, data.y_train),
        progress=False, inq_options=InqOptions(epochs=1),
    )  # fmt: skip
    path = hwq.save(r.net, tmp_path / "m.hwq", meta=r.meta)
    net = hwq.load(path)
    golden = gm.forward(net, gm.quantize_input(data.x_test, net.input_format))
    fake = fake_quant_forward(r.net, data.x_test)
    for a, b in zip(golden, fake, strict=True):
        assert np.array_equal(a, b)
    xq = gm.quantize_input(data.x_test, net.input_format)
    assert np.array_equal(fake_quant_predict(r.net, data.x_test), gm.predict(net, xq))
    assert accuracy(net, data.x_test, data.y_test) > 0.5
    if scheme == "auto":
        assert set(r.detected) == {"conv1", "conv2", "fc"}
        for fl in fnet.layers:
            if isinstance(fl, (FConv2d, FLinear)):
                layer = net.layer(fl.name)
                assert r.detected[fl.name] == str(layer.weight_format)
                assert isinstance(layer.weight_format, Fixed if fl.name == "conv1" else Pow2)
                assert np.array_equal(layer.weight * 2.0**-layer.weight_format.frac, fl.weight)


def test_fake_quant_equals_golden_on_amq_digits(digits, tmp_path):
    """amq's Planes layers: the fake-quant model reads their integer sums as plain weights,
    and equals the golden model on every digits test image, layer by layer."""
    fnet, data = digits
    r = quantize(
        fnet, Precision("amq", {"fc": LayerPrecision(weight_bits=3)}), data.x_train,
        (data.x_train, data.y_train), progress=False,
        retrain_options=RetrainOptions(epochs=1),
    )  # fmt: skip
    net = hwq.load(hwq.save(r.net, tmp_path / "m.hwq", meta=r.meta))
    planes = [lyr.weight_format.planes for lyr in net.layers if hasattr(lyr, "weight_format")]
    assert planes == [2, 2, 3]
    golden = gm.forward(net, gm.quantize_input(data.x_test, net.input_format))
    for a, b in zip(golden, fake_quant_forward(r.net, data.x_test), strict=True):
        assert np.array_equal(a, b)
    assert accuracy(net, data.x_test, data.y_test) > 0.5


def test_fake_quant_equals_golden_on_lowrank_and_pruned_digits(digits, tmp_path):
    """conv2 split at rank 4 (3x1 then 1x3) and every layer but the first block-pruned:
    the fake-quant model equals the golden model on every test image, layer by layer."""
    fnet, data = digits
    p = Precision("inq", {"fc": LayerPrecision(prune=0.5)}, block=4, lowrank=4)
    r = quantize(
        fnet, p, data.x_train, (data.x_train, data.y_train), progress=False,
        inq_options=InqOptions(epochs=1),
    )  # fmt: skip
    net = hwq.load(hwq.save(r.net, tmp_path / "m.hwq", meta=r.meta))
    assert {"conv2_v", "conv2_h"} <= set(net.names)
    assert (net.layer("fc").weight == 0).mean() >= 0.5
    golden = gm.forward(net, gm.quantize_input(data.x_test, net.input_format))
    for a, b in zip(golden, fake_quant_forward(r.net, data.x_test), strict=True):
        assert np.array_equal(a, b)
    assert accuracy(net, data.x_test, data.y_test) > 0.5


@pytest.mark.parametrize("scheme", ["fixed", "pow2", "inq", "ternary", "binary", "auto"])
def test_fake_quant_equals_golden_on_a_residual_net(scheme, tmp_path):
    fnet, x, y = residual_problem(n=200)
    calib, test = x[:100], x[100:]
    if scheme == "auto":  # float weights already on fixed / pow2 grids, detected losslessly
        fixed = quantize(fnet, Precision("fixed"), calib, progress=False).net
        pow2 = quantize(fnet, Precision("pow2"), calib, progress=False).net
        grids = {fl.name: fixed if fl.name.startswith("b1") else pow2 for fl in fnet.layers}
        fnet = _on_grid_float_net(fnet, grids)
    r = quantize(
        fnet, Precision(scheme), calib, (calib, y[:100]),
        progress=False, inq_options=InqOptions(epochs=1, batch_size=16),
    )  # fmt: skip
    net = hwq.load(hwq.save(r.net, tmp_path / "m.hwq", meta=r.meta))
    assert net == r.net and not net.is_chain
    golden = gm.forward(net, gm.quantize_input(test, net.input_format))
    fake = fake_quant_forward(r.net, test)
    for layer, a, b in zip(net.layers, golden, fake, strict=True):
        assert np.array_equal(a, b), layer.name
    if scheme == "auto":
        assert set(r.detected) == {"stem", "b1c1", "b1c2", "b2c1", "b2c2", "fc"}
        assert all(str(net.layer(n).weight_format) == f for n, f in r.detected.items())


@pytest.mark.parametrize("source", ["module", "onnx"])
@pytest.mark.parametrize(
    ("shortcut", "blocks", "widths", "scheme"),
    [("A", (3, 3, 3), (16, 32, 64), "pow2"), ("B", (1, 1), (8, 16), "fixed")],
    ids=["resnet20-optionA", "resnet-optionB"],
)
def test_imported_resnets_quantize_to_golden_equal_fake_quant(
    tmp_path, source, shortcut, blocks, widths, scheme
):
    """A torch ResNet (option A: ResNet-20 itself; option B: 1x1 conv + BN shortcuts), from
    the nn.Module or its ONNX export, quantised: every layer of the golden model equals the
    fake-quantised torch model on every image."""
    from hwgen.examples.resnet import CifarResNet, seeded_init
    from hwgen.frontend.onnx_import import from_onnx
    from hwgen.frontend.torch_import import from_module

    shape = (3, 32, 32) if shortcut == "A" else (3, 16, 16)
    model = seeded_init(CifarResNet(blocks, widths, shortcut=shortcut), 1, shape)
    if source == "module":
        fnet = from_module(model, shape, name="resnet")
    else:
        path = tmp_path / "resnet.onnx"
        torch.onnx.export(model, torch.zeros(1, *shape), path, dynamo=False)
        fnet = from_onnx(path)
    assert sum(type(fl).__name__ == "FAdd" for fl in fnet.layers) == sum(blocks)
    x = np.random.default_rng(2).random((6, *shape))
    net = quantize(fnet, Precision(scheme), x[:4], progress=False).net
    ref = gm.forward(net, gm.quantize_input(x, net.input_format))
    for layer, a, b in zip(net.layers, ref, fake_quant_forward(net, x), strict=True):
        assert np.array_equal(a, b), layer.name
