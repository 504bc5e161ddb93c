"""ONNX importer: models exported by torch import to the same function; clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hwgen.cli import main
from hwgen.errors import HwgenError
from hwgen.examples.resnet import CifarResNet, random_resnet20, seeded_init
from hwgen.frontend import load_model
from hwgen.frontend.graph import (
    FAdd,
    FConv2d,
    FFlatten,
    FGlobalAvgPool,
    FLinear,
    FMaxPool2d,
    FSubsamplePad,
)
from hwgen.frontend.onnx_import import from_onnx
from hwgen.frontend.torch_import import from_module


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        x = self.drop(x).view(x.size(0), -1)
        return self.out(F.relu(self.bn1(self.fc(x))))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(1)
    for bn in (net.bn, net.bn1):
        n = bn.num_features
        bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return net.eval()


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, *shape), str(path), dynamo=False, **kw)
    return path


def _max_error(path: Path, model: nn.Module, shape: tuple[int, ...]) -> float:
    net = from_onnx(path)
    x = torch.randn(5, *shape, dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(x)
    model.float()
    return float((net.forward(x)[-1] - want).abs().max())


def test_unfolded_export_bn_and_dropout_kept(tmp_path: Path):
    # Without constant folding the exporter keeps BatchNormalization and the
    # Unsqueeze/Concat subgraph of x.view(x.size(0), -1): hwgen folds them itself.
    model = _net()
    path = _export(
        model,
        (1, 7, 7),
        tmp_path / "m.onnx",
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"BatchNormalization", "Concat", "Reshape"} <= ops
    assert _max_error(path, model, (1, 7, 7)) < 1e-9
    net = from_onnx(path)
    assert net.name == "m" and net.input_shape == (1, 7, 7)
    assert [type(layer) for layer in net.layers] == [
        FConv2d,
        FMaxPool2d,
        FFlatten,
        FLinear,
        FLinear,
    ]
    assert [layer.name for layer in net.layers] == ["conv", "maxpool", "reshape", "fc", "out"]
    assert net.layers[0].relu and net.layers[3].relu and not net.layers[4].relu


def test_default_export_with_dynamic_batch(tmp_path: Path):
    # The exporter folds conv+BN in float32 itself: agreement is to float32 precision.
    model = _net()
    path = _export(
        model, (1, 7, 7), tmp_path / "d.onnx", input_names=["x"], dynamic_axes={"x": {0: "n"}}
    )
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Shape" in ops and "Gather" in ops
    assert _max_error(path, model, (1, 7, 7)) < 1e-5


def test_flatten_avgpool_stride_and_same_padding(tmp_path: Path):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=(0, 1)),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
        nn.ReLU(),
    ).eval()
    path = _export(model, (2, 9, 9), tmp_path / "f.onnx")
    assert _max_error(path, model, (2, 9, 9)) < 1e-9


def _graph(nodes, inits, in_shape=(1, 4), out="y", input_name="x"):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", "k"])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_matmul_add_dropout_identity_same_padding(tmp_path: Path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 1, 3, 3))
    m = rng.standard_normal((2 * 4 * 4, 3))
    b = rng.standard_normal(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c0"], name="conv", auto_pad="SAME_UPPER"),
        helper.make_node("Dropout", ["c0", "ratio"], ["c1"], name="drop"),
        helper.make_node("Identity", ["c1"], ["c"], name="same"),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "m"], ["mm"], name="dense"),
        helper.make_node("Add", ["b", "mm"], ["y"], name="bias"),
    ]
    inits = {"w": w, "m": m, "b": b, "ratio": np.array(0.5)}
    net = from_onnx(_save(_graph(nodes, inits, (1, 1, 4, 4)), tmp_path / "mm.onnx"))
    assert [layer.name for layer in net.layers] == ["conv", "flat", "dense"]
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    w32, m32, b32 = (torch.from_numpy(v.astype(np.float32)).double() for v in (w, m, b))
    want = torch.flatten(F.conv2d(x, w32, padding=1), 1) @ m32 + b32
    assert torch.allclose(net.forward(x)[-1], want, rtol=0, atol=1e-9)


def test_gemm_without_transb_and_row_bias(tmp_path: Path):
    rng = np.random.default_rng(1)
    w, c = rng.standard_normal((4, 3)), rng.standard_normal((1, 3))
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=0.5, beta=2.0)
    net = from_onnx(_save(_graph([node], {"w": w, "c": c}), tmp_path / "g.onnx"))
    x = torch.randn(2, 4, dtype=torch.float64)
    w32, c32 = (torch.from_numpy(v.astype(np.float32)).double() for v in (w, c))
    assert torch.allclose(net.forward(x)[-1], 0.5 * x @ w32 + 2.0 * c32, rtol=0, atol=1e-12)


def test_lstm_refused(tmp_path: Path):
    nodes = [helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="rnn_1", hidden_size=2)]
    inits = {"w": np.zeros((1, 8, 4)), "r": np.zeros((1, 8, 2))}
    path = _save(_graph(nodes, inits, (3, 1, 4)), tmp_path / "lstm.onnx")
    with pytest.raises(HwgenError) as e:
        from_onnx(path)
    assert str(e.value) == "unsupported op LSTM at node 'rnn_1'"


def test_unsupported_op_checked_before_conversion(tmp_path: Path):
    # The Sigmoid comes after a Gemm whose weight is wrong: the op check must win.
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
        helper.make_node("Sigmoid", ["h"], ["y"], name="act"),
    ]
    path = _save(_graph(nodes, {"w": np.zeros((3, 5))}), tmp_path / "s.onnx")
    with pytest.raises(HwgenError, match=r"^unsupported op Sigmoid at node 'act'$"):
        from_onnx(path)


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage\xff" * 10, b"not onnx at all"])
def test_corrupt_file(tmp_path: Path, content: bytes):
    (tmp_path / "bad.onnx").write_bytes(content)
    with pytest.raises(HwgenError) as e:
        from_onnx(tmp_path / "bad.onnx")
    assert str(e.value).startswith(f"model {tmp_path / 'bad.onnx'}: not a") and "\n" not in str(
        e.value
    )


def test_missing_file(tmp_path: Path):
    with pytest.raises(HwgenError, match="no such file"):
        from_onnx(tmp_path / "none.onnx")


def test_dynamic_input_shape_refused(tmp_path: Path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    path = _save(_graph(nodes, {}, ("n", "c", 4, 4)), tmp_path / "dyn.onnx")
    with pytest.raises(HwgenError, match="dynamic or unknown shape") as e:
        from_onnx(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("node", "inits", "shape", "message"),
    [
        (
            helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=2),
            {"w": np.zeros((2, 1, 1, 1))},
            (1, 2, 3, 3),
            "group=2",
        ),
        (
            helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[0, 0, 1, 1]),
            {"w": np.zeros((1, 1, 1, 1))},
            (1, 1, 3, 3),
            "asymmetric padding",
        ),
        (
            helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 2], ceil_mode=1),
            {},
            (1, 1, 5, 5),
            "ceil_mode=1",
        ),
        (
            helper.make_node(
                "AveragePool", ["x"], ["y"], name="p", kernel_shape=[2, 2], pads=[1, 1, 1, 1]
            ),
            {},
            (1, 1, 4, 4),
            "AveragePool setting pads",
        ),
        (
            helper.make_node("Reshape", ["x", "s"], ["y"], name="r"),
            {"s": np.array([1, 2, 8])},
            (1, 1, 4, 4),
            "only flattening",
        ),
        (
            helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn"),
            {k: np.ones(1) for k in "gbmv"},
            (1, 1, 4, 4),
            "must directly follow",
        ),
    ],
)
def test_bad_settings(tmp_path: Path, node, inits, shape, message):
    if "s" in inits:  # Reshape's target shape is int64
        model = _graph([node], {}, shape)
        model.graph.initializer.append(numpy_helper.from_array(inits["s"].astype(np.int64), "s"))
    else:
        model = _graph([node], inits, shape)
    with pytest.raises(HwgenError, match=message) as e:
        from_onnx(_save(model, tmp_path / "m.onnx"))
    assert "\n" not in str(e.value)


def test_unused_output_refused(tmp_path: Path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r1"),
        helper.make_node("Relu", ["x"], ["y"], name="r2"),
    ]
    with pytest.raises(HwgenError, match=r"^the output of 'r1' is never used$"):
        from_onnx(_save(_graph(nodes, {}), tmp_path / "b.onnx"))


# ------------------------------------------------------------------ load_model


def test_load_model_onnx_and_errors(tmp_path: Path):
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    path = _export(model, (3,), tmp_path / "lin.onnx")
    net, data = load_model(str(path))
    assert data is None and isinstance(net.layers[0], FLinear)
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "model.h5").write_bytes(b"")
    for spec, message in [
        (tmp_path / "w.pt", "needs the Python API"),
        (str(tmp_path / "model.h5"), "unsupported file type '.h5'"),
        ("mnist", "no such file, and not a built-in example (digits, digits-res, resnet20)"),
        (tmp_path / "missing.onnx", "no such file"),
    ]:
        with pytest.raises(HwgenError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            load_model(spec)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ residual networks


def _same_graph(a, b) -> None:
    """Two imports of one model: same layers, names, inputs and flags."""
    assert [(type(x), x.name, x.inputs) for x in a.layers] == [
        (type(y), y.name, y.inputs) for y in b.layers
    ]
    assert [getattr(x, "relu", None) for x in a.layers] == [
        getattr(y, "relu", None) for y in b.layers
    ]


def test_resnet20_option_a(tmp_path: Path):
    # The exporter folds conv + BN in float32 itself: agreement is to float32 precision.
    model = random_resnet20(0)
    path = _export(model, (3, 32, 32), tmp_path / "resnet20.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Slice", "Pad", "Add", "GlobalAveragePool", "ConstantOfShape"} <= ops
    assert _max_error(path, model, (3, 32, 32)) < 1e-5
    net = from_onnx(path)
    _same_graph(net, from_module(model, (3, 32, 32)))
    shortcuts = [layer for layer in net.layers if isinstance(layer, FSubsamplePad)]
    assert [(s.name, s.stride, s.pad) for s in shortcuts] == [
        ("layers_1_0_shortcut", (2, 2), (8, 8)),
        ("layers_2_0_shortcut", (2, 2), (16, 16)),
    ]


def test_unfolded_residual_export(tmp_path: Path):
    # BatchNormalization nodes kept, the pad amounts computed by a constant subgraph.
    model = seeded_init(CifarResNet((1, 1), (4, 8)), 1, (3, 8, 8))
    path = _export(
        model,
        (3, 8, 8),
        tmp_path / "a.onnx",
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"BatchNormalization", "Slice", "Pad", "Transpose", "Concat"} <= ops
    assert _max_error(path, model, (3, 8, 8)) < 1e-9
    net = from_onnx(path)
    _same_graph(net, from_module(model, (3, 8, 8)))
    assert [type(layer) for layer in net.layers][-3:] == [FGlobalAvgPool, FFlatten, FLinear]


def test_option_b_shortcut(tmp_path: Path):
    model = seeded_init(CifarResNet((1, 2), (4, 8), shortcut="B"), 2, (3, 8, 8))
    path = _export(model, (3, 8, 8), tmp_path / "b.onnx", do_constant_folding=False)
    assert _max_error(path, model, (3, 8, 8)) < 1e-9
    net = from_onnx(path)
    _same_graph(net, from_module(model, (3, 8, 8)))
    assert sum(isinstance(layer, FAdd) for layer in net.layers) == 3
    assert not any(isinstance(layer, FSubsamplePad) for layer in net.layers)


class MeanHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        return self.fc(y.mean((2, 3)) + y.mean((-1, -2)))  # a fork and a join


def test_reduce_mean_and_fork(tmp_path: Path):
    model = MeanHead().eval()
    path = _export(model, (2, 4, 4), tmp_path / "m.onnx")
    assert "ReduceMean" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert _max_error(path, model, (2, 4, 4)) < 1e-9
    kinds = [type(layer) for layer in from_onnx(path).layers]
    assert kinds == [FConv2d, FGlobalAvgPool, FFlatten, FGlobalAvgPool, FFlatten, FAdd, FLinear]


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), x], 1)


def test_concat_refused_by_the_cli(tmp_path: Path, capsys):
    path = _export(Cat().eval(), (2, 4, 4), tmp_path / "cat.onnx")
    with pytest.raises(HwgenError, match=r"^unsupported op Concat at node '/Concat'$"):
        from_onnx(path)
    argv = ["quantize", str(path), "--scheme", "pow2", "--bits", "5", "-o", str(tmp_path / "q")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "hwgen: error: unsupported op Concat at node '/Concat'\n"


@pytest.mark.parametrize(
    ("nodes", "inits", "message"),
    [
        (
            [helper.make_node("Sigmoid", ["x"], ["y"], name="sig")],
            {},
            "^unsupported op Sigmoid at node 'sig'$",
        ),
        (
            [helper.make_node("Conv", ["x", "w"], ["y"], name="gc", group=2)],
            {"w": np.zeros((2, 1, 1, 1))},
            "^unsupported Conv setting group=2 dilations=.* at node 'gc'$",
        ),
        (
            [helper.make_node("GlobalAveragePool", ["x"], ["y"], name="gap")],
            {},
            "^global average pool 'gap' over 3x3 = 9 values",
        ),
        (
            [helper.make_node("ReduceMean", ["x"], ["y"], name="rm", axes=[1])],
            {},
            r"^unsupported ReduceMean over axes \[1\] at node 'rm'",
        ),
        (
            [helper.make_node("Pad", ["x", "p"], ["y"], name="pd")],
            {"p": np.array([0, 0, 1, 0, 0, 0, 1, 0])},
            "^unsupported Pad at node 'pd'",
        ),
        (
            [helper.make_node("Pad", ["x", "p", "v"], ["y"], name="pd")],
            {"p": np.array([0, 1, 0, 0, 0, 1, 0, 0]), "v": np.array(1.0)},
            "^unsupported Pad at node 'pd'",
        ),
        (
            [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"], name="sl")],
            {"s": np.array([1]), "e": np.array([9]), "a": np.array([2]), "t": np.array([2])},
            "^unsupported Slice at node 'sl'",
        ),
        (
            [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"], name="sl")],
            {"s": np.array([0]), "e": np.array([1]), "a": np.array([1]), "t": np.array([1])},
            "^unsupported Slice at node 'sl'",
        ),
        (
            [
                helper.make_node("Conv", ["x", "w"], ["c"], name="c"),
                helper.make_node("Add", ["c", "x"], ["y"], name="join"),
            ],
            {"w": np.zeros((2, 2, 3, 3))},
            r"^Add 'join' adds tensors of different shapes \(2, 1, 1\) and \(2, 3, 3\)$",
        ),
    ],
)
def test_residual_refusals(tmp_path: Path, nodes, inits, message):
    model = _graph(nodes, {}, (1, 2, 3, 3))
    for k, v in inits.items():  # integer inputs stay integer
        dtype = np.float32 if v.dtype.kind == "f" else np.int64
        model.graph.initializer.append(numpy_helper.from_array(v.astype(dtype), k))
    with pytest.raises(HwgenError, match=message) as e:
        from_onnx(_save(model, tmp_path / "m.onnx"))
    assert "\n" not in str(e.value)


def test_slice_and_pad_by_hand(tmp_path: Path):
    # Negative start on a dimension of 1, huge ends, one Slice for both axes; Pad then Slice.
    nodes = [
        helper.make_node("Pad", ["x", "p"], ["a"], name="pad"),
        helper.make_node("Slice", ["a", "s", "e", "ax", "t"], ["b"], name="sub"),
        helper.make_node("Relu", ["b"], ["y"], name="r"),
    ]
    model = _graph(nodes, {}, (1, 2, 5, 4))
    ints = {
        "p": [0, 1, 0, 0, 0, 3, 0, 0],
        "s": [0, -5],
        "e": [2**62, 2**62],
        "ax": [-1, 2],
        "t": [3, 2],
    }
    for k, v in ints.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
    net = from_onnx(_save(model, tmp_path / "sp.onnx"))
    assert [type(layer) for layer in net.layers] == [FSubsamplePad, type(net.layers[1])]
    assert net.layers[0].stride == (2, 3) and net.layers[0].pad == (1, 3)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    want = torch.relu(F.pad(x, (0, 0, 0, 0, 1, 3))[:, :, ::2, ::3])
    assert torch.equal(net.forward(x)[-1], want)


def test_a_scalar_added_after_a_one_output_linear_is_one_line():
    """A 0-d constant has no last axis: refused by name, not with an IndexError."""
    from hwgen.frontend.builder import GraphBuilder

    g = GraphBuilder((3,))
    x = g.linear("fc", "input", np.ones((1, 3)), None)
    with pytest.raises(HwgenError, match=r"Add 'b' adds a constant of shape \(\) to a tensor"):
        g.add_bias("b", x, np.array(0.5))
