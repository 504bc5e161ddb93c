"""Brevitas models in: QONNX and QCDQ exports import to integer networks whose every layer
equals QONNX's own execution on the digits test images; bad quantizers are one-line errors."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hwgen import golden as gm
from hwgen import hwq
from hwgen.cli import main
from hwgen.errors import HwgenError
from hwgen.examples.digits import load_digits_split
from hwgen.frontend import load_model, load_quantized
from hwgen.frontend.qonnx_import import QONNX_DOMAINS, from_qonnx
from hwgen.ir import Fixed, Flatten, Pow2

DOMAIN = QONNX_DOMAINS[0]


# ------------------------------------------------------------ hand-written graphs (no Brevitas)


def _quant(
    x: str,
    out: str,
    scale: float,
    bits: int,
    signed: int = 1,
    narrow: int = 0,
    rounding: str = "ROUND",
    zp: float = 0.0,
) -> tuple[onnx.NodeProto, list]:
    consts = [
        numpy_helper.from_array(np.array(scale, np.float32), f"{out}_scale"),
        numpy_helper.from_array(np.array(zp, np.float32), f"{out}_zp"),
        numpy_helper.from_array(np.array(bits, np.float32), f"{out}_bits"),
    ]
    node = helper.make_node(
        "Quant",
        [x, *(c.name for c in consts)],
        [out],
        name=f"q_{out}",
        domain=DOMAIN,
        signed=signed,
        narrow=narrow,
        rounding_mode=rounding,
    )
    return node, consts


def _linear_model(
    path: Path,
    *,
    w_scale: float = 0.25,
    bias: np.ndarray | None = None,
    in_kw: dict | None = None,
    out_kw: dict | None = None,
    bias_after_quant: bool = False,
) -> Path:
    """input (1, 4) -> Quant -> MatMul(Quant(W)) [+ bias] -> Relu -> Quant -> output."""
    rng = np.random.default_rng(0)
    w = rng.integers(-7, 8, (4, 3)).astype(np.float32) * np.float32(w_scale)
    nodes, inits = [], [numpy_helper.from_array(w, "w")]
    for spec in (("x", "xq", 2.0**-4, 8, in_kw or {}), ("w", "wq", w_scale, 4, {"narrow": 1})):
        n, c = _quant(spec[0], spec[1], spec[2], spec[3], **spec[4])
        nodes.append(n)
        inits += c
    nodes.append(helper.make_node("MatMul", ["xq", "wq"], ["mm"], name="fc"))
    y = "mm"
    if bias is not None and not bias_after_quant:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["mmb"], name="fc_bias"))
        y = "mmb"
    if not bias_after_quant:
        nodes.append(helper.make_node("Relu", [y], ["r"], name="relu"))
        y = "r"
    n, c = _quant(y, "yq", 2.0**-3, 8, **(out_kw or {"signed": 0}))
    nodes.append(n)
    inits += c
    out = "yq"
    if bias is not None and bias_after_quant:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["yq", "b"], ["yb"], name="late_bias"))
        out = "yb"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)]
    )
    onnx.save(model, str(path))
    return path


def test_hand_written_graph_formats(tmp_path: Path):
    bias = np.array([2.0**-6, -3 * 2.0**-6, 0.5])  # on the accumulator grid 2^-6
    m = from_qonnx(
        _linear_model(tmp_path / "m.onnx", bias=bias, out_kw={"signed": 0, "rounding": "FLOOR"})
    )
    net = m.net
    (fc,) = net.layers
    assert str(net.input_format) == "s8.f4.even"
    assert fc.weight_format == Fixed(4, 2) and fc.relu
    assert str(fc.out_format) == "u8.f3.floor"
    assert fc.bias.tolist() == [1, -3, 32]
    assert m.tensors == {"input": "xq", "fc": "yq"}


def test_float_bias_off_the_accumulator_grid_is_refused(tmp_path: Path):
    path = _linear_model(tmp_path / "m.onnx", bias=np.array([0.1, 0.0, 0.0]))
    with pytest.raises(
        HwgenError,
        match=r"^layer fc: bias\[0\] = 0\.10000000149011612 is not on "
        r"the accumulator grid 2\^-6 .*bias_quant=Int32Bias\)$",
    ):
        from_qonnx(path)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"w_scale": 0.3}, r"^Quant node 'q_wq': scale 0\.300000012 is not a power of two "),
        ({"in_kw": {"narrow": 1}}, r"^Quant node 'q_xq': activation range \[-127, 127\] is not"),
        ({"in_kw": {"zp": 3.0}}, r"^Quant node 'q_xq': zero point 3\.0 is not 0 "),
        ({"in_kw": {"rounding": "CEIL"}}, r"^Quant node 'q_xq': rounding mode CEIL is not "),
        (
            {"bias": np.full(3, 0.5), "bias_after_quant": True},
            r"^Quant node 'q_yq': quantizes layer fc before its bias is added; ",
        ),
    ],
)
def test_bad_quantizers_are_one_line_errors(tmp_path: Path, kw: dict, message: str):
    with pytest.raises(HwgenError, match=message) as e:
        from_qonnx(_linear_model(tmp_path / "m.onnx", **kw))
    assert "\n" not in str(e.value)


def test_per_channel_scale_is_named(tmp_path: Path):
    path = _linear_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == "wq_scale":
            t.CopyFrom(numpy_helper.from_array(np.array([[0.25, 0.5, 0.25]], np.float32), t.name))
    onnx.save(model, str(path))
    with pytest.raises(HwgenError, match=r"^Quant node 'q_wq': per-channel scales \(2 different "):
        from_qonnx(path)


def _pool_model(path: Path, pool_frac: int, rounding: str = "ROUND") -> Path:
    """input (2, 4, 4) -> Quant s8.f4 -> GlobalAveragePool -> Quant 2^-pool_frac -> Flatten
    -> MatMul(Quant W) -> output, unquantized (hwgen keeps its exact value)."""
    rng = np.random.default_rng(1)
    w = rng.integers(-7, 8, (2, 3)).astype(np.float32) * np.float32(0.5)
    nodes, inits = [], [numpy_helper.from_array(w, "w")]
    for x, out, scale, kw in (
        ("x", "xq", 2.0**-4, {"rounding": rounding}),
        ("g", "gq", 2.0**-pool_frac, {"rounding": rounding}),
        ("w", "wq", 0.5, {"narrow": 1}),
    ):
        n, c = _quant(x, out, scale, 8 if out != "wq" else 4, **kw)
        inits += c
        nodes.append(n)
        if out == "xq":
            nodes.append(helper.make_node("GlobalAveragePool", ["xq"], ["g"], name="gap"))
    nodes.insert(3, helper.make_node("Flatten", ["gq"], ["f"], name="flatten"))
    nodes.append(helper.make_node("MatMul", ["f", "wq"], ["y"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 3])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)]
    )
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("rounding", ["ROUND", "FLOOR"])
def test_average_pool_rounds_like_qonnx(tmp_path: Path, rounding: str):
    pytest.importorskip("qonnx")
    m = from_qonnx(_pool_model(tmp_path / "m.onnx", 4, rounding))
    net = m.net
    assert [type(layer).__name__ for layer in net.layers] == ["GlobalAvgPool", "Flatten", "Linear"]
    assert str(net.output_format) == "s12.f5"  # no quantizer: the exact accumulator
    # Ties of both signs: sums 8 * 16 + 8 and -(8 * 16 + 8) over 16 pixels.
    q = np.random.default_rng(2).integers(-128, 128, (5, 2, 4, 4))
    q[0, 0] = np.where(np.arange(16).reshape(4, 4) < 8, 9, 8)
    q[1, 1] = -q[0, 0]
    x = q.astype(np.float32) / 16
    ctx = _qonnx_run(tmp_path / "m.onnx", x)
    outs = dict(zip(net.names, gm.forward(net, q), strict=True))
    for name in ("gap", "fc"):
        want = ctx[m.tensors[name]].astype(np.float64) * 2.0 ** net.formats[name].frac
        assert np.array_equal(outs[name].reshape(want.shape), want), name


def test_average_pool_must_requantize_to_its_input_scale(tmp_path: Path):
    with pytest.raises(HwgenError, match=r"^layer gap: an average pool must be followed by a "):
        from_qonnx(_pool_model(tmp_path / "m.onnx", 5))


def test_plain_onnx_is_not_quantized_and_quantized_onnx_needs_auto(tmp_path: Path):
    path = _linear_model(tmp_path / "m.onnx")
    assert load_quantized(path) is not None
    with pytest.raises(HwgenError, match=r"is quantized \(QONNX/QCDQ\).*--scheme auto"):
        load_model(path)
    plain = tmp_path / "plain.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph), str(plain))
    assert load_quantized(plain) is None


# ------------------------------------------------------------ Brevitas models on digits


class _Brevitas:
    """Brevitas and QONNX, imported on first use: the tests above need neither."""

    def __init__(self) -> None:
        pytest.importorskip("brevitas")
        pytest.importorskip("qonnx")
        import brevitas.nn as qnn
        from brevitas.export import export_onnx_qcdq, export_qonnx
        from brevitas.inject.enum import FloatToIntImplType
        from brevitas.quant import (
            Int8ActPerTensorFixedPoint,
            Int8WeightPerTensorFixedPoint,
            Int8WeightPerTensorFloat,
            Int32Bias,
            SignedBinaryWeightPerTensorConst,
            SignedTernaryWeightPerTensorConst,
            Uint8ActPerTensorFixedPoint,
        )
        from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint

        class Int4Weight(Int8WeightPerTensorFixedPoint):
            bit_width = 4

        class Ternary(SignedTernaryWeightPerTensorConst):
            scaling_const = 0.25  # a power-of-two scale (cnn() sets one per layer)

        class Binary(SignedBinaryWeightPerTensorConst):
            scaling_const = 0.25

        class Uint4Floor(Uint8ActPerTensorFixedPoint):
            bit_width = 4
            float_to_int_impl_type = FloatToIntImplType.FLOOR

        self.qnn, self.export_qonnx, self.export_onnx_qcdq = qnn, export_qonnx, export_onnx_qcdq
        self.int8_act, self.uint8_act = Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint
        self.int32_bias, self.float_weight = Int32Bias, Int8WeightPerTensorFloat
        self.per_channel = Int8WeightPerChannelFixedPoint
        self.int4, self.ternary, self.binary, self.uint4_floor = (
            Int4Weight,
            Ternary,
            Binary,
            Uint4Floor,
        )

    def cnn(self, weight: type, fc_weight: type, act: type, out_quant: bool) -> nn.Module:
        """The digits example's CNN (conv 1->8, pool, conv 8->16, linear 256->10), quantized,
        with 32-bit quantized biases. Constant-scale (ternary, binary) weights get per-layer
        power-of-two scales near the layers' initial weight magnitudes."""
        qnn = self.qnn

        def kw(quant: type, scale: float) -> dict:
            const = quant in (self.ternary, self.binary)
            return {"weight_quant": quant, "bias_quant": self.int32_bias} | (
                {"weight_scaling_const": scale} if const else {}
            )

        layers = OrderedDict(
            inp=qnn.QuantIdentity(act_quant=self.uint8_act, return_quant_tensor=True),
            conv1=qnn.QuantConv2d(1, 8, 3, padding=1, **kw(weight, 0.25)),
            relu1=qnn.QuantReLU(act_quant=act, return_quant_tensor=True),
            pool1=nn.MaxPool2d(2),
            conv2=qnn.QuantConv2d(8, 16, 3, padding=1, **kw(weight, 2.0**-4)),
            relu2=qnn.QuantReLU(act_quant=act, return_quant_tensor=True),
            flatten=nn.Flatten(),
            fc=qnn.QuantLinear(256, 10, **kw(fc_weight, 2.0**-5)),
        )
        if out_quant:
            layers["out"] = qnn.QuantIdentity(act_quant=self.int8_act)
        return nn.Sequential(layers)


