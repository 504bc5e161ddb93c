import json
import re
import zipfile

import numpy as np
import pytest
from test_quant_tune import residual_problem

from hwgen import golden as gm
from hwgen import hwq
from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.frontend.graph import FConv2d, FFlatten, FLinear, FloatNet
from hwgen.ir import ActFormat, Add, Codebook, Conv2d, Fixed, Linear, Planes, Pow2
from hwgen.quant import QuantResult, quantize
from hwgen.quant import precision as prec
from hwgen.quant.binarize import RetrainOptions
from hwgen.quant.codebook import CodebookOptions
from hwgen.quant.fakequant import accuracy, fake_quant_forward
from hwgen.quant.inq import InqOptions
from hwgen.quant.lowrank import mac_count
from hwgen.quant.precision import AddPrecision, LayerPrecision, Precision
from hwgen.quant.prune import block_sparsity, prune
from hwgen.quant.quantize import DEFAULT_WEIGHT_BITS, with_activations


def _fnet(w1: np.ndarray, w2: np.ndarray) -> FloatNet:
    return FloatNet(
        (1, 4, 4),
        (
            FConv2d("conv", w1, np.array([0.1, -0.2]), padding=(1, 1), relu=True),
            FFlatten("flat"),
            FLinear("fc", w2, np.linspace(-1, 1, 3)),
        ),
    )


@pytest.fixture
def float_net() -> FloatNet:
    rng = np.random.default_rng(0)
    return _fnet(rng.normal(0, 0.5, (2, 1, 3, 3)), rng.normal(0, 0.2, (3, 32)))


@pytest.fixture
def calib() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (64, 1, 4, 4))


@pytest.mark.parametrize(("scheme", "kind", "bits"), [("fixed", Fixed, 8), ("pow2", Pow2, 5)])
def test_defaults_resolution_and_reproducibility(float_net, calib, scheme, kind, bits):
    r = quantize(float_net, Precision(scheme), calib, progress=False)
    assert isinstance(r, QuantResult) and r.detected == {}
    for name in ("conv", "fc"):
        lp = r.precision.layers[name]
        layer = r.net.layer(name)
        assert isinstance(layer.weight_format, kind) and lp.weight_bits == bits
        assert lp.act_bits == 8 and lp.act_frac == layer.out_format.frac
        assert lp.act_signed == (name == "fc")  # the ReLU output is unsigned
        assert (lp.weight_frac is None) == (kind is Pow2) and (lp.emax is None) == (kind is Fixed)
        assert {f for f, _ in r.act_curves[name]} >= {layer.out_format.frac}
        assert np.array_equal(
            r.float_weights[name], float_net.layers[0 if name == "conv" else 2].weight
        )
    assert r.precision.input.act_bits == 8 and "input" in r.act_curves
    again = quantize(float_net, r.precision, calib, progress=False)
    assert again.net == r.net and again.precision == r.precision


def test_pow2_uses_inq_emax(float_net, calib):
    r = quantize(float_net, Precision("pow2", {"conv": LayerPrecision(weight_bits=3)}), calib)
    w = float_net.layers[0].weight
    n1 = int(np.floor(np.log2(4 / 3 * np.abs(w).max())))
    assert r.net.layer("conv").weight_format == Pow2(3, n1)
    assert dict(r.weight_curves["conv"])[n1] >= 0


def test_auto_detects_and_reproduces(calib):
    rng = np.random.default_rng(2)
    w1 = rng.choice([-0.5, -0.25, 0.0, 0.125, 1.0], size=(2, 1, 3, 3))
    w1.flat[:2] = [1.0, -0.125]  # range 2**-3 .. 2**0 and a zero: 4 levels, 4 bits
    w1.flat[2] = 0.0
    w2 = rng.integers(-20, 20, size=(3, 32)) * 2.0**-5
    fnet = _fnet(w1, w2)
    r = quantize(fnet, Precision("auto"), calib)
    assert r.detected == {"conv": "pow2_4.emax0", "fc": "fixed6.f5"}
    assert np.array_equal(r.net.layer("fc").weight, (w2 * 32).astype(int))
    assert quantize(fnet, r.precision, calib).net == r.net
    # a claimed format the weights are not on: layer and index named
    with pytest.raises(HwgenError, match=r"^layer fc: weight\[\d+, \d+\] = .* fixed4\.f5"):
        quantize(fnet, Precision("auto", {"fc": LayerPrecision(weight_bits=4)}), calib)


def test_auto_off_grid_is_an_error(float_net, calib):
    with pytest.raises(HwgenError, match=r"^layer conv: weight\[0, 0, 0, 0\] = .* on no"):
        quantize(float_net, Precision("auto"), calib)


