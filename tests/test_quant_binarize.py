import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_float_net

from hwgen import golden as gm
from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.frontend.graph import FConv2d, FLinear, FloatNet
from hwgen.ir import ActFormat, Fixed, Network, Pow2
from hwgen.quant.binarize import (
    SCHEMES,
    RetrainOptions,
    ScaledCodes,
    _adam_hessian,
    binarize,
    binary_connect,
    lab,
    lat,
    quantize_scales,
    quantizer,
    retrain,
    scaled_mac_layer,
    twn,
)
from hwgen.quant.inq import with_weights
from hwgen.quant.multibit import alternating


def _w(seed: int = 0, shape: tuple[int, ...] = (6, 3, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.3, shape)


def _weighted_error(w: np.ndarray, d: np.ndarray, sc: ScaledCodes) -> float:
    return float(np.sum(d * (w - sc.weights) ** 2))


def test_binary_connect_is_sign_times_mean_magnitude():
    w = _w()
    w[0, 0, 0, 0] = 0.0  # binary has no zero: +1
    sc = binary_connect(w)
    assert sc.codes.dtype == np.int64 and sc.codes.shape == w.shape
    assert np.array_equal(sc.codes, np.where(w < 0, -1, 1))
    for c in range(w.shape[0]):
        assert sc.alpha[c] == np.mean(np.abs(w[c]))
        assert np.array_equal(sc.weights[c], sc.alpha[c] * sc.codes[c])
    layer = binary_connect(w, per_channel=False)
    assert np.array_equal(layer.alpha, np.full(w.shape[0], np.mean(np.abs(w))))


def test_twn_threshold_and_scale_per_channel():
    w = _w(1)
    sc = twn(w)
    for c in range(w.shape[0]):
        a = np.abs(w[c])
        keep = a > 0.7 * np.mean(a)
        assert np.array_equal(sc.codes[c], np.sign(w[c]) * keep)
        assert sc.alpha[c] == pytest.approx(np.mean(a[keep]), rel=1e-15)  # summation order
    assert set(np.unique(sc.codes)) <= {-1, 0, 1}
    layer = twn(w, per_channel=False)
    keep = np.abs(w) > 0.7 * np.mean(np.abs(w))
    assert np.array_equal(layer.codes, np.sign(w) * keep)
    assert np.allclose(layer.alpha, np.mean(np.abs(w)[keep]), rtol=0, atol=1e-15)


def test_an_all_zero_channel_has_scale_zero():
    w = _w(2, (3, 4))
    w[1] = 0.0
    d = np.full(w.shape, 2.0)
    for sc in (twn(w), lat(w, d), binary_connect(w), lab(w, d)):
        assert sc.alpha[1] == 0.0 and np.all(sc.weights[1] == 0.0)


def test_lab_scale_is_the_hessian_weighted_mean_and_bc_for_a_constant_hessian():
    w = _w(3)
    d = np.random.default_rng(4).uniform(0.1, 5.0, w.shape)
    sc = lab(w, d)
    assert np.array_equal(sc.codes, binary_connect(w).codes)
    for c in range(w.shape[0]):
        want = np.sum(d[c] * np.abs(w[c])) / np.sum(d[c])
        assert sc.alpha[c] == pytest.approx(want, rel=1e-14)
        # the proximal Newton step: alpha minimises the D-weighted error for these signs
        errs = [
            _weighted_error(w[c], d[c], ScaledCodes(sc.codes[c : c + 1], np.array([a])))
            for a in (sc.alpha[c] * (1 - 1e-6), sc.alpha[c], sc.alpha[c] * (1 + 1e-6))
        ]
        assert errs[1] < errs[0] and errs[1] < errs[2]
    bc = binary_connect(w)
    assert np.allclose(lab(w, np.full(w.shape, 3.7)).alpha, bc.alpha, rtol=1e-14, atol=0)
    assert np.allclose(lab(w, None).alpha, bc.alpha, rtol=1e-14, atol=0)
    assert not np.allclose(sc.alpha, bc.alpha)  # a non-uniform D moves the scale


def test_lat_alternation_settles_and_beats_twn_under_a_nonuniform_hessian():
    w = _w(5, (16, 72))
    d = np.random.default_rng(6).uniform(0.01, 10.0, w.shape) ** 2
    sc = lat(w, d)
    assert set(np.unique(sc.codes)) <= {-1, 0, 1}
    for c in range(w.shape[0]):  # a fixed point of both half-steps
        keep = sc.codes[c] != 0
        assert np.array_equal(keep, np.abs(w[c]) > sc.alpha[c] / 2)
        alpha = np.sum(d[c] * np.abs(w[c]) * keep) / np.sum(d[c] * keep)
        assert sc.alpha[c] == pytest.approx(alpha, rel=1e-14)
    t = twn(w)
    for c in range(w.shape[0]):
        row = slice(c, c + 1)
        e_lat = _weighted_error(w[row], d[row], ScaledCodes(sc.codes[row], sc.alpha[row]))
        e_twn = _weighted_error(w[row], d[row], ScaledCodes(t.codes[row], t.alpha[row]))
        assert e_lat <= e_twn * (1 + 1e-12)
    assert _weighted_error(w, d, sc) < 0.99 * _weighted_error(w, d, t)  # 2.2% lower here


def test_lat_with_a_constant_hessian_is_no_worse_than_twn():
    w = _w(7, (8, 50))
    ones = np.ones_like(w)
    assert _weighted_error(w, ones, lat(w, None)) <= _weighted_error(w, ones, twn(w))


def test_hessian_and_scheme_checked():
    w = _w()
    with pytest.raises(HwgenError, match=r"Hessian diagonal must be positive and of shape"):
        lab(w, np.ones((2, 2)))
    with pytest.raises(HwgenError, match=r"Hessian diagonal must be positive"):
        lat(w, np.zeros_like(w))
    with pytest.raises(HwgenError, match=r"scheme must be one of bc, twn, lab, lat, not 'xnor'"):
        quantizer("xnor")
    with pytest.raises(HwgenError, match="learning rate must be positive, not 0"):
        RetrainOptions(lr=0)
    with pytest.raises(HwgenError, match="epochs must be >= 0, not -1"):
        RetrainOptions(epochs=-1)


def test_quantize_scales_fills_the_bits():
    alpha = np.array([0.013, 0.25, 0.031, 0.0])
    for bits in (4, 8, 16):
        m, fmt = quantize_scales(alpha, bits)
        assert fmt.bits == bits and m.dtype == np.int64
        assert (1 << (bits - 2)) <= m.max() <= (1 << (bits - 1)) - 1  # the top bit is used
        assert np.all(np.abs(m * 2.0**-fmt.frac - alpha) <= 2.0 ** -(fmt.frac + 1))
    m, fmt = quantize_scales(np.array([0.5, 0.125]), 8)
    assert fmt == Fixed(8, 7) and m.tolist() == [64, 16]


def test_adam_hessian_is_the_root_of_the_bias_corrected_second_moment():
    p = torch.nn.Parameter(torch.tensor([0.5, -0.25], dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=1e-3)
    assert _adam_hessian(opt, p) is None  # before the first step: D constant
    g1, g2 = torch.tensor([0.3, -2.0]), torch.tensor([-0.1, 1.0])
    for g in (g1, g2):
        p.grad = g.double()
        opt.step()
    v = 0.001 * 0.999 * g1.double() ** 2 + 0.001 * g2.double() ** 2
    want = torch.sqrt(v / (1 - 0.999**2)) + 1e-8
    assert np.allclose(_adam_hessian(opt, p), want.numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_retraining_is_seeded_and_ends_exactly_on_codes_times_scales(scheme):
    rng = np.random.default_rng(1)
    fnet = tiny_float_net(rng)
    x = rng.uniform(0, 1, (48, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 48)
    opts = RetrainOptions(epochs=2, batch_size=16, lr=1e-2)
    a, codes = binarize(fnet, scheme, (x, y), opts, progress=False)
    b, again = binarize(fnet, scheme, (x, y), opts, progress=False)
    alphabet = {-1, 1} if scheme in ("bc", "lab") else {-1, 0, 1}
    for i, name in ((0, "c"), (3, "fc")):
        sc = codes[name]
        assert set(np.unique(sc.codes)) <= alphabet
        assert sc.alpha.shape == (fnet.layers[i].weight.shape[0],)
        assert np.array_equal(a.layers[i].weight, sc.weights)
        assert np.array_equal(a.layers[i].weight, b.layers[i].weight)
        assert np.array_equal(sc.alpha, again[name].alpha)
        assert not np.array_equal(a.layers[i].bias, fnet.layers[i].bias)  # biases retrained


def test_retrain_names_an_unknown_layer():
    rng = np.random.default_rng(0)
    fnet = tiny_float_net(rng)
    x, y = rng.uniform(0, 1, (4, 1, 6, 6)), np.zeros(4, np.int64)
    with pytest.raises(HwgenError, match="no conv/linear layer named 'p' to quantise"):
        retrain(fnet, {"p": quantizer("bc")}, (x, y), progress=False)


def _accuracy(fnet: FloatNet, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        out = fnet.forward(torch.as_tensor(np.asarray(x, np.float64)))[-1]
    return float(np.mean(out.argmax(1).numpy() == y))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_retraining_on_digits_beats_the_quantised_pretrained_model(scheme):
    fnet, ds = digits_float_net()
    train = (ds.x_train, ds.y_train)
    before, _ = binarize(fnet, scheme, train, RetrainOptions(epochs=0), progress=False)
    after, _ = binarize(fnet, scheme, train, RetrainOptions(epochs=4), progress=False)
    acc0 = _accuracy(before, ds.x_test, ds.y_test)
    acc1 = _accuracy(after, ds.x_test, ds.y_test)
    assert acc1 > acc0 + 0.03, (acc0, acc1)


def test_lab_retraining_uses_adams_hessian():
    # with D ignored LAB would take BC's steps exactly (same seed, same signs, same scales)
    rng = np.random.default_rng(2)
    fnet = tiny_float_net(rng)
    x = rng.uniform(0, 1, (32, 1, 6, 6))
    y = rng.integers(0, 4, 32)
    opts = RetrainOptions(epochs=1, batch_size=16)
    _, bc = binarize(fnet, "bc", (x, y), opts, progress=False)
    _, lb = binarize(fnet, "lab", (x, y), opts, progress=False)
    assert not np.allclose(bc["fc"].alpha, lb["fc"].alpha, rtol=1e-6, atol=0)


def _check_scaled_layer(fl, sc, x_int, in_fmt, out_fmt, ref, bits=8):
    """The layer's integer output is the float layer α·codes + b within its roundings:
    the scale's on ``Σ a·code``, half a bias step, half an output step."""
    layer = scaled_mac_layer(fl, sc, in_fmt, out_fmt, bits)
    net = Network(x_int.shape[1:], in_fmt, (layer,))
    y = gm.forward(net, x_int)[-1] * 2.0**-out_fmt.frac
    a = torch.as_tensor(x_int * 2.0**-in_fmt.frac)
    per_channel = (-1, *(1,) * (y.ndim - 2))
    s_codes = ref(a, torch.as_tensor(sc.codes, dtype=torch.float64)).numpy()
    want = ref(a, torch.as_tensor(sc.weights)).numpy() + fl.bias.reshape(per_channel)
    fm, f = layer.scale_format.frac, in_fmt.frac + layer.scale_format.frac
    scale_err = np.abs(layer.scale * 2.0**-fm - sc.alpha)
    assert np.all((scale_err <= 2.0 ** -(fm + 1)) | (layer.scale == 1))  # 1: kept a bias
    bound = (
        np.abs(s_codes) * scale_err.reshape(per_channel)
        + np.abs(layer.scale.reshape(per_channel)) * 2.0 ** -(f + 1)
        + 2.0 ** -(out_fmt.frac + 1)
    )
    assert np.all(np.abs(y - want) <= bound * (1 + 1e-9))
    return layer


def test_ternary_linear_layer_with_scales_matches_the_float_layer():
    rng = np.random.default_rng(8)
    w = rng.normal(0, 0.3, (6, 20))
    fl = FLinear("fc", w, rng.normal(0, 0.5, 6))
    x = rng.integers(-128, 128, (50, 20))
    layer = _check_scaled_layer(
        fl, twn(w), x, ActFormat(8, 5), ActFormat(16, 8), lambda a, w: F.linear(a, w)
    )
    assert layer.weight_format == Pow2(2, 0) and layer.scale_format.bits == 8
    assert np.array_equal(layer.weight, twn(w).codes)


def test_binary_conv_layer_with_scales_matches_the_float_layer():
    rng = np.random.default_rng(9)
    w = rng.normal(0, 0.3, (4, 3, 3, 3))
    fl = FConv2d("c", w, rng.normal(0, 0.5, 4), stride=(2, 1), padding=(1, 1), relu=False)
    x = rng.integers(0, 256, (3, 3, 7, 6))
    conv = lambda a, w: F.conv2d(a, w, stride=(2, 1), padding=(1, 1))  # noqa: E731
    for bits in (4, 8, 12):
        sc = binary_connect(w)
        layer = _check_scaled_layer(fl, sc, x, ActFormat(8, 8, False), ActFormat(16, 8), conv, bits)
        assert layer.weight_format == Pow2(1, 0) and layer.scale_format.bits == bits


def test_a_scale_rounding_to_zero_keeps_the_bias():
    w = np.array([[0.5, -0.5, 0.5], [1e-5, 1e-5, -1e-5], [1e-5, -1e-5, 1e-5]])
    fl = FLinear("fc", w, np.array([0.25, -0.75, 0.0]))
    x = np.array([[10, -3, 7], [0, 0, 0]])
    layer = _check_scaled_layer(
        fl, binary_connect(w), x, ActFormat(8, 2), ActFormat(16, 8), lambda a, w: F.linear(a, w)
    )
    assert layer.scale.tolist() == [64, 1, 0]  # a zero scale without a bias stays zero
    assert gm.forward(Network((3,), ActFormat(8, 2), (layer,)), x)[-1][1, 1] == -0.75 * 2**8


def test_planes_have_no_ir_layer_yet():
    w = _w(0, (2, 5))
    with pytest.raises(HwgenError, match="layer fc: 2 binary planes have no IR weight format"):
        scaled_mac_layer(
            FLinear("fc", w, np.zeros(2)), alternating(w, 2), ActFormat(8, 0), ActFormat(8, 0)
        )


# ---------------------------------------------------------------- pruned weights (#12)


@pytest.mark.parametrize("scheme", ["twn", "lat"])
def test_a_kept_mask_codes_pruned_weights_zero_and_leaves_them_out_of_the_statistics(scheme):
    w = _w(3, (4, 2, 3, 3))
    kept = np.random.default_rng(4).uniform(size=w.shape) < 0.4
    d = np.random.default_rng(5).uniform(0.5, 2.0, w.shape)
    q = quantizer(scheme, kept=kept)
    sc = q(w, d)
    assert not np.any(sc.codes[~kept])
    for c in range(w.shape[0]):  # each channel as its kept weights alone
        k = kept[c]
        ref = quantizer(scheme, per_channel=False)(w[c][k][None], d[c][k][None])
        assert np.array_equal(sc.codes[c][k], ref.codes[0])
        assert sc.alpha[c] == pytest.approx(ref.alpha[0], rel=1e-15)  # summation order
    again = q(np.where(kept, w, 10.0), d)  # a pruned weight's value does not matter
    assert np.array_equal(again.codes, sc.codes) and np.array_equal(again.alpha, sc.alpha)
    with pytest.raises(HwgenError, match=r"^the kept mask must be of the weights' shape"):
        q(w[:2], d[:2])


@pytest.mark.parametrize("scheme", ["bc", "lab"])
def test_binary_codes_refuse_a_kept_mask(scheme):
    with pytest.raises(HwgenError, match=f"^scheme {scheme} has binary codes ±1: no zero code"):
        quantizer(scheme, kept=np.ones((2, 3), bool))


def _pruned_problem() -> tuple[FloatNet, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """tiny_float_net with half its weights pruned (0.0, as prune leaves them), its masks and
    training data."""
    rng = np.random.default_rng(1)
    fnet = tiny_float_net(rng)
    macs = [fl for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    masks = {fl.name: rng.uniform(size=fl.weight.shape) < 0.5 for fl in macs}
    fnet = with_weights(fnet, {fl.name: (fl.weight * masks[fl.name], fl.bias) for fl in macs})
    x = rng.uniform(0, 1, (48, 1, 6, 6))
    return fnet, masks, (x, rng.integers(0, 4, 48))


@pytest.mark.parametrize("scheme", ["twn", "lat"])
def test_masked_retraining_holds_the_pruned_weights_at_zero(scheme):
    fnet, masks, train = _pruned_problem()
    opts = RetrainOptions(epochs=2, batch_size=16, lr=1e-2)
    q, codes = binarize(fnet, scheme, train, opts, progress=False, masks=masks)
    for i, name in ((0, "c"), (3, "fc")):
        assert not np.any(codes[name].codes[~masks[name]])
        assert not np.any(q.layers[i].weight[~masks[name]])
        assert np.any(q.layers[i].weight[masks[name]])
    inner = quantizer(scheme, kept=masks["fc"])
    for given, leaks in ((masks, False), (None, True)):  # the latent weights: held, or moved
        seen: list[np.ndarray] = []

        def spy(w: np.ndarray, d: np.ndarray | None, seen: list = seen) -> ScaledCodes:
            seen.append(w.copy())
            return inner(w, d)

        retrain(fnet, {"fc": spy}, train, opts, masks=given, progress=False)
        assert len(seen) > 6 and any(np.any(w[~masks["fc"]]) for w in seen) == leaks
    with pytest.raises(HwgenError, match=r"^scheme bc has binary codes ±1: no zero code"):
        binarize(fnet, "bc", train, opts, progress=False, masks=masks)
