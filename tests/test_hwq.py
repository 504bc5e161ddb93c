"""The .hwq artifact: exact round trips, deterministic bytes, one-line rejection of bad files."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import example_network, plane_format, plane_weights, residual_network, with_roundings

from hwgen import golden as gm
from hwgen import hwq
from hwgen.errors import HwgenError
from hwgen.ir import ROUNDINGS, ActFormat, Codebook, Fixed, Linear, Network


@pytest.fixture(scope="module")
def net() -> Network:
    return example_network(3)


@pytest.mark.parametrize("archive", [True, False])
def test_round_trip_is_exact(tmp_path, net, archive):
    path = hwq.save(net, tmp_path / "m.hwq", archive=archive, meta={"scheme": "inq", "acc": 0.9})
    assert path.is_file() if archive else path.is_dir()
    back = hwq.load(path)
    assert back == net
    assert back.name == "example" and back.formats == net.formats and back.shapes == net.shapes
    for a, b in zip(back.layers, net.layers, strict=True):
        assert type(a) is type(b) and a == b
    assert hwq.load_meta(path) == {"scheme": "inq", "acc": 0.9}


def test_a_changed_weight_is_not_equal(tmp_path, net):
    doc, arrays = _unpack(hwq.save(net, tmp_path / "m.hwq"))
    arrays["fc2.weight"][0, 0] = 0 if arrays["fc2.weight"][0, 0] else 1
    assert hwq.from_json(doc, arrays) != net


def test_save_is_byte_deterministic_and_replaces(tmp_path, net):
    a = hwq.save(net, tmp_path / "a.hwq").read_bytes()
    b = hwq.save(net, tmp_path / "b.hwq").read_bytes()
    assert a == b
    # Overwriting: a zip over a directory, a directory over a zip; no temp files left behind.
    hwq.save(net, tmp_path / "a.hwq", archive=False)
    assert (tmp_path / "a.hwq" / "model.json").is_file()
    hwq.save(net, tmp_path / "a.hwq")
    assert (tmp_path / "a.hwq").read_bytes() == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.hwq", "b.hwq"]
    assert str(tmp_path) not in (tmp_path / "a.hwq").read_bytes().decode("latin-1")


def test_writer_uses_the_smallest_integer_dtype(tmp_path, net):
    _, arrays = _unpack(hwq.save(net, tmp_path / "m.hwq"))
    assert arrays["conv1.weight"].dtype == np.int8  # Pow2(4): |w| <= 8
    assert arrays["conv2.bias"].dtype == np.int16  # |bias| <= 256
    big = Linear("fc", 2, 2, Fixed(16, 0), ActFormat(8, 0), [[1, 2], [3, 4]], [2**40, -(2**20)])
    path = hwq.save(Network((2,), ActFormat(8, 0), (big,)), tmp_path / "big.hwq")
    _, arrays = _unpack(path)
    assert arrays["fc.weight"].dtype == np.int8 and arrays["fc.bias"].dtype == np.int64
    assert hwq.load(path).layers[0].bias.tolist() == [2**40, -(2**20)]


def test_any_integer_dtype_is_read(tmp_path, net):
    doc, arrays = _unpack(hwq.save(net, tmp_path / "m.hwq"))
    arrays = {k: a.astype(np.int64 if a.min() < 0 else np.uint32) for k, a in arrays.items()}
    assert hwq.load(_write_dir(tmp_path / "d.hwq", doc, arrays)) == net


# ---------------------------------------------------------------- rejection


def _unpack(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    model, weights = hwq.read_files(path)
    with np.load(io.BytesIO(weights)) as npz:
        return json.loads(model), {k: npz[k] for k in npz.files}


def _write_dir(path: Path, doc: object, arrays: dict[str, np.ndarray], **savez) -> Path:
    path.mkdir()
    (path / "model.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    np.savez(path / "weights.npz", **arrays, **savez)
    return path


def _layer(doc: dict, name: str) -> dict:
    return next(d for d in doc["layers"] if d["name"] == name)


def _set(*keys_value):
    """A mutation of model.json: set the value at a key path (layer names resolve to layers)."""
    *keys, value = keys_value

    def mutate(doc, arrays):
        d = doc
        for k in keys[:-1]:
            d = _layer(doc, k) if isinstance(d, dict) and k not in d else d[k]
        d[keys[-1]] = value

    return mutate


def _array(name: str, fn):
    def mutate(doc, arrays):
        arrays[name] = fn(arrays[name])

    return mutate


def _put(a: np.ndarray, index, value, dtype=None) -> np.ndarray:
    a = a.astype(dtype or a.dtype)
    a[index] = value
    return a


def _drop_layers(doc, arrays):
    doc["layers"] = []


def _object_array(doc, arrays):
    arrays["fc2.bias"] = np.array([1, 2, 3], dtype=object)


BAD_MODELS = {
    "unknown version": (
        _set("version", 4),
        r"unknown format version 4 \(this hwgen reads 1 to 3\)",
    ),
    "wrong format name": (_set("format", "onnx"), "format is 'onnx', not 'hwq'"),
    "unknown op": (_set("conv2", "op", "conv3d"), "layer conv2 has unknown op 'conv3d'"),
    "empty network": (_drop_layers, "the network has no layers"),
    "out_shape mismatch": (
        _set("fc1", "out_shape", [13]),
        r"layer fc1 declares out_shape \[13\], but its input gives \[12\]",
    ),
    "out_shape not a list": (_set("fc1", "out_shape", 12), r"layer fc1.out_shape has the wrong"),
    "null value": (_set("conv1", "stride", None), r"layer conv1.stride has the wrong type: None"),
    "missing key": (
        lambda doc, arrays: _layer(doc, "conv1").pop("padding"),
        "model.json: layer conv1 has no 'padding'",
    ),
    "bool as int": (_set("fc1", "in_features", True), r"fc1.in_features has the wrong type: True"),
    "bad Fixed bits": (
        _set("fc2", "weight_format", "bits", 17),
        r"Fixed weight bits must be an integer in \[2, 16\], not 17",
    ),
    "bad weight kind": (_set("fc2", "weight_format", "kind", "float"), "'float' is not 'fixed'"),
    "rounding in version 1": (
        _set("conv2", "out_format", "rounding", "floor"),
        r"model.json: layer conv2.out_format.rounding 'floor' needs version 2",
    ),
    "bad act frac": (
        _set("conv2", "out_format", "frac", 40),
        r"activation frac must be an integer in \[-32, 32\], not 40",
    ),
    "in_channels mismatch": (
        _set("conv2", "in_channels", 5),
        r"layer conv2: weight has shape \(6, 4, 3, 3\), expected \(6, 5, 3, 3\)",
    ),
    "weight shape": (
        _array("fc1.weight", lambda a: a[:, :5]),
        r"layer fc1: weight has shape \(12, 5\), expected \(12, 6\)",
    ),
    "bias shape": (
        _array("fc1.bias", lambda a: a[:3]),
        r"layer fc1: bias has shape \(3,\), expected \(12,\)",
    ),
    "Fixed out of range": (
        _array("fc2.weight", lambda a: _put(a, (2, 3), 128, np.int16)),
        r"layer fc2: weight\[2, 3\] = 128 is not in fixed8.f5",
    ),
    "Pow2 off grid": (
        _array("conv1.weight", lambda a: _put(a, (1, 0, 2, 2), 3)),
        r"layer conv1: weight\[1, 0, 2, 2\] = 3 is not in pow2_4.emax0",
    ),
    "Pow2 too large": (
        _array("fc1.weight", lambda a: _put(a, (0, 0), -8)),
        r"layer fc1: weight\[0, 0\] = -8 is not in pow2_3.emax-1",
    ),
    "uint64 past int64": (
        _array("fc2.bias", lambda a: _put(a, 0, 2**64 - 1, np.uint64)),
        r"layer fc2: bias holds 18446744073709551615, outside the int64 range",
    ),
    "float dtype": (
        _array("fc2.weight", lambda a: a.astype(np.float32)),
        "weights.npz: fc2.weight has dtype float32; only integer arrays are allowed",
    ),
    "bool dtype": (
        _array("fc2.bias", lambda a: a != 0),
        "weights.npz: fc2.bias has dtype bool; only integer arrays",
    ),
    "NaN": (
        _array("conv2.bias", lambda a: _put(a, 1, np.nan, np.float64)),
        "weights.npz: conv2.bias contains NaN or Inf",
    ),
    "Inf": (
        _array("conv2.weight", lambda a: _put(a, (0, 0, 0, 0), -np.inf, np.float64)),
        "weights.npz: conv2.weight contains NaN or Inf",
    ),
    "missing array": (
        lambda doc, arrays: arrays.pop("fc1.bias"),
        r"weights.npz has no array 'fc1.bias' \(layer fc1.bias\)",
    ),
    "object array": (_object_array, "weights.npz: unreadable array .*allow_pickle=False"),
    "accumulator too wide": (
        _array("fc2.bias", lambda a: _put(a, 0, 2**62, np.int64)),
        r"layer fc2: accumulator needs 64 bits \(max 62\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_loader_rejects_with_one_line(tmp_path, net, case):
    mutate, message = BAD_MODELS[case]
    doc, arrays = _unpack(hwq.save(net, tmp_path / "good.hwq"))
    mutate(doc, arrays)
    path = _write_dir(tmp_path / "bad.hwq", doc, arrays)
    with pytest.raises(HwgenError, match=message) as e:
        hwq.load(path)
    assert "\n" not in str(e.value)
    # The same files zipped are rejected the same way.
    zipped = tmp_path / "bad.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for p in path.iterdir():
            zf.write(p, p.name)
    with pytest.raises(HwgenError, match=message):
        hwq.load(zipped)


class _Evil:
    """Unpickling this would create the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickles_are_never_loaded(tmp_path, net):
    marker = tmp_path / "pwned"
    doc, arrays = _unpack(hwq.save(net, tmp_path / "good.hwq"))
    arrays["fc2.weight"] = np.array([_Evil(marker)], dtype=object)
    path = _write_dir(tmp_path / "bad.hwq", doc, arrays)
    with pytest.raises(HwgenError, match=r"weights.npz: unreadable array"):
        hwq.load(path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(HwgenError, match=r"nope.hwq: no such file or directory$"):
        hwq.load(tmp_path / "nope.hwq")


@pytest.mark.parametrize("missing", ["model.json", "weights.npz"])
def test_missing_member(tmp_path, net, missing):
    d = hwq.save(net, tmp_path / "d.hwq", archive=False)
    (d / missing).unlink()
    with pytest.raises(HwgenError, match=rf"d.hwq: missing {missing}$"):
        hwq.load(d)
    z = tmp_path / "z.hwq"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("other.json" if missing == "model.json" else "model.json", "{}")
    with pytest.raises(HwgenError, match=rf"z.hwq: missing {missing}$"):
        hwq.load(z)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "hwq", ', r"model.json is not valid JSON \(Expecting"),
        (b"\xff\xfe{}", "model.json is not valid JSON"),
        ("[1, 2]", "model.json: the top level must be an object, not list"),
        ('{"format": "hwq"}', "model.json: the top level has no 'version'"),
    ],
)
def test_broken_json(tmp_path, net, text, message):
    d = hwq.save(net, tmp_path / "d.hwq", archive=False)
    (d / "model.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(HwgenError, match=message) as e:
        hwq.load(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04truncated"])
def test_not_an_archive(tmp_path, data):
    (tmp_path / "x.hwq").write_bytes(data)
    with pytest.raises(HwgenError, match=r"x.hwq: not a .hwq directory or zip archive"):
        hwq.load(tmp_path / "x.hwq")


def test_weights_not_an_npz(tmp_path, net):
    d = hwq.save(net, tmp_path / "d.hwq", archive=False)
    for data in (b"garbage", b"PK\x03\x04garbage"):
        (d / "weights.npz").write_bytes(data)
        with pytest.raises(HwgenError, match=r"weights.npz is not a valid .npz file"):
            hwq.load(d)


def test_documented_example_is_accurate():
    """docs/hwq-format.md §5: its model.json and arrays load, and give the documented outputs."""
    text = (Path(__file__).parents[1] / "docs" / "hwq-format.md").read_text()
    doc = json.loads(text.split("```json\n")[1].split("```")[0])
    rows = re.findall(r"^\| `([\w.]+)` +\| int8 +\| \([\d, ]+\) +\| `(\[.*\])` \|$", text, re.M)
    arrays = {k: np.array(json.loads(v), dtype=np.int8) for k, v in rows}
    assert sorted(arrays) == ["conv1.bias", "conv1.weight", "fc.bias", "fc.weight"]
    net = hwq.from_json(doc, arrays)
    x = np.array([[16, -16, 8, 0], [4, 0, -4, 12], [32, 2, 1, -7], [5, 5, -20, 3]])
    outs = dict(zip(net.names, gm.forward(net, x.reshape(1, 1, 4, 4)), strict=True))
    table = text.split("| layer   | output |")[1]
    documented = re.findall(r"^\| `(\w+)` +\| `(\[.*?\])`", table, re.M)
    assert [k for k, _ in documented] == net.names
    for name, value in documented:
        assert outs[name][0].tolist() == json.loads(value), name


# ---------------------------------------------------------------- version 2 (graphs)


def test_chain_is_written_as_version_1(tmp_path, net):
    doc, _ = _unpack(hwq.save(net, tmp_path / "m.hwq"))
    assert doc["version"] == 1 and "output" not in doc
    assert all("inputs" not in d for d in doc["layers"])


def test_graph_round_trip_is_exact_and_deterministic(tmp_path):
    res = residual_network(2)
    path = hwq.save(res, tmp_path / "r.hwq", meta={"scheme": "pow2"})
    doc, _ = _unpack(path)
    assert doc["version"] == 2 and doc["output"] == "fc"
    assert _layer(doc, "b1_add") == {
        "name": "b1_add", "op": "add", "relu": True,
        "out_format": {"bits": 8, "frac": 3, "signed": False},
        "inputs": ["b1_conv2", "stem"], "out_shape": [4, 8, 8],
    }  # fmt: skip
    assert (
        _layer(doc, "b2_short")["pad"] == [2, 2] and _layer(doc, "pool")["op"] == "global_avgpool"
    )
    back = hwq.load(path)
    assert back == res and back.shapes == res.shapes and back.formats == res.formats
    again = hwq.save(back, tmp_path / "again.hwq", meta={"scheme": "pow2"})
    assert again.read_bytes() == path.read_bytes()


def _v1(doc, arrays):
    doc["version"] = 1


BAD_GRAPHS = {
    "v2 op in a v1 file": (_v1, "layer b1_add has op 'add', which needs version 2"),
    "missing inputs": (
        lambda doc, arrays: _layer(doc, "stem").pop("inputs"),
        "model.json: layer stem has no 'inputs'",
    ),
    "inputs not names": (_set("b1_add", "inputs", [1, 2]), r"layer b1_add.inputs must be layer"),
    "later input": (
        _set("b1_add", "inputs", ["b1_conv2", "fc"]),
        "layer b1_add: input 'fc' is not the network input or an earlier layer",
    ),
    "one input to add": (_set("b1_add", "inputs", ["stem"]), "layer b1_add: takes 2 inputs"),
    "dangling layer": (
        _set("b2_short", "inputs", ["b2_conv1"]),
        r"b2_add: adds inputs of different shapes",
    ),
    "unused layer": (
        lambda doc, arrays: [
            _set(n, "inputs", ["stem"])(doc, arrays) for n in ("b2_conv1", "b2_short")
        ],
        "layer b1_add: its output is never used",
    ),
    "wrong output": (_set("output", "pool"), "model.json: output is 'pool', but the last layer"),
    "unknown key": (_set("b2_short", "offset", [1, 1]), "layer b2_short has unknown key 'offset'"),
    "unknown rounding": (
        _set("b1_add", "out_format", {"bits": 8, "frac": 3, "signed": False, "rounding": "even"}),
        r"layer b1_add.out_format.rounding 'even' is not one of half_up, half_even, floor",
    ),
    "rounding not a string": (
        _set("input", "format", {"bits": 8, "frac": 4, "signed": True, "rounding": 1}),
        r"model.json: input.format.rounding has the wrong type: 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_graph_loader_rejects_with_one_line(tmp_path, case):
    mutate, message = BAD_GRAPHS[case]
    doc, arrays = _unpack(hwq.save(residual_network(), tmp_path / "good.hwq"))
    mutate(doc, arrays)
    with pytest.raises(HwgenError, match=message) as e:
        hwq.load(_write_dir(tmp_path / "bad.hwq", doc, arrays))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- rounding


@pytest.mark.parametrize("make", [example_network, residual_network])
def test_roundings_round_trip_and_are_written_only_when_not_half_up(tmp_path, make):
    modes = itertools.cycle(ROUNDINGS[1:] + ROUNDINGS)
    picked = {}
    net = with_roundings(make(1), lambda name: picked.setdefault(name, next(modes)))
    assert set(picked.values()) == set(ROUNDINGS)
    path = hwq.save(net, tmp_path / "r.hwq")
    doc, _ = _unpack(path)
    assert doc["version"] == 2  # a version 1 reader would not know the key
    stored = {d["name"]: d["out_format"] for d in doc["layers"] if "out_format" in d}
    stored["input"] = doc["input"]["format"]
    assert stored.keys() == picked.keys()
    for name, mode in picked.items():
        assert stored[name].get("rounding", "half_up") == mode
        assert ("rounding" in stored[name]) == (mode != "half_up")
    back = hwq.load(path)
    assert back == net and back.formats == net.formats
    assert hwq.save(back, tmp_path / "again.hwq").read_bytes() == path.read_bytes()


def test_half_up_everywhere_keeps_version_1_bytes(tmp_path, net):
    same = with_roundings(net, lambda name: "half_up")
    a = hwq.save(net, tmp_path / "a.hwq").read_bytes()
    assert hwq.save(same, tmp_path / "b.hwq").read_bytes() == a
    assert b"rounding" not in a
    doc, _ = _unpack(hwq.save(with_roundings(net, lambda n: "floor"), tmp_path / "c.hwq"))
    assert doc["version"] == 2 and doc["input"]["format"]["rounding"] == "floor"


# ---------------------------------------------------------------- version 3 (per-channel scales)

# sha256 of the files the version 2 writer (before version 3) wrote for example_network(3)
# (version 1) and residual_network(3) (version 2) with meta {"scheme": "x"}.
OLD_BYTES = {
    example_network: "e40ee34fb07edef6b4a757f49f4482331c1d8e8a578f57b5969d2b7223b8dc34",
    residual_network: "b7cc6e223bf248baea69d7b767188e452ad9dd9a1dcbdce4666ed6bbe00e2aae",
}


@pytest.mark.parametrize("make", list(OLD_BYTES))
def test_networks_without_scale_keep_their_version_1_and_2_bytes(tmp_path, make):
    data = hwq.save(make(3), tmp_path / "m.hwq", meta={"scheme": "x"}).read_bytes()
    assert hashlib.sha256(data).hexdigest() == OLD_BYTES[make]
    assert b"scale" not in data


def _scaled(net: Network, scales: dict[str, tuple[Fixed, list[int]]]) -> Network:
    layers = [
        replace(lyr, scale=scales[lyr.name][1], scale_format=scales[lyr.name][0])
        if lyr.name in scales
        else lyr
        for lyr in net.layers
    ]
    return replace(net, layers=tuple(layers))


@pytest.fixture(scope="module")
def scaled() -> Network:
    """example_network(3) with scales on conv2 (6 channels) and fc2 (10): extremes, 0, -1."""
    return _scaled(
        example_network(3),
        {
            "conv2": (Fixed(16, 9), [-(2**15), 2**15 - 1, 0, -1, 1, 300]),
            "fc2": (Fixed(4, -2), [-8, 7, 0, -1, 1, 2, 3, -5, 6, 4]),
        },
    )


@pytest.mark.parametrize("archive", [True, False])
def test_scales_round_trip_as_version_3(tmp_path, scaled, archive):
    path = hwq.save(scaled, tmp_path / "s.hwq", archive=archive)
    doc, arrays = _unpack(path) if archive else _unpack_dir(path)
    assert doc["version"] == 3 and doc["output"] == "fc2"
    conv2 = _layer(doc, "conv2")
    assert conv2["scale_format"] == {"kind": "fixed", "bits": 16, "frac": 9}
    assert conv2["scale"] == "conv2.scale" and "scale" not in _layer(doc, "fc1")
    assert list(conv2)[-4:] == ["scale_format", "scale", "inputs", "out_shape"]
    assert arrays["conv2.scale"].dtype == np.int16 and arrays["fc2.scale"].dtype == np.int8
    assert arrays["fc2.scale"].tolist() == scaled.layer("fc2").scale.tolist()
    back = hwq.load(path)
    assert back == scaled and back.layer("conv2").scale_format == Fixed(16, 9)
    assert back.layer("fc1").scale is None
    _same_outputs_and_bytes(back, scaled, path, tmp_path, archive)


def _unpack_dir(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    doc = json.loads((path / "model.json").read_text())
    with np.load(path / "weights.npz") as npz:
        return doc, {k: npz[k] for k in npz.files}


def _version(v: int):
    def mutate(doc, arrays):
        doc["version"] = v

    return mutate


BAD_SCALES = {
    "scale in a version 2 file": (_version(2), "layer conv2 has unknown key 'scale'"),
    "scale in a version 1 file": (_version(1), "layer conv2 has 'scale', which needs version 3"),
    "scale without format": (
        lambda doc, arrays: _layer(doc, "fc2").pop("scale_format"),
        "model.json: layer fc2 has 'scale' but no 'scale_format'",
    ),
    "format without scale": (
        lambda doc, arrays: _layer(doc, "fc2").pop("scale"),
        "model.json: layer fc2 has 'scale_format' but no 'scale'",
    ),
    "pow2 scale format": (
        _set("fc2", "scale_format", {"kind": "pow2", "bits": 3, "emax": 0}),
        "model.json: layer fc2.scale_format.kind must be 'fixed', not 'pow2'",
    ),
    "scale format bits": (
        _set("fc2", "scale_format", {"kind": "fixed", "bits": 17, "frac": 0}),
        r"Fixed weight bits must be an integer in \[2, 16\], not 17",
    ),
    "scale not a string": (_set("fc2", "scale", 3), r"layer fc2.scale has the wrong type: 3"),
    "missing scale array": (
        lambda doc, arrays: arrays.pop("fc2.scale"),
        r"weights.npz has no array 'fc2.scale' \(layer fc2.scale\)",
    ),
    "scale off grid": (
        _array("fc2.scale", lambda a: _put(a, 3, 8)),
        r"layer fc2: scale\[3\] = 8 is not in fixed4.f-2",
    ),
    "scale shape": (
        _array("conv2.scale", lambda a: a[:4]),
        r"layer conv2: scale has shape \(4,\), expected \(6,\)",
    ),
    "float scale": (
        _array("fc2.scale", lambda a: a.astype(np.float64)),
        "weights.npz: fc2.scale has dtype float64; only integer arrays are allowed",
    ),
    "scale on a pool": (
        _set("pool1", "scale", "fc2.scale"),
        "layer pool1 has unknown key 'scale'",
    ),
    "scaled accumulator too wide": (
        _array("conv2.bias", lambda a: _put(a, 0, 2**46, np.int64)),
        r"layer conv2: accumulator times scale needs 63 bits \(max 62\)",
    ),
}


def _same_outputs_and_bytes(
    back: Network, net: Network, path: Path, tmp_path: Path, archive: bool
) -> None:
    """A loaded ``back`` computes what ``net`` does and (zipped) saves to the same bytes."""
    x = np.random.default_rng(0).integers(-128, 128, (4, *net.input_shape))
    for a, b in zip(gm.forward(back, x), gm.forward(net, x), strict=True):
        assert np.array_equal(a, b)
    again = hwq.save(back, tmp_path / "again.hwq", archive=archive)
    if archive:
        assert again.read_bytes() == path.read_bytes()


def _refused_with_one_line(tmp_path: Path, net: Network, mutate, message: str) -> None:
    """``net`` saved, its file mutated, then loaded: one line matching ``message``."""
    doc, arrays = _unpack(hwq.save(net, tmp_path / "good.hwq"))
    mutate(doc, arrays)
    with pytest.raises(HwgenError, match=message) as e:
        hwq.load(_write_dir(tmp_path / "bad.hwq", doc, arrays))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_bad_scales_are_refused_with_one_line(tmp_path, scaled, case):
    _refused_with_one_line(tmp_path, scaled, *BAD_SCALES[case])


# ---------------------------------------------------------------- version 3 (codebook weights)


def _with_codebooks(net: Network, books: dict[str, Codebook], seed: int = 0) -> Network:
    rng = np.random.default_rng(seed)
    layers = []
    for lyr in net.layers:
        if lyr.name in books:
            cb = books[lyr.name]
            w = np.asarray(cb.entries)[rng.integers(0, len(cb.entries), lyr.weight.shape)]
            w.flat[:2] = cb.lo, cb.hi  # both ends stored
            lyr = replace(lyr, weight_format=cb, weight=w)
        layers.append(lyr)
    return replace(net, layers=tuple(layers))


@pytest.fixture(scope="module")
def books() -> Network:
    """example_network(3) with a 3-bit codebook with 0 on conv2 (and its scale) and a
    5-entry one without 0 on fc2."""
    cb = _with_codebooks(
        example_network(3),
        {
            "conv2": Codebook((-64, -33, -8, 0, 3, 12, 48, 64), 6),
            "fc2": Codebook((-7, -1, 2, 5, 96), -3),
        },
    )
    return _scaled(cb, {"conv2": (Fixed(8, 7), [-128, 127, 0, -1, 1, 3])})


@pytest.mark.parametrize("archive", [True, False])
def test_codebooks_round_trip_as_indices_in_version_3(tmp_path, books, archive):
    path = hwq.save(books, tmp_path / "c.hwq", archive=archive)
    doc, arrays = _unpack(path) if archive else _unpack_dir(path)
    assert doc["version"] == 3
    fc2 = _layer(doc, "fc2")
    assert fc2["weight_format"] == {"kind": "codebook", "entries": [-7, -1, 2, 5, 96], "frac": -3}
    assert _layer(doc, "conv2")["weight_format"]["entries"] == [-64, -33, -8, 0, 3, 12, 48, 64]
    for name in ("conv2", "fc2"):
        idx, layer = arrays[f"{name}.weight"], books.layer(name)
        assert idx.dtype == np.uint8 and idx.shape == layer.weight.shape
        assert np.array_equal(np.asarray(layer.weight_format.entries)[idx], layer.weight)
    assert arrays["fc2.weight"].max() == 4 and arrays["fc2.weight"].min() == 0
    back = hwq.load(path)
    assert back == books and back.layer("fc2").weight_format == Codebook((-7, -1, 2, 5, 96), -3)
    _same_outputs_and_bytes(back, books, path, tmp_path, archive)


def test_a_codebook_alone_makes_version_3(tmp_path):
    net = _with_codebooks(example_network(3), {"fc1": Codebook((-2, 0, 1), 2)})
    doc, arrays = _unpack(hwq.save(net, tmp_path / "c.hwq"))
    assert doc["version"] == 3 and "scale" not in json.dumps(doc)
    assert arrays["fc1.weight"].dtype == np.uint8 and arrays["fc1.weight"].max() <= 2
    assert hwq.load(tmp_path / "c.hwq") == net


def _codebook_in_version_2(doc, arrays):
    _version(2)(doc, arrays)
    for key in ("scale", "scale_format"):  # a version 2 file has no scale either
        _layer(doc, "conv2").pop(key)


def _codebook_kind(fmt: dict):
    return _set("fc2", "weight_format", fmt)


BAD_CODEBOOKS = {
    "index past the entries": (
        _array("fc2.weight", lambda a: _put(a, (2, 3), 5)),
        r"weights.npz: fc2.weight\[2, 3\] = 5 is not an index of codebook5\[-7,-1,2,5,96\].f-3 "
        r"\(0 to 4\)",
    ),
    "negative index": (
        _array("conv2.weight", lambda a: _put(a, (1, 0, 2, 2), -1, np.int16)),
        r"weights.npz: conv2.weight\[1, 0, 2, 2\] = -1 is not an index of codebook8",
    ),
    "huge unsigned index": (
        _array("fc2.weight", lambda a: _put(a, (0, 0), 2**64 - 1, np.uint64)),
        r"fc2.weight\[0, 0\] = 18446744073709551615 is not an index",
    ),
    "float indices": (
        _array("fc2.weight", lambda a: a.astype(np.float32)),
        "weights.npz: fc2.weight has dtype float32; only integer arrays are allowed",
    ),
    "codebook in a version 2 file": (
        _codebook_in_version_2,
        "model.json: layer conv2.weight_format.kind 'codebook' needs version 3",
    ),
    "entries not integers": (
        _codebook_kind({"kind": "codebook", "entries": [-1, 0.5], "frac": 0}),
        r"model.json: layer fc2.weight_format.entries must be integers, not \[-1, 0.5\]",
    ),
    "boolean entry": (
        _codebook_kind({"kind": "codebook", "entries": [False, True], "frac": 0}),
        "entries must be integers",
    ),
    "entries not a list": (
        _codebook_kind({"kind": "codebook", "entries": 3, "frac": 0}),
        r"model.json: layer fc2.weight_format.entries has the wrong type: 3",
    ),
    "unsorted entries": (
        _codebook_kind({"kind": "codebook", "entries": [5, -7, -1, 2, 96], "frac": -3}),
        r"codebook entries must be distinct and increasing, not \[5, -7, -1, 2, 96\]",
    ),
    "one entry": (
        _codebook_kind({"kind": "codebook", "entries": [1], "frac": 0}),
        r"codebook entries must be 2 to 256 integers, not \(1,\)",
    ),
    "no frac": (
        _codebook_kind({"kind": "codebook", "entries": [-7, -1, 2, 5, 96]}),
        "model.json: layer fc2.weight_format has no 'frac'",
    ),
    "unknown kind": (
        _codebook_kind({"kind": "lut", "entries": [0, 1], "frac": 0}),
        "model.json: layer fc2.weight_format.kind 'lut' is not 'fixed', 'pow2', 'codebook' or "
        "'planes'",
    ),
    "codebook scale format": (
        _set("conv2", "scale_format", {"kind": "codebook", "entries": [0, 1], "frac": 0}),
        "model.json: layer conv2.scale_format.kind must be 'fixed', not 'codebook'",
    ),
    "index array shape": (
        _array("fc2.weight", lambda a: a[:, :-1]),
        r"layer fc2: weight has shape \(10, 11\), expected \(10, 12\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CODEBOOKS))
def test_bad_codebooks_are_refused_with_one_line(tmp_path, books, case):
    _refused_with_one_line(tmp_path, books, *BAD_CODEBOOKS[case])


# ---------------------------------------------------------------- version 3 (binary planes)


@pytest.fixture(scope="module")
def planes() -> Network:
    """example_network(4) with 2 planes of 8-bit scales on conv2 and 4 of 16-bit ones on fc2
    (the sums at both ends stored)."""
    rng = np.random.default_rng(4)
    layers = []
    for lyr in example_network(4).layers:
        if lyr.name in ("conv2", "fc2"):
            m, bits = (2, 8) if lyr.name == "conv2" else (4, 16)
            fmt = plane_format(rng, lyr.weight.shape[0], m, bits, frac=bits - 1)
            w = plane_weights(rng, fmt, lyr.weight.shape)
            w[0].flat[:2] = fmt.values()[0, 0], fmt.values()[0, -1]
            lyr = replace(lyr, weight_format=fmt, weight=w)
        layers.append(lyr)
    return replace(example_network(4), layers=tuple(layers))


@pytest.mark.parametrize("archive", [True, False])
def test_planes_round_trip_as_integer_sums_in_version_3(tmp_path, planes, archive):
    path = hwq.save(planes, tmp_path / "p.hwq", archive=archive)
    doc, arrays = _unpack(path) if archive else _unpack_dir(path)
    assert doc["version"] == 3 and "scale" not in {k for ly in doc["layers"] for k in ly}
    fmt = planes.layer("conv2").weight_format
    assert _layer(doc, "conv2")["weight_format"] == {
        "kind": "planes", "scales": [list(r) for r in fmt.scales], "frac": 7,
    }  # fmt: skip
    assert len(_layer(doc, "fc2")["weight_format"]["scales"][0]) == 4
    for name in ("conv2", "fc2"):
        assert np.array_equal(arrays[f"{name}.weight"], planes.layer(name).weight)
    back = hwq.load(path)
    assert back == planes and back.layer("conv2").weight_format == fmt
    _same_outputs_and_bytes(back, planes, path, tmp_path, archive)


def _planes_kind(fmt: dict):
    return _set("conv2", "weight_format", fmt)


BAD_PLANES = {
    "planes in a version 2 file": (
        _version(2),
        "model.json: layer conv2.weight_format.kind 'planes' needs version 3",
    ),
    "a sum no code gives": (
        _array("conv2.weight", lambda a: _put(a, (0, 0, 0, 0), 1, np.int32)),
        r"layer conv2: weight\[0, 0, 0, 0\] = 1 is no signed sum of channel 0's plane scales",
    ),
    "scales not rows": (
        _planes_kind({"kind": "planes", "scales": [1, 2], "frac": 0}),
        r"model.json: layer conv2.weight_format.scales must be rows of integers, not \[1, 2\]",
    ),
    "a row per channel": (
        _planes_kind({"kind": "planes", "scales": [[1, 2]], "frac": 0}),
        "layer conv2: 1 rows of plane scales for 6 channels",
    ),
    "scale too large": (
        _planes_kind({"kind": "planes", "scales": [[1, 2**15]] * 6, "frac": 0}),
        r"plane scale 32768 of channel 0 is outside \[-32768, 32767\]",
    ),
    "no frac": (
        _planes_kind({"kind": "planes", "scales": [[1, 2]] * 6}),
        "model.json: layer conv2.weight_format has no 'frac'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PLANES))
def test_bad_planes_are_refused_with_one_line(tmp_path, planes, case):
    _refused_with_one_line(tmp_path, planes, *BAD_PLANES[case])