def test_errors(float_net, calib):
    with pytest.raises(HwgenError, match="needs labelled training data"):
        quantize(float_net, Precision("inq"), calib)
    with pytest.raises(HwgenError, match="no conv/linear layer 'fc2'"):
        quantize(float_net, Precision("fixed", {"fc2": LayerPrecision(weight_bits=4)}), calib)
    with pytest.raises(HwgenError, match="scheme ternary has 2-bit weights, not 3"):
        quantize(float_net, Precision("ternary", {"fc": LayerPrecision(weight_bits=3)}), calib)


def test_inq_is_deterministic_and_on_grid(float_net, calib):
    y = np.arange(64) % 3
    opts = InqOptions(epochs=1, batch_size=16)
    a = quantize(float_net, Precision("inq"), calib, (calib, y), progress=False, inq_options=opts)
    b = quantize(float_net, a.precision, calib, (calib, y), progress=False, inq_options=opts)
    assert a.net == b.net
    assert a.net.layer("fc").weight_format.bits == 5
    # float_weights are the retrained, not yet fully quantised ones
    assert not np.array_equal(a.float_weights["fc"], float_net.layers[2].weight)


def test_meta_in_hwq(float_net, calib, tmp_path):
    r = quantize(float_net, Precision("fixed"), calib)
    path = hwq.save(r.net, tmp_path / "m.hwq", meta=r.meta)
    meta = hwq.load_meta(path)
    assert meta["scheme"] == "fixed"
    assert meta["formats"]["fc"] == {
        "weight": str(r.net.layer("fc").weight_format),
        "out": str(r.net.layer("fc").out_format),
    }
    with zipfile.ZipFile(path) as z:
        assert json.loads(z.read("model.json"))["meta"] == meta


@pytest.fixture(scope="module")
def residual():
    fnet, x, _ = residual_problem(n=80)
    return fnet, x


@pytest.mark.parametrize("scheme", ["fixed", "pow2"])
def test_residual_precision_round_trip(residual, scheme):
    fnet, x = residual
    r = quantize(fnet, Precision(scheme), x, progress=False)
    adds = [lyr for lyr in r.net.layers if isinstance(lyr, Add)]
    assert [a.name for a in adds] == ["add1", "add2"]
    for a in adds:
        f = a.out_format
        assert r.precision.layers[a.name] == AddPrecision(f.bits, f.frac, f.signed)
        assert {fr for fr, _ in r.act_curves[a.name]} >= {f.frac}
    assert list(r.precision.layers) == [
        lyr.name for lyr in r.net.layers if isinstance(lyr, (Add, Conv2d, Linear))
    ]
    text = prec.dumps(r.precision)
    back = prec.for_layers(prec.parse(text), _macs(fnet), ["add1", "add2"])
    assert back == r.precision
    assert quantize(fnet, back, x[:5], progress=False).net == r.net  # every format pinned
    # a file read as it is (add tables as plain layer tables) gives the same network
    assert quantize(fnet, prec.parse(text), x[:5], progress=False).net == r.net


def test_add_precision_is_used_and_listed_in_meta(residual, tmp_path):
    fnet, x = residual
    p = Precision("fixed", {"add1": AddPrecision(act_bits=5), "add2": LayerPrecision(act_frac=2)})
    r = quantize(fnet, p, x, progress=False)
    assert r.net.layer("add1").out_format.bits == 5
    assert r.net.layer("add2").out_format == ActFormat(8, 2, False)
    meta = hwq.load_meta(hwq.save(r.net, tmp_path / "m.hwq", meta=r.meta))
    assert meta["formats"]["add1"] == {"out": str(r.net.layer("add1").out_format)}
    assert meta["formats"]["add2"] == {"out": "u8.f2"}
    assert list(meta["formats"]) == ["stem", "b1c1", "b1c2", "add1", "b2c1", "b2c2", "add2", "fc"]


def test_weight_bits_on_an_add_layer_are_refused(residual):
    fnet, x = residual
    p = Precision("pow2", {"add2": LayerPrecision(weight_bits=4)})
    with pytest.raises(HwgenError, match=r"^precision: layer add2 is an add and has no weights"):
        quantize(fnet, p, x, progress=False)


def _macs(fnet: FloatNet) -> list[str]:
    return [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]


# ---------------------------------------------------------------- learned schemes (issue #11)

LEARNED_KINDS = {
    "bc": (1, "scaled"),
    "lab": (1, "scaled"),
    "twn": (2, "scaled"),
    "lat": (2, "scaled"),
    "ttq": (2, "codebook"),
    "dqc": (3, "codebook"),
    "amq": (2, "planes"),
}
SHORT = {
    "retrain_options": RetrainOptions(epochs=1, batch_size=16),
    "codebook_options": CodebookOptions(epochs=1, batch_size=16),
}


