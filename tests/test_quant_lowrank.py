import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hwgen import golden as gm
from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.frontend.graph import FAdd, FConv2d, FFlatten, FLinear, FloatNet
from hwgen.ir import Conv2d
from hwgen.quant.lowrank import (
    choose_rank,
    conv_matrix,
    decompose,
    lowrank,
    mac_count,
    split_conv,
    split_linear,
)
from hwgen.quant.precision import Precision
from hwgen.quant.quantize import quantize


def _rank_r_conv(r: int, shape: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """A conv kernel whose (Cin*KH, KW*Cout) matrix has rank ``r``."""
    cout, cin, kh, kw = shape
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(cin * kh, r)) @ rng.normal(size=(r, kw * cout))
    return m.reshape(cin, kh, kw, cout).transpose(3, 0, 1, 2)


def test_conv_matrix_layout():
    w = np.random.default_rng(0).normal(size=(5, 3, 2, 4))
    m = conv_matrix(w)
    assert m.shape == (3 * 2, 4 * 5)
    for o, c, y, x in [(0, 0, 0, 0), (4, 2, 1, 3), (1, 2, 0, 1)]:
        assert m[c * 2 + y, x * 5 + o] == w[o, c, y, x]


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 2, 3, 5), (6, 4, 1, 1)])
def test_conv_split_is_exact_at_full_rank(shape):
    w = np.random.default_rng(1).normal(size=shape)
    v, h = split_conv(w, rank=10**6)
    r = min(shape[1] * shape[2], shape[3] * shape[0])
    assert v.shape == (r, shape[1], shape[2], 1) and h.shape == (shape[0], r, 1, shape[3])
    rebuilt = np.einsum("orx,rcy->ocyx", h[:, :, 0, :], v[..., 0])
    assert np.allclose(rebuilt, w, rtol=0, atol=1e-12)


def test_linear_split_is_exact_at_full_rank():
    w = np.random.default_rng(2).normal(size=(7, 12))
    a, b = split_linear(w, energy=1.0)
    assert a.shape == (7, 12) and b.shape == (7, 7)
    assert np.allclose(b @ a, w, rtol=0, atol=1e-12)


def test_rank_by_energy_keeps_the_fraction_of_squared_singular_values():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert choose_rank(s, None, 9 / 14) == 1
    assert choose_rank(s, None, 0.65) == 2
    assert choose_rank(s, None, 13 / 14) == 2
    assert choose_rank(s, None, 1.0) == 3
    assert choose_rank(s, 2, None) == 2
    assert choose_rank(s, 5, None) == 3
    # a rank-3 conv at energy 1.0 gets rank 3, not its numerically zero rest
    v, _ = split_conv(_rank_r_conv(3, (6, 4, 3, 3)), energy=1.0)
    assert v.shape[0] == 3


@pytest.mark.parametrize(
    "stride,padding", [((1, 1), (1, 1)), ((2, 1), (0, 2)), ((1, 3), (2, 0)), ((2, 2), (1, 1))]
)
def test_split_conv_pair_equals_the_conv_with_padding_and_stride(stride, padding):
    shape = (6, 4, 3, 3)
    w = _rank_r_conv(2, shape)
    b = np.random.default_rng(3).normal(size=6)
    fnet = FloatNet((4, 9, 8), (FConv2d("c", w, b, stride, padding, relu=True),))
    split = decompose(fnet, rank=2)
    v, h = split.layers
    assert (v.name, h.name) == ("c_v", "c_h") and h.inputs == ("c_v",)
    assert (v.stride, v.padding) == ((stride[0], 1), (padding[0], 0))
    assert (h.stride, h.padding) == ((1, stride[1]), (0, padding[1]))
    assert not v.relu and h.relu and np.all(v.bias == 0) and np.array_equal(h.bias, b)
    x = torch.as_tensor(np.random.default_rng(4).normal(size=(3, 4, 9, 8)))
    want = torch.relu(F.conv2d(x, torch.as_tensor(w), torch.as_tensor(b), stride, padding))
    got = split.forward(x)[-1]
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-10)


def test_later_layers_read_the_second_layer_and_unsaving_splits_are_skipped():
    rng = np.random.default_rng(5)
    fnet = FloatNet(
        (1, 4, 4),
        (
            FConv2d("first", rng.normal(size=(4, 1, 3, 3)), np.zeros(4), padding=(1, 1)),
            FConv2d("c", _rank_r_conv(1, (4, 4, 3, 3)), np.zeros(4), padding=(1, 1)),
            FAdd("add", ("first", "c")),
            FFlatten("flat"),
            FLinear("fc", rng.normal(size=(3, 64)), np.zeros(3)),
        ),
    )
    split = decompose(fnet, rank=1)
    names = [fl.name for fl in split.layers]
    assert names == ["first_v", "first_h", "c_v", "c_h", "add", "flat", "fc_a", "fc_b"]
    byname = {fl.name: fl for fl in split.layers}
    assert byname["add"].inputs == ("first_h", "c_h")
    assert byname["c_v"].inputs == ("first_h",)
    # rank 3 of a 1-channel 3x3 conv (9 weights per output) saves nothing: kept whole
    assert next(fl.name for fl in decompose(fnet, rank=3).layers) == "first"
    assert [fl.name for fl in decompose(fnet, rank=1, layers=("fc",)).layers][-2:] == [
        "fc_a",
        "fc_b",
    ]


def test_mac_count_is_output_size_times_fan_in():
    fnet, _ = digits_float_net()
    assert mac_count(fnet) == {"conv1": 64 * 8 * 9, "conv2": 16 * 16 * 72, "fc": 10 * 256}
    split = decompose(fnet, rank=4, layers=("conv2",))
    got = mac_count(split)
    assert got["conv2_v"] == 16 * 4 * 24 and got["conv2_h"] == 16 * 16 * 12


def test_bad_arguments_are_one_line_errors():
    fnet, _data = digits_float_net()
    with pytest.raises(HwgenError, match="either a rank or an energy"):
        decompose(fnet)
    with pytest.raises(HwgenError, match="either a rank or an energy"):
        decompose(fnet, rank=2, energy=0.9)
    with pytest.raises(HwgenError, match="rank must be a positive integer, not 0"):
        decompose(fnet, rank=0)
    with pytest.raises(HwgenError, match=r"energy must be in \(0, 1\], not 1.5"):
        decompose(fnet, energy=1.5)
    with pytest.raises(HwgenError, match="no conv/linear layer named 'pool1'"):
        decompose(fnet, rank=2, layers=("pool1",))


def test_digits_lowrank_retrains_and_quantizes_with_non_square_kernels():
    fnet, data = digits_float_net()
    got = lowrank(fnet, (data.x_train, data.y_train), rank=4, layers=("conv2",), progress=False)
    x = torch.as_tensor(data.x_test, dtype=torch.float64)
    split = decompose(fnet, rank=4, layers=("conv2",))
    acc = np.mean(got.forward(x)[-1].argmax(1).numpy() == data.y_test)
    before = np.mean(split.forward(x)[-1].argmax(1).numpy() == data.y_test)
    assert acc >= 0.96 and acc > before
    net = quantize(got, Precision("fixed"), data.x_train[:200], progress=False).net
    kernels = {la.name: la.kernel for la in net.layers if isinstance(la, Conv2d)}
    assert kernels == {"conv1": (3, 3), "conv2_v": (3, 1), "conv2_h": (1, 3)}
    xq = gm.quantize_input(data.x_test, net.input_format)
    qacc = np.mean(gm.predict(net, xq) == data.y_test)
    assert qacc >= acc - 0.02