@pytest.fixture(scope="module")
def bv() -> _Brevitas:
    return _Brevitas()


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 1) -> nn.Module:
    """A brief, seeded Adam training on the digits training split (seconds)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def _export(fn: Callable, model: nn.Module, path: Path, batch: int, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(model, torch.zeros(batch, 1, 8, 8), export_path=str(path), **kw)
    return path


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, digits, bv) -> dict[str, Path]:
    """W4A8 (power-of-two scales, ROUND) and ternary (FLOOR activations; binary classifier
    in the QONNX-only variant: Brevitas exports no binary QCDQ), each both ways, with the
    batch of the 360 test images (QONNX executes them in one go)."""
    d, n = tmp_path_factory.mktemp("brevitas"), len(digits.y_test)
    train = (digits.x_train, digits.y_train)
    w4a8 = _train(bv.cnn(bv.int4, bv.int4, bv.uint8_act, True), *train)
    ternary = _train(bv.cnn(bv.ternary, bv.ternary, bv.uint4_floor, False), *train)
    binary = bv.cnn(bv.ternary, bv.binary, bv.uint4_floor, False)
    binary.load_state_dict(ternary.state_dict())  # then one epoch with a binary classifier
    binary = _train(binary, *train, epochs=1)
    qonnx, qcdq = bv.export_qonnx, bv.export_onnx_qcdq
    return {
        "w4a8-qonnx": _export(qonnx, w4a8, d / "w4a8_qonnx.onnx", n),
        # The TorchScript exporter: the dynamo one refuses a quantized bias in QCDQ.
        "w4a8-qcdq": _export(qcdq, w4a8, d / "w4a8_qcdq.onnx", n, dynamo=False),
        "ternary-qonnx": _export(qonnx, ternary, d / "ternary_qonnx.onnx", n),
        "ternary-qcdq": _export(qcdq, ternary, d / "ternary_qcdq.onnx", n, dynamo=False),
        "binary-qonnx": _export(qonnx, binary, d / "binary_qonnx.onnx", n),
    }


def _qonnx_run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    model = ModelWrapper(str(path)).transform(InferShapes())
    return execute_onnx(model, {model.graph.input[0].name: x}, return_full_exec_context=True)


FORMATS = {
    "w4a8": (Fixed, "half_even"),
    "ternary": (Pow2, "floor"),
    "binary": (Pow2, "floor"),
}


@pytest.mark.parametrize(
    "name", ["w4a8-qonnx", "w4a8-qcdq", "ternary-qonnx", "ternary-qcdq", "binary-qonnx"]
)
def test_every_layer_equals_qonnx_execution(exports, digits, name: str):
    m = from_qonnx(exports[name])
    net = m.net
    kind, rounding = FORMATS[name.split("-")[0]]
    macs = [layer for layer in net.layers if hasattr(layer, "weight_format")]
    assert [type(layer.weight_format) for layer in macs] == [Fixed if kind is Fixed else Pow2] * 3
    if name.startswith("w4a8"):
        assert {layer.weight_format.bits for layer in macs} == {4}
    if name.startswith("binary"):
        assert macs[-1].weight_format.bits == 1 and macs[0].weight_format.bits == 2
    qcdq = name.endswith("qcdq")  # QuantizeLinear rounds half to even whatever Brevitas said
    want = "half_even" if qcdq else rounding
    assert {net.formats[layer.name].rounding for layer in macs[:2]} == {want}
    x = digits.x_test
    ctx = _qonnx_run(exports[name], x)
    ints = dict(
        zip(net.names, gm.forward(net, gm.quantize_input(x, net.input_format)), strict=True)
    )
    ints["input"] = gm.quantize_input(x, net.input_format)
    assert set(m.tensors) == {"input", *net.names}
    for layer_name, tensor in m.tensors.items():
        fmt = net.formats[layer_name]
        got = ints[layer_name]
        if layer_name != "input" and isinstance(net.layer(layer_name), Flatten):
            before = ints[net.layer(layer_name).inputs[0]]  # ONNX flattens C, H, W
            got = before.reshape(len(before), -1)
        ref = ctx[tensor].astype(np.float64) * 2.0**fmt.frac
        assert ref.shape == got.shape, layer_name
        assert np.array_equal(ref, got), f"{name}: layer {layer_name} differs from QONNX"
    acc = float(np.mean(gm.predict(net, ints["input"]) == digits.y_test))
    assert acc > 0.5, acc  # trained, however briefly


# ------------------------------------------------------------ the CLI


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("scheme", [(), ("--scheme", "auto")])
def test_cli_quantize_writes_the_imported_network(exports, tmp_path, capsys, scheme):
    out = tmp_path / "m.hwq"
    code, stdout, err = _cli(
        capsys, "quantize", str(exports["ternary-qonnx"]), *scheme, "-o", str(out)
    )
    assert code == 0, err
    assert f"wrote {out}" in stdout
    assert hwq.load(out) == from_qonnx(exports["ternary-qonnx"]).net


def _refused(tmp_path: Path, capsys, bv: _Brevitas, weight_quant: type, match: str) -> None:
    torch.manual_seed(0)
    model = bv.cnn(weight_quant, weight_quant, bv.uint8_act, False).eval()
    with torch.no_grad():
        model.conv1.weight[0] *= 16  # so that per-channel scales differ
    path = _export(bv.export_qonnx, model, tmp_path / "bad.onnx", 1)
    out = tmp_path / "bad.hwq"
    code, _, err = _cli(capsys, "quantize", str(path), "-o", str(out))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert match in err, err
    assert not out.exists()


def test_cli_refuses_a_float_scale(tmp_path, capsys, bv):
    _refused(tmp_path, capsys, bv, bv.float_weight, "is not a power of two")


def test_cli_refuses_per_channel_scales(tmp_path, capsys, bv):
    _refused(tmp_path, capsys, bv, bv.per_channel, "per-channel scales (")


@pytest.mark.parametrize(
    "name", ["binary-qonnx", pytest.param("w4a8-qcdq", marks=pytest.mark.slow)]
)
def test_imported_network_rtl_equals_golden(exports, tmp_path, capsys, name: str):
    """quantize (import) -> build -> sim --network: 16 random images plus all-max/all-min."""
    hwq_path, build = tmp_path / "m.hwq", tmp_path / "build"
    assert _cli(capsys, "quantize", str(exports[name]), "-o", str(hwq_path))[0] == 0
    code, _, err = _cli(capsys, "build", str(hwq_path), "-o", str(build), "--vectors", "16")
    assert code == 0, err
    code, out, err = _cli(capsys, "sim", str(build), "--network")
    assert code == 0, out + err
    assert "RTL == golden: 18/18 images" in out