def _check_learned_layer(layer: Conv2d | Linear, scheme: str, bits: int) -> None:
    kind = LEARNED_KINDS[scheme][1]
    fmt = layer.weight_format
    if kind == "scaled":  # codes ±1 (or 0) with the channel's alpha as its scale m_c
        assert fmt in ((Pow2(1, 0),) if bits == 1 else (Pow2(1, 0), Pow2(2, 0)))
        assert layer.scale is not None and layer.scale.shape == (layer.weight.shape[0],)
        assert isinstance(layer.scale_format, Fixed) and layer.scale_format.bits == 8
    elif kind == "codebook":
        assert isinstance(fmt, Codebook) and layer.scale is None
        assert np.all(fmt.on_grid(layer.weight))
        if scheme == "dqc":
            assert len(fmt.entries) == 2**bits and 0 in fmt.entries
        else:
            assert len(fmt.entries) <= 3 and 0 in fmt.entries
    else:  # amq: M planes, the channel's scales in the format, the plane sums in the layer
        assert isinstance(fmt, Planes) and fmt.planes == bits and layer.scale is None
        assert fmt.channels == layer.weight.shape[0] and np.all(fmt.on_grid(layer.weight))
        assert max(max(r) for r in fmt.scales) <= 127 and min(min(r) for r in fmt.scales) >= -128


@pytest.mark.parametrize("scheme", list(LEARNED_KINDS))
def test_learned_schemes_resolve_and_reproduce(float_net, calib, scheme, tmp_path):
    y = np.arange(64) % 3
    bits, _ = LEARNED_KINDS[scheme]
    p = Precision(scheme, {"fc": LayerPrecision(weight_bits=bits)})
    r = quantize(float_net, p, calib, (calib, y), progress=False, **SHORT)
    for name in ("conv", "fc"):
        layer = r.net.layer(name)
        want = bits if name == "fc" else DEFAULT_WEIGHT_BITS[scheme]
        _check_learned_layer(layer, scheme, want)
        lp = r.precision.layers[name]
        # the scheme's bits, not the IR format's width; nothing learned is pinned
        assert lp.weight_bits == want and lp.weight_frac is None and lp.emax is None
        assert lp.act_frac == layer.out_format.frac
    # the float model the formats were chosen for is the retrained one, on the weights
    assert r.float_net is not None and r.float_net is not float_net
    # the resolved precision, also through precision.toml, gives the same network
    back = prec.parse(prec.dumps(r.precision))
    assert back == r.precision
    again = quantize(float_net, back, calib, (calib, y), progress=False, **SHORT)
    assert again.net == r.net and again.precision == r.precision
    # golden model == fake-quant model, every layer, after a .hwq round trip
    net = hwq.load(hwq.save(r.net, tmp_path / "m.hwq", meta=r.meta))
    meta = hwq.load_meta(tmp_path / "m.hwq")
    assert meta["scheme"] == scheme
    for name in ("conv", "fc"):
        layer = r.net.layer(name)
        assert meta["formats"][name]["weight"] == str(layer.weight_format)
        assert meta["formats"][name].get("scale") == (
            str(layer.scale_format) if layer.scale_format else None
        )
    golden = gm.forward(net, gm.quantize_input(calib, net.input_format))
    for a, b in zip(golden, fake_quant_forward(r.net, calib), strict=True):
        assert np.array_equal(a, b)


def test_amq_weights_are_the_plane_sums(float_net, calib):
    y = np.arange(64) % 3
    r = quantize(float_net, Precision("amq"), calib, (calib, y), progress=False, **SHORT)
    layer = r.net.layer("fc")
    # the retrained float weights are Σ α_i b_i; the IR holds Σ m_i b_i with 8-bit m_i
    w = r.float_net.layers[2].weight
    step = 2.0**-layer.weight_format.frac
    assert np.max(np.abs(layer.weight * step - w)) <= step * (1 + 1e-9)  # 2 scales, ±step/2


def test_with_activations_keeps_the_learned_weights(float_net, calib):
    y = np.arange(64) % 3
    r = quantize(float_net, Precision("lat"), calib, (calib, y), progress=False, **SHORT)
    p = Precision("lat", {"conv": LayerPrecision(act_bits=5)})
    q = with_activations(r, p, calib)
    assert q.net.layer("conv").out_format.bits == 5
    assert np.array_equal(q.net.layer("fc").weight, r.net.layer("fc").weight)
    assert np.array_equal(q.net.layer("fc").scale, r.net.layer("fc").scale)
    assert q.precision.layers["conv"].weight_bits == 2 and q.precision.scheme == "lat"
    # its precision reproduces it by retraining (same seed and options)
    again = quantize(float_net, q.precision, calib, (calib, y), progress=False, **SHORT)
    assert again.net == q.net


