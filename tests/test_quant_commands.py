"""``hwgen quantize`` through the CLI: one successful run and every user error (exit 2)."""

import numpy as np
import pytest

from hwgen import golden as gm
from hwgen import hwq
from hwgen.cli import main
from hwgen.examples.digits import digits_float_net
from hwgen.examples.digits_res import digits_res_float_net
from hwgen.ir import Add
from hwgen.quant.fakequant import accuracy, fake_quant_forward
from hwgen.quant.tune import float_accuracy


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["quantize", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_digits_fixed(tmp_path, capsys):
    out = tmp_path / "d.hwq"
    rc, stdout, _ = _run(capsys, "digits", "--scheme", "fixed", "--bits", "6", "-o", str(out))
    assert rc == 0
    net = hwq.load(out)
    meta = hwq.load_meta(out)
    assert meta["scheme"] == "fixed" and meta["source"] == "digits"
    assert all(f["weight"].startswith("fixed6.") for f in meta["formats"].values())
    _, data = digits_float_net()
    acc = accuracy(net, data.x_test, data.y_test)
    assert meta["test_accuracy"] == acc
    assert f"{100 * acc:.2f}%" in stdout and "conv1" in stdout
    # the resolved precision, written back, reproduces the same network
    prec = tmp_path / "p.toml"
    prec.write_text(meta["precision"])
    again = tmp_path / "e.hwq"
    assert _run(capsys, "digits", "--precision", str(prec), "-o", str(again))[0] == 0
    assert hwq.load(again) == net


def test_quantize_with_data_npz(tmp_path, capsys):
    _, data = digits_float_net()
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=data.x_train[:200], y=data.y_train[:200])
    out = tmp_path / "d.hwq"
    assert _run(capsys, "digits", "--scheme", "pow2", "--data", str(npz), "-o", str(out))[0] == 0
    net = hwq.load(out)
    assert gm.predict(net, gm.quantize_input(data.x_test[:5], net.input_format)).shape == (5,)


def _bad_data(tmp_path, kind: str):
    p = tmp_path / f"{kind}.npz"
    if kind == "text":
        p.write_text("not a zip")
    elif kind == "no_x":
        np.savez(p, images=np.zeros((2, 1, 8, 8)))
    elif kind == "int_x":
        np.savez(p, x=np.zeros((2, 1, 8, 8), dtype=np.int32))
    elif kind == "object":
        np.savez(p, x=np.array([{"a": 1}], dtype=object))
    elif kind == "shape":
        np.savez(p, x=np.zeros((2, 3, 8, 8)))
    elif kind == "labels":
        np.savez(p, x=np.zeros((2, 1, 8, 8)), y=np.zeros(3, dtype=np.int64))
    return p


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheme", "fixed", "--bits", "0"], "weight bits 0 out of range [2, 16] for fixed"),
        (["--scheme", "fixed", "--bits", "17"], "weight bits 17 out of range [2, 16] for fixed"),
        (["--scheme", "inq", "--bits", "8"], "weight bits 8 out of range [1, 7] for inq"),
        (["--scheme", "pow2", "--bits", "8"], "weight bits 8 out of range [1, 7] for pow2"),
        (["--scheme", "fixed", "--act-bits", "1"], "activation bits 1 out of range"),
        ([], "give --scheme or --precision"),
        (["--scheme", "fixed", "--epochs", "3"], "--epochs 3: needs a retrained scheme"),
    ],
)
def test_option_errors(tmp_path, capsys, args, message):
    out = tmp_path / "o.hwq"
    rc, _, err = _run(capsys, "digits", *args, "-o", str(out))
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "not a readable .npz"),
        ("no_x", "needs an array 'x' or 'x_train' (has: images)"),
        ("int_x", "x must be finite float images"),
        ("object", "not a readable .npz"),
        ("shape", "calibration data has shape (2, 3, 8, 8)"),
        ("labels", "y must be 2 integer labels"),
        ("missing", "no such file"),
    ],
)
def test_bad_data(tmp_path, capsys, kind, message):
    out = tmp_path / "o.hwq"
    data = _bad_data(tmp_path, kind)
    rc, _, err = _run(capsys, "digits", "--scheme", "fixed", "--data", str(data), "-o", str(out))
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_precision_naming_unknown_layer(tmp_path, capsys):
    p = tmp_path / "p.toml"
    p.write_text('scheme = "fixed"\n[layers.conv9]\nweight_bits = 4\n')
    out = tmp_path / "o.hwq"
    rc, _, err = _run(capsys, "digits", "--precision", str(p), "-o", str(out))
    assert rc == 2 and "no conv/linear layer 'conv9'" in err and "conv1" in err
    assert not out.exists()


def test_quantize_digits_res_inq5_golden_equals_fake_quant(tmp_path, capsys):
    out = tmp_path / "r.hwq"
    rc, stdout, _ = _run(capsys, "digits-res", "--scheme", "inq", "--bits", "5", "-o", str(out))
    assert rc == 0
    net, meta = hwq.load(out), hwq.load_meta(out)
    adds = [lyr for lyr in net.layers if isinstance(lyr, Add)]
    assert [a.name for a in adds] == ["layers_0_0", "layers_1_0"] and all(a.relu for a in adds)
    assert all(meta["formats"][a.name] == {"out": str(a.out_format)} for a in adds)
    assert "layers_1_0" in stdout and "Add + ReLU" in stdout
    fnet, data = digits_res_float_net()
    golden = gm.forward(net, gm.quantize_input(data.x_test, net.input_format))
    fake = fake_quant_forward(net, data.x_test)
    assert len(data.x_test) == 360
    for layer, a, b in zip(net.layers, golden, fake, strict=True):
        assert np.array_equal(a, b), layer.name
    acc = accuracy(net, data.x_test, data.y_test)
    assert meta["test_accuracy"] == acc
    assert acc >= float_accuracy(fnet, data.x_test, data.y_test) - 0.005  # the bar


def test_quantize_digits_res_precision_with_add_layers(tmp_path, capsys):
    out = tmp_path / "r.hwq"
    assert _run(capsys, "digits-res", "--scheme", "fixed", "-o", str(out))[0] == 0
    net, meta = hwq.load(out), hwq.load_meta(out)
    text = meta["precision"]
    assert "[layers.layers_1_0]\nact_bits = 8\n" in text
    prec = tmp_path / "p.toml"
    prec.write_text(text)
    again = tmp_path / "e.hwq"
    assert _run(capsys, "digits-res", "--precision", str(prec), "-o", str(again))[0] == 0
    assert hwq.load(again) == net
    # an add layer's own bits are used; --act-bits reaches add layers too
    prec.write_text('scheme = "fixed"\n[layers.layers_0_0]\nact_bits = 5\n')
    assert _run(capsys, "digits-res", "--precision", str(prec), "-o", str(again))[0] == 0
    assert hwq.load(again).layer("layers_0_0").out_format.bits == 5
    argv = ("--precision", str(prec), "--act-bits", "6", "-o", str(again))
    assert _run(capsys, "digits-res", *argv)[0] == 0
    assert hwq.load(again).layer("layers_1_0").out_format.bits == 6
    # weights on an add layer: one line naming the layer
    prec.write_text('scheme = "fixed"\n[layers.layers_1_0]\nweight_bits = 4\n')
    bad = tmp_path / "bad.hwq"
    rc, _, err = _run(capsys, "digits-res", "--precision", str(prec), "-o", str(bad))
    assert rc == 2 and err.count("\n") == 1 and not bad.exists()
    assert "layer layers_1_0 is an add and has no weights: remove weight_bits" in err
