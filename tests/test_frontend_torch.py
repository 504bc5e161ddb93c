"""PyTorch importer: the float graph computes what the module computes; clear errors."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwgen.errors import HwgenError
from hwgen.examples.resnet import CifarResNet, random_resnet20, seeded_init
from hwgen.frontend.builder import fold_batchnorm, identifier
from hwgen.frontend.graph import (
    FAdd,
    FConv2d,
    FFlatten,
    FGlobalAvgPool,
    FLinear,
    FMaxPool2d,
    FReLU,
    FSubsamplePad,
)
from hwgen.frontend.torch_import import from_module, load_state_dict_file


def _randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial running statistics, so folding is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def _check_equivalent(model: nn.Module, shape: tuple[int, ...]):
    """Import, then compare with the module in float64 on random input; return the graph."""
    torch.manual_seed(0)
    _randomize_bn(model)
    model.eval()
    net = from_module(model, shape)
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(x)
        got = net.forward(x)[-1]
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got - want).abs().max()
    return net


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=(1, 0))
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 2 * 3, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.max_pool2d(x, 2)
        x = self.drop(x)
        x = x.view(x.size(0), -1)
        return torch.relu(self.fc(x))


class FlattenFn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding="same")
        self.lin1 = nn.Linear(5 * 3 * 3, 7)
        self.bn1 = nn.BatchNorm1d(7)
        self.lin2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.conv(x).relu(), kernel_size=2, stride=2)
        x = torch.flatten(x, 1)
        x = F.relu(self.bn1(self.lin1(x)))
        x = x.reshape(x.shape[0], -1)  # already flat: a no-op
        return self.lin2(x)


def test_sequential_with_bn_and_nesting():
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(inplace=True), nn.Identity()),
            ),
            flatten=nn.Flatten(),
            classifier=nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * 2 * 2, 10)),
        )
    )
    net = _check_equivalent(model, (1, 8, 8))
    kinds = [type(layer) for layer in net.layers]
    assert kinds == [FConv2d, FMaxPool2d, FConv2d, FFlatten, FLinear]
    names = [layer.name for layer in net.layers]
    assert names == ["features_0", "features_3", "features_4_0", "flatten", "classifier_1"]
    assert net.layers[0].relu and net.layers[2].relu and not net.layers[4].relu
    assert net.input_shape == (1, 8, 8)


def test_functional_ops():
    net = _check_equivalent(Functional(), (3, 9, 13))
    assert [type(layer) for layer in net.layers] == [FConv2d, FMaxPool2d, FFlatten, FLinear]
    assert net.layers[0].relu and net.layers[3].relu
    assert net.layers[0].stride == (2, 2) and net.layers[0].padding == (1, 0)


def test_flatten_function_bn1d_and_noop_reshape():
    net = _check_equivalent(FlattenFn(), (2, 6, 7))
    assert [type(layer) for layer in net.layers][-3:] == [FFlatten, FLinear, FLinear]
    assert net.layers[0].padding == (1, 1) and net.layers[-2].relu


def test_standalone_relu_and_flat_input():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    net = _check_equivalent(model, (5,))
    assert [type(layer) for layer in net.layers] == [FLinear, FReLU, FLinear]


def test_float64_module():
    net = from_module(nn.Sequential(nn.Linear(3, 2)).double(), (3,))
    assert net.layers[0].weight.shape == (2, 3)


def test_bare_layer_module():
    net = _check_equivalent(nn.Conv2d(2, 3, 1), (2, 4, 4))
    assert net.layers[0].name == "layer_0"


def test_flatten_permutes_linear_to_hwc():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 2 * 3, 1))
    net = _check_equivalent(model, (1, 2, 3))
    w = model[2].weight.detach().numpy().reshape(2, 2, 3)  # C, H, W
    assert np.array_equal(net.layers[2].weight.reshape(2, 3, 2), w.transpose(1, 2, 0))


def test_fold_batchnorm_formula():
    w, b = np.array([[1.0, 2.0], [3.0, -4.0]]), np.array([0.5, -1.0])
    fw, fb = fold_batchnorm(
        w,
        b,
        np.array([2.0, 1.0]),
        np.array([1.0, 0.0]),
        np.array([0.5, 1.0]),
        np.array([3.0, 0.0]),
        1.0,
    )
    assert np.array_equal(fw, [[1.0, 2.0], [3.0, -4.0]])
    assert np.array_equal(fb, [1.0, -2.0])


def test_importing_keeps_training_mode():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    from_module(model, (1, 5, 5))
    assert model.training and model[1].training


def test_identifier():
    assert identifier("features.0") == "features_0"
    assert identifier("0") == "layer_0"
    assert identifier("/a/b.c/") == "a_b_c"


class _Wrap(nn.Module):
    def __init__(self, fn, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.conv = conv if conv is not None else nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return F.relu(y) if x.sum() > 0 else y


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        (Recurrent(), (3, 4), "unsupported op LSTM at layer 'rnn'"),
        (Sigmoid(), (4,), "unsupported op torch.sigmoid at node 'sigmoid'"),
        (
            nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh()),
            (1, 4, 4),
            "unsupported op Tanh at layer '1'",
        ),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), (2, 4, 4), "groups=2 at layer '0'"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2)), (1, 8, 8), "dilation=(2, 2)"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, padding_mode="reflect")), (1, 4, 4), "padding_mode"),
        (nn.Sequential(nn.Conv2d(1, 1, 2, padding="same")), (1, 4, 4), "asymmetric"),
        (nn.Sequential(nn.MaxPool2d(2, padding=1)), (1, 4, 4), "MaxPool2d setting padding=1"),
        (nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), (1, 5, 5), "ceil_mode=True"),
        (nn.Sequential(nn.MaxPool2d(3, dilation=2)), (1, 8, 8), "dilation=2"),
        (nn.Sequential(nn.AvgPool2d(2, divisor_override=3)), (1, 4, 4), "divisor_override=3"),
        (nn.Sequential(nn.AvgPool2d(2, padding=1)), (1, 4, 4), "AvgPool2d setting padding=1"),
        (nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False)), (1, 4, 4), "no running"),
        (Branchy(), (4,), "cannot trace Branchy with torch.fx"),
        (
            _Wrap(lambda m, x: F.avg_pool2d(x, x.size(0))),
            (2, 4, 4),
            "unsupported AvgPool2d at node 'avg_pool2d': window computed at run time",
        ),
        (
            _Wrap(lambda m, x: F.max_pool2d(x, x.shape[2] // 2)),
            (2, 4, 4),
            "unsupported op operator.floordiv at node 'floordiv'",
        ),
    ],
)
def test_unsupported(model: nn.Module, shape: tuple[int, ...], message: str):
    with pytest.raises(HwgenError) as e:
        from_module(model, shape)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(1)), (1, 4, 4), "must directly follow"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2)), (1, 4, 4), "fused ReLU"),
        (nn.Sequential(nn.Conv2d(1, 2, 3)), (3, 4, 4), "does not fit the model"),
        (nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten()), (1, 2, 2), "ends with a Flatten"),
        (nn.Sequential(nn.Unflatten(1, (2, 2))), (4,), "unsupported op Unflatten"),
        (nn.Sequential(nn.Linear(4, 4)), (1, 2, 2), "does not fit the model"),
    ],
)
def test_bad_structure(model: nn.Module, shape: tuple[int, ...], message: str):
    with pytest.raises(HwgenError) as e:
        from_module(model, shape)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_view_that_is_not_a_flatten():
    class Regroup(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.size(0), 2, -1)

    with pytest.raises(HwgenError, match=r"unsupported reshape at node 'view'"):
        from_module(Regroup(), (4, 2, 2))


def test_unused_output_refused():
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            F.relu(x)  # a second, dead use of the input
            return self.fc(x)

    with pytest.raises(HwgenError, match=r"^the output of 'relu' is never used$"):
        from_module(Fork(), (2,))


def test_two_outputs_refused():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), x

    with pytest.raises(HwgenError, match="must return one tensor"):
        from_module(Two(), (2,))


# ------------------------------------------------------------------ state dict files


def test_state_dict_roundtrip(tmp_path: Path):
    src = nn.Sequential(nn.Linear(3, 2))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = load_state_dict_file(tmp_path / "w.pt", nn.Sequential(nn.Linear(3, 2)))
    assert torch.equal(dst[0].weight, src[0].weight)


class Pickled(nn.Module):  # module level, so torch.save can pickle it by reference
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)


def test_pickled_full_model_refused(tmp_path: Path):
    torch.save(Pickled(), tmp_path / "full.pt")
    with pytest.raises(HwgenError) as e:
        load_state_dict_file(tmp_path / "full.pt", Pickled())
    msg = str(e.value)
    assert "pickled full model" in msg and "model.state_dict()" in msg
    assert "torch.onnx.export(..., dynamo=False)" in msg and "\n" not in msg


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04garbage"])
def test_corrupt_state_dict(tmp_path: Path, content: bytes):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(HwgenError, match="not a readable PyTorch state dict") as e:
        load_state_dict_file(tmp_path / "bad.pt", nn.Linear(3, 2))
    assert "\n" not in str(e.value)


def test_state_dict_mismatch_and_missing(tmp_path: Path):
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(HwgenError, match="'weight' has shape"):
        load_state_dict_file(tmp_path / "w.pt", nn.Linear(4, 2))
    with pytest.raises(HwgenError, match="do not match Sequential"):
        load_state_dict_file(tmp_path / "w.pt", nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(HwgenError, match="no such file"):
        load_state_dict_file(tmp_path / "nope.pt", nn.Linear(3, 2))


# ------------------------------------------------------------------ residual networks


class LambdaLayer(nn.Module):
    """The option-A shortcut as the widely used PyTorch CIFAR ResNets write it."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class LambdaBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1:
            self.shortcut = LambdaLayer(
                lambda x: F.pad(
                    x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class LambdaResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(LambdaBlock(4, 4, 1))
        self.layer2 = nn.Sequential(LambdaBlock(4, 8, 2))
        self.linear = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.avg_pool2d(out, out.size()[3])  # the whole map: a global pool
        return self.linear(out.view(out.size(0), -1))


def _kinds(net) -> list[type]:
    return [type(layer) for layer in net.layers]


def test_resnet20_option_a():
    model = random_resnet20(0)  # seeded, BatchNorm statistics non-trivial
    net = _check_equivalent(model, (3, 32, 32))
    kinds = _kinds(net)
    assert kinds.count(FConv2d) == 19 and kinds.count(FAdd) == 9 and kinds.count(FLinear) == 1
    assert kinds[-3:] == [FGlobalAvgPool, FFlatten, FLinear]
    assert FReLU not in kinds and all(layer.relu for layer in net.layers if type(layer) is FAdd)
    shortcuts = [layer for layer in net.layers if isinstance(layer, FSubsamplePad)]
    assert [(s.name, s.stride, s.pad) for s in shortcuts] == [
        ("layers_1_0_shortcut", (2, 2), (8, 8)),
        ("layers_2_0_shortcut", (2, 2), (16, 16)),
    ]
    names = [layer.name for layer in net.layers]
    i = names.index("layers_1_0_conv1")  # the first stride-2 block
    block = net.layers[i : i + 3]
    assert names[i : i + 4] == [
        "layers_1_0_conv1",
        "layers_1_0_conv2",
        "layers_1_0_shortcut",
        "layers_1_0",
    ]
    add = net.layers[i + 3]
    assert add.name == "layers_1_0" and add.inputs == ("layers_1_0_conv2", "layers_1_0_shortcut")
    assert block[0].relu and not block[1].relu and block[2].inputs == ("layers_0_2",)


def test_lambda_option_a_and_pool_over_the_whole_map():
    net = _check_equivalent(LambdaResNet(), (3, 8, 8))
    assert _kinds(net) == [
        FConv2d, FConv2d, FConv2d, FAdd, FConv2d, FConv2d, FSubsamplePad, FAdd,
        FGlobalAvgPool, FFlatten, FLinear,
    ]  # fmt: skip
    shortcut = net.layers[6]
    assert shortcut.name == "layer2_0_shortcut" and shortcut.stride == (2, 2)
    assert shortcut.pad == (2, 2) and shortcut.inputs == ("layer1_0",)
    assert net.layers[3].inputs == ("layer1_0_conv2", "conv1")


def test_option_b_shortcut_folds_its_batchnorm():
    model = seeded_init(CifarResNet((1, 2), (4, 8), shortcut="B"), 3, (3, 8, 8))
    net = _check_equivalent(model, (3, 8, 8))
    kinds = _kinds(net)
    assert FSubsamplePad not in kinds and kinds.count(FAdd) == 3 and kinds.count(FConv2d) == 8
    proj = next(layer for layer in net.layers if layer.name == "layers_1_0_shortcut_0")
    assert proj.weight.shape == (8, 4, 1, 1) and proj.stride == (2, 2) and not proj.relu
    assert net.layers[[layer.name for layer in net.layers].index("layers_1_0")].inputs == (
        "layers_1_0_conv2",
        "layers_1_0_shortcut_0",
    )


class ResidualSpellings(nn.Module):
    """Other spellings: torch.add, Tensor.add, a shared add output, mean, ``...`` slices."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 1, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.add(self.a(x), x)  # then: relu, a shared add, pad + slice, mean, squeeze
        s = F.relu(s)  # fused: the add's only user
        t = s.add(x)
        u = torch.relu(t) + t  # t has two users: a standalone ReLU
        short = F.pad(u, (0, 0, 0, 0, 1, 1))[..., ::2, ::2]  # pad, then subsample: merged
        v = self.b(u) + short
        return self.fc(v.mean((2, 3), keepdim=True).squeeze())


def test_functional_residual_spellings():
    net = _check_equivalent(ResidualSpellings(), (2, 4, 4))
    assert _kinds(net) == [
        FConv2d, FAdd, FAdd, FReLU, FAdd, FSubsamplePad, FConv2d, FAdd, FGlobalAvgPool,
        FFlatten, FLinear,
    ]  # fmt: skip
    assert [getattr(layer, "relu", None) for layer in net.layers[1:3]] == [True, False]
    assert net.layers[5].stride == (2, 2) and net.layers[5].pad == (1, 1)


@pytest.mark.parametrize(
    ("fn", "shape", "message"),
    [
        (
            lambda m, x: torch.cat([m.conv(x), x], 1),
            (2, 4, 4),
            "^unsupported op torch.cat at node 'cat'$",
        ),
        (
            lambda m, x: torch.sigmoid(m.conv(x)),
            (2, 4, 4),
            "^unsupported op torch.sigmoid at node 'sigmoid'$",
        ),
        (lambda m, x: m.conv(x).sigmoid(), (2, 4, 4), "^unsupported op Tensor.sigmoid at node"),
        (
            lambda m, x: F.adaptive_avg_pool2d(m.conv(x), 1),
            (2, 3, 3),
            r"^global average pool 'adaptive_avg_pool2d' over 3x3 = 9 values: hwgen needs a "
            "power of two",
        ),
        (lambda m, x: m.conv(x).mean(1), (2, 4, 4), r"Tensor.mean over dims \(1,\) at node 'mean'"),
        (lambda m, x: F.pad(m.conv(x), (1, 1)), (2, 4, 4), "unsupported pad at node 'pad'"),
        (
            lambda m, x: F.pad(m.conv(x), (0, 0, 0, 0, 1, 1), value=1.0),
            (2, 4, 4),
            "unsupported pad at node 'pad'",
        ),
        (lambda m, x: m.conv(x)[:, :, 1::2], (2, 4, 4), "unsupported indexing at node 'getitem'"),
        (lambda m, x: m.conv(x)[:, ::2], (2, 4, 4), "unsupported indexing at node 'getitem'"),
        (
            lambda m, x: m.conv(x) + 1.0,
            (2, 4, 4),
            "unsupported op operator.add with a constant operand 1.0 at node 'add'",
        ),
        (
            lambda m, x: torch.add(m.conv(x), x, alpha=2),
            (2, 4, 4),
            "unsupported arguments to torch.add at node 'add'",
        ),
        (
            lambda m, x: m.conv(x).mean((2, 3), keepdim=True) + x,
            (2, 4, 4),
            r"Add 'add' adds tensors of different shapes \(2, 1, 1\) and \(2, 4, 4\)",
        ),
        (
            lambda m, x: (lambda y: m.conv[1](y) + y)(m.conv[0](x)),
            (2, 4, 4),
            r"BatchNorm2d 'conv.1' cannot be folded: the output of 'conv.0' before it is also",
        ),
    ],
)
def test_unsupported_graph_ops(fn, shape, message):
    conv = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)) if "folded" in message else None
    with pytest.raises(HwgenError, match=message) as e:
        from_module(_Wrap(fn, conv).eval(), shape)
    assert "\n" not in str(e.value)


def test_grouped_conv_and_adaptive_pool_settings_refused():
    with pytest.raises(HwgenError, match=r"^unsupported Conv2d setting groups=2 at layer 'conv'$"):
        from_module(_Wrap(lambda m, x: m.conv(x), nn.Conv2d(2, 2, 3, groups=2)), (2, 4, 4))
    with pytest.raises(HwgenError, match="AdaptiveAvgPool2d setting output_size=2 at layer '1'"):
        from_module(nn.Sequential(nn.Conv2d(1, 1, 1), nn.AdaptiveAvgPool2d(2)), (1, 4, 4))