@pytest.mark.parametrize(
    ("scheme", "bits", "message"),
    [
        ("bc", 2, "layer fc: scheme bc has 1-bit weights, not 2"),
        ("lat", 1, "layer fc: scheme lat has 2-bit weights, not 1"),
        ("dqc", 6, r"layer fc: weight bits 6 out of range \[3, 5\] for dqc"),
        ("amq", 1, r"layer fc: weight bits 1 out of range \[2, 4\] for amq"),
    ],
)
def test_learned_schemes_refuse_other_bits(scheme, bits, message):
    with pytest.raises(HwgenError, match=f"^{message}$"):
        Precision(scheme, {"fc": LayerPrecision(weight_bits=bits)})


def test_learned_schemes_need_training_data(float_net, calib):
    with pytest.raises(HwgenError, match="scheme dqc retrains the model: it needs labelled"):
        quantize(float_net, Precision("dqc"), calib)


@pytest.fixture(scope="module")
def digits():
    return digits_float_net()


@pytest.mark.parametrize("scheme", list(LEARNED_KINDS))
def test_learned_golden_equals_fake_quant_on_digits(digits, scheme):
    fnet, data = digits
    options = {
        "retrain_options": RetrainOptions(epochs=1),
        "codebook_options": CodebookOptions(epochs=1),
    }
    r = quantize(
        fnet, Precision(scheme), data.x_train, (data.x_train, data.y_train), progress=False,
        **options,
    )  # fmt: skip
    golden = gm.forward(r.net, gm.quantize_input(data.x_test, r.net.input_format))
    fake = fake_quant_forward(r.net, data.x_test)
    for a, b in zip(golden, fake, strict=True):
        assert np.array_equal(a, b)
    assert accuracy(r.net, data.x_test, data.y_test) > 0.5


# ---------------------------------------------------------------- pruning and low rank (#12)

ONE_EPOCH = InqOptions(epochs=1)


@pytest.mark.parametrize("scheme", ["pow2", "inq"])
def test_pruned_digits_keep_exactly_the_masked_blocks_zero(digits, scheme, tmp_path):
    fnet, data = digits
    train = (data.x_train, data.y_train)
    layers = {"conv2": LayerPrecision(prune=0.75), "fc": LayerPrecision(prune=0.75)}
    p = Precision(scheme, layers, block=4)
    r = quantize(fnet, p, data.x_train, train, progress=False, inq_options=ONE_EPOCH)
    _, masks = prune(fnet, train, p.pruned, 4, options=ONE_EPOCH, progress=False)
    net = hwq.load(hwq.save(r.net, tmp_path / "p.hwq", meta=r.meta))
    for name in ("conv2", "fc"):
        w = net.layer(name).weight
        assert np.array_equal(w != 0, masks[name] & (w != 0))  # zero wherever pruned
        assert block_sparsity(w, 4) >= 0.75
        assert hwq.load_meta(tmp_path / "p.hwq")["prune"]["achieved"][name] == block_sparsity(w, 4)
    assert r.precision.pruned == {"conv2": 0.75, "fc": 0.75} and r.precision.block == 4
    assert r.precision.layers["conv1"].prune is None
    again = quantize(fnet, r.precision, data.x_train, train, progress=False, inq_options=ONE_EPOCH)
    assert again.net == r.net
    assert accuracy(r.net, data.x_test, data.y_test) > 0.5


PRUNE_WITH = "prune with fixed, pow2, inq, ternary, twn, lat, ttq, dqc"


@pytest.mark.parametrize(
    ("scheme", "bits", "zero", "message"),
    [
        ("bc", None, True, f"scheme bc cannot keep pruned weights at zero: {PRUNE_WITH} (its bin"),
        ("lab", None, True, "scheme lab cannot keep pruned weights at zero: prune with fixed"),
        ("amq", None, True, "scheme amq cannot keep pruned weights at zero: prune with fixed"),
        ("binary", None, True, "scheme binary cannot keep pruned weights at zero"),
        ("dqc", None, False, "scheme dqc without its zero entry (--no-zero) cannot keep pruned"),
        ("pow2", 1, True, "layer fc: scheme pow2 at 1 bit has no zero weight to prune to"),
        (
            "auto",
            None,
            True,
            "scheme auto keeps weights quantized elsewhere: it cannot be retrained",
        ),
    ],
)
def test_schemes_that_cannot_keep_zeros_refuse_pruning(
    float_net, calib, scheme, bits, zero, message
):
    p = Precision(scheme, {"fc": LayerPrecision(weight_bits=bits, prune=0.5)}, block=4)
    options = CodebookOptions(zero=zero)
    with pytest.raises(HwgenError, match=f"^{re.escape(message)}") as err:
        quantize(
            float_net,
            p,
            calib,
            (calib, np.arange(64) % 3),
            progress=False,
            codebook_options=options,
        )
    assert "\n" not in str(err.value)  # one line (the CLI exits 2 with it)


@pytest.mark.parametrize("scheme", ["twn", "lat", "ttq", "dqc"])
def test_learned_schemes_keep_the_pruned_blocks_zero_and_golden_equals_fake_quant(
    digits, scheme, tmp_path
):
    """The learned schemes with a zero code retrain with the prune masks: each pruned weight
    is 0 in the IR, the golden model equals fake-quant on every test image, and the
    precision reproduces the network."""
    fnet, data = digits
    train = (data.x_train, data.y_train)
    layers = {"conv2": LayerPrecision(prune=0.75), "fc": LayerPrecision(prune=0.75)}
    p = Precision(scheme, layers, block=4)
    options = {
        "inq_options": ONE_EPOCH,
        "retrain_options": RetrainOptions(epochs=1),
        "codebook_options": CodebookOptions(epochs=1),
    }
    r = quantize(fnet, p, data.x_train, train, progress=False, **options)
    _, masks = prune(fnet, train, p.pruned, 4, options=ONE_EPOCH, progress=False)
    net = hwq.load(hwq.save(r.net, tmp_path / "p.hwq", meta=r.meta))
    for name in ("conv2", "fc"):
        w = net.layer(name).weight
        assert not np.any(w[~masks[name]]) and block_sparsity(w, 4) >= 0.75
    golden = gm.forward(net, gm.quantize_input(data.x_test, net.input_format))
    for a, b in zip(golden, fake_quant_forward(net, data.x_test), strict=True):
        assert np.array_equal(a, b)
    assert r.precision.pruned == {"conv2": 0.75, "fc": 0.75} and r.precision.block == 4
    again = quantize(fnet, r.precision, data.x_train, train, progress=False, **options)
    assert again.net == r.net
    assert accuracy(net, data.x_test, data.y_test) > 0.5


def test_compression_needs_training_data_and_a_pruned_layer_for_a_block(float_net, calib):
    with pytest.raises(HwgenError, match="low-rank and pruning retrain the model: they need"):
        quantize(float_net, Precision("fixed", {"fc": LayerPrecision(prune=0.5)}), calib)
    with pytest.raises(HwgenError, match=r"^block 2: no layer is pruned \(give a prune target\)"):
        quantize(float_net, Precision("fixed", block=2), calib, (calib, np.arange(64) % 3))


def test_lowrank_precision_names_the_split_layers_before_any_retraining(float_net, calib):
    p = Precision("fixed", {"fc": LayerPrecision(prune=0.5)}, lowrank=1, lowrank_layers=("fc",))
    with pytest.raises(HwgenError, match=r"^precision: the model has no conv/linear layer 'fc' "):
        quantize(float_net, p, calib, (calib, np.arange(64) % 3), progress=False)


def test_lowrank_digits_splits_conv_layers_and_reproduces(digits):
    fnet, data = digits
    train = (data.x_train, data.y_train)
    p = Precision("fixed", lowrank=4)
    r = quantize(fnet, p, data.x_train, train, progress=False, inq_options=ONE_EPOCH)
    # conv1 (one input channel) has nothing to gain; the classifier is kept by default
    assert _macs(r.float_net) == ["conv1", "conv2_v", "conv2_h", "fc"] == list(r.precision.layers)
    assert r.net.layer("conv2_v").weight.shape == (4, 8, 3, 1)
    assert r.precision.lowrank_layers == ("conv1", "conv2") and r.meta["lowrank"]["rank"] == 4
    assert sum(mac_count(r.float_net).values()) < sum(mac_count(fnet).values())
    again = quantize(fnet, r.precision, data.x_train, train, progress=False, inq_options=ONE_EPOCH)
    assert again.net == r.net
    golden = gm.forward(r.net, gm.quantize_input(data.x_test, r.net.input_format))
    for a, b in zip(golden, fake_quant_forward(r.net, data.x_test), strict=True):
        assert np.array_equal(a, b)
    assert accuracy(r.net, data.x_test, data.y_test) > 0.8
