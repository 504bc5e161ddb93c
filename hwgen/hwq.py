"""The ``.hwq`` quantized-model artifact: ``model.json`` + ``weights.npz``, integers only.

A ``.hwq`` is either a directory holding the two files or a zip archive of them
(docs/hwq-format.md). Loading parses JSON and ``.npy`` arrays with pickling disabled,
so it never executes code, and checks every constraint the IR checks plus the declared
shapes. Saving is atomic (temp path, then rename) and byte-deterministic.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hwgen.errors import HwgenError
from hwgen.fsutil import atomic_write_bytes, npz_bytes, zip_bytes
from hwgen.ir import (
    ROUNDINGS,
    ActFormat,
    Add,
    AvgPool2d,
    Codebook,
    Conv2d,
    Fixed,
    Flatten,
    GlobalAvgPool,
    Layer,
    Linear,
    MaxPool2d,
    Network,
    Planes,
    Pow2,
    ReLU,
    SubsamplePad,
    WeightFormat,
)

FORMAT_NAME = "hwq"
FORMAT_VERSION = 3  # versions 1 (a chain) and 2 (a graph, no scale or codebook) are still read
_V1_OPS = (Conv2d, Linear, MaxPool2d, AvgPool2d, ReLU, Flatten)
MODEL_JSON = "model.json"
WEIGHTS_NPZ = "weights.npz"


# ---------------------------------------------------------------- to JSON


def act_to_json(f: ActFormat) -> dict[str, Any]:
    """An ActFormat as JSON: ``bits``, ``frac``, ``signed``, and ``rounding`` if not half_up."""
    d: dict[str, Any] = {"bits": f.bits, "frac": f.frac, "signed": f.signed}
    if f.rounding != "half_up":  # omitted for the default, so older files stay byte-identical
        d["rounding"] = f.rounding
    return d


def _weight_fmt_to_json(f: WeightFormat) -> dict[str, Any]:
    if isinstance(f, Fixed):
        return {"kind": "fixed", "bits": f.bits, "frac": f.frac}
    if isinstance(f, Codebook):
        return {"kind": "codebook", "entries": list(f.entries), "frac": f.frac}
    if isinstance(f, Planes):
        return {"kind": "planes", "scales": [list(r) for r in f.scales], "frac": f.frac}
    return {"kind": "pow2", "bits": f.bits, "emax": f.emax}


def _layer_to_json(layer: Layer, out_shape: tuple[int, ...], v2: bool) -> dict[str, Any]:
    """One layer's object; ``v2``: a version 2 or 3 file (every layer names its inputs)."""
    d: dict[str, Any] = {"name": layer.name}
    if isinstance(layer, Conv2d):
        d |= {
            "op": "conv2d",
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel": list(layer.kernel),
            "stride": list(layer.stride),
            "padding": list(layer.padding),
        }
    elif isinstance(layer, Linear):
        d |= {"op": "linear", "in_features": layer.in_features, "out_features": layer.out_features}
    elif isinstance(layer, (MaxPool2d, AvgPool2d)):
        op = "maxpool2d" if isinstance(layer, MaxPool2d) else "avgpool2d"
        d |= {"op": op, "kernel": list(layer.kernel), "stride": list(layer.stride)}
    elif isinstance(layer, SubsamplePad):
        d |= {"op": "subsample_pad", "stride": list(layer.stride), "pad": list(layer.pad)}
    elif isinstance(layer, Add):
        d |= {"op": "add", "relu": layer.relu, "out_format": act_to_json(layer.out_format)}
    else:
        d["op"] = {ReLU: "relu", Flatten: "flatten", GlobalAvgPool: "global_avgpool"}[type(layer)]
    if isinstance(layer, (Conv2d, Linear)):
        d |= {
            "relu": layer.relu,
            "weight_format": _weight_fmt_to_json(layer.weight_format),
            "out_format": act_to_json(layer.out_format),
            "weight": f"{layer.name}.weight",
            "bias": f"{layer.name}.bias",
        }
        if layer.scale is not None:  # version 3
            d |= {
                "scale_format": _weight_fmt_to_json(layer.scale_format),
                "scale": f"{layer.name}.scale",
            }
    if v2:
        d["inputs"] = list(layer.inputs)
    d["out_shape"] = list(out_shape)
    return d


def _act_formats(net: Network) -> list[ActFormat]:
    """The formats stored in ``model.json``: the input's and each layer's ``out_format``."""
    outs = [lyr.out_format for lyr in net.layers if isinstance(lyr, (Conv2d, Linear, Add))]
    return [net.input_format, *outs]


def _needs_v3(layer: Layer) -> bool:
    if not isinstance(layer, (Conv2d, Linear)):
        return False
    return layer.scale is not None or isinstance(layer.weight_format, (Codebook, Planes))


def to_json(net: Network, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``model.json`` document of a network.

    The lowest version that holds the network: a chain of version 1 ops in half_up rounding
    is written as version 1, byte for byte what earlier hwgen wrote; a network with a
    per-channel scale, codebook or plane weights as version 3; anything else as version 2 (every
    layer names its inputs, the top level its output), since a version 1 reader does not
    know ``rounding``.
    """
    v1 = net.is_chain and all(isinstance(lyr, _V1_OPS) for lyr in net.layers)
    v3 = any(_needs_v3(lyr) for lyr in net.layers)
    v2 = v3 or not (v1 and all(f.rounding == "half_up" for f in _act_formats(net)))
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": 3 if v3 else 2 if v2 else 1,
        "name": net.name,
        "input": {"shape": list(net.input_shape), "format": act_to_json(net.input_format)},
        "layers": [_layer_to_json(lyr, net.shapes[lyr.name], v2) for lyr in net.layers],
    }
    if v2:
        doc["output"] = net.output
    doc["meta"] = meta or {}
    return doc


def _smallest_int_dtype(a: np.ndarray) -> np.dtype:
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if a.size == 0 or (a.min() >= info.min and a.max() <= info.max):
            return np.dtype(dt)
    return np.dtype(np.int64)


def save(
    net: Network,
    path: str | os.PathLike,
    *,
    archive: bool = True,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``net`` to ``path``: a zip archive (default) or a directory. Atomic."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for layer in net.layers:
        if isinstance(layer, (Conv2d, Linear)):
            named = [(f"{layer.name}.bias", layer.bias)]
            if layer.scale is not None:
                named.append((f"{layer.name}.scale", layer.scale))
            if isinstance(layer.weight_format, Codebook):  # indices, not values
                arrays[f"{layer.name}.weight"] = layer.weight_format.indices(layer.weight).astype(
                    np.uint8
                )
            else:
                named.append((f"{layer.name}.weight", layer.weight))
            for key, a in named:
                arrays[key] = a.astype(_smallest_int_dtype(a))
    files = {
        MODEL_JSON: (json.dumps(to_json(net, meta), indent=2) + "\n").encode(),
        WEIGHTS_NPZ: npz_bytes(arrays),
    }
    if archive:
        if path.is_dir():
            shutil.rmtree(path)
        return atomic_write_bytes(path, zip_bytes(files))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        target = tmp / "dir"
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------- from JSON


class _Doc:
    """Typed access to one JSON object, with errors that say where in model.json."""

    def __init__(self, d: object, where: str) -> None:
        if not isinstance(d, dict):
            raise HwgenError(f"model.json: {where} must be an object, not {type(d).__name__}")
        self.d, self.where = d, where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.d:
            if default is ...:
                raise HwgenError(f"model.json: {self.where} has no '{key}'")
            return default
        v = self.d[key]
        ok = isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, (int,)))
        if not ok:
            raise HwgenError(f"model.json: {self.where}.{key} has the wrong type: {v!r}")
        return v

    def ints(self, key: str, n: int) -> tuple[int, ...]:
        v = self.get(key, list)
        if len(v) != n or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise HwgenError(f"model.json: {self.where}.{key} must be {n} integers, not {v!r}")
        return tuple(v)


def _act_from_json(d: object, where: str, v2: bool) -> ActFormat:
    doc = _Doc(d, where)
    rounding = doc.get("rounding", str, "half_up")
    if rounding not in ROUNDINGS:
        raise HwgenError(
            f"model.json: {where}.rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}"
        )
    if rounding != "half_up" and not v2:
        raise HwgenError(f"model.json: {where}.rounding {rounding!r} needs version 2")
    bits, frac, signed = doc.get("bits", int), doc.get("frac", int), doc.get("signed", bool)
    return ActFormat(bits, frac, signed, rounding)


def _weight_fmt_from_json(d: object, where: str, version: int) -> WeightFormat:
    doc = _Doc(d, where)
    kind = doc.get("kind", str)
    if kind == "fixed":
        return Fixed(doc.get("bits", int), doc.get("frac", int))
    if kind == "pow2":
        return Pow2(doc.get("bits", int), doc.get("emax", int))
    if kind == "codebook":
        if version < 3:
            raise HwgenError(f"model.json: {where}.kind 'codebook' needs version 3")
        entries = doc.get("entries", list)
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in entries):
            raise HwgenError(f"model.json: {where}.entries must be integers, not {entries!r}")
        return Codebook(tuple(entries), doc.get("frac", int))
    if kind == "planes":
        if version < 3:
            raise HwgenError(f"model.json: {where}.kind 'planes' needs version 3")
        rows = doc.get("scales", list)
        if not all(
            isinstance(r, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
            for r in rows
        ):
            raise HwgenError(f"model.json: {where}.scales must be rows of integers, not {rows!r}")
        return Planes(tuple(tuple(r) for r in rows), doc.get("frac", int))
    raise HwgenError(
        f"model.json: {where}.kind {kind!r} is not 'fixed', 'pow2', 'codebook' or 'planes'"
    )


def _weights(arrays: dict[str, np.ndarray], doc: _Doc, fmt: WeightFormat) -> np.ndarray:
    """A MAC layer's integer weights: the array itself, or a codebook's entries at the
    stored indices."""
    a = _array(arrays, doc, "weight")
    if not isinstance(fmt, Codebook):
        return a
    n = len(fmt.entries)
    bad = np.flatnonzero((a < 0) | (a >= n))
    if bad.size:
        idx = tuple(int(i) for i in np.unravel_index(bad[0], a.shape))
        raise HwgenError(
            f"weights.npz: {doc.d['weight']}{list(idx)} = {a[idx]} is not an index of "
            f"{fmt} (0 to {n - 1})"
        )
    return np.asarray(fmt.entries, np.int64)[a.astype(np.int64)]


def _array(arrays: dict[str, np.ndarray], doc: _Doc, key: str) -> np.ndarray:
    name = doc.get(key, str)
    if name not in arrays:
        raise HwgenError(f"weights.npz has no array {name!r} ({doc.where}.{key})")
    a = arrays[name]
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise HwgenError(f"weights.npz: {name} contains NaN or Inf")
    if a.dtype.kind not in "iu":
        raise HwgenError(
            f"weights.npz: {name} has dtype {a.dtype}; only integer arrays are allowed"
        )
    return a


def _inputs(doc: _Doc, v2: bool) -> tuple[str, ...]:
    if not v2:
        return ()  # version 1: each layer reads the one before it
    v = doc.get("inputs", list)
    if not v or not all(isinstance(i, str) for i in v):
        raise HwgenError(f"model.json: {doc.where}.inputs must be layer names, not {v!r}")
    return tuple(v)


_MAC_KEYS = {"relu", "weight_format", "out_format", "weight", "bias"}
_SCALE_KEYS = {"scale", "scale_format"}  # version 3
_KEYS = {  # per op, beyond name, op, inputs and out_shape
    "conv2d": {"in_channels", "out_channels", "kernel", "stride", "padding"} | _MAC_KEYS,
    "linear": {"in_features", "out_features"} | _MAC_KEYS,
    "maxpool2d": {"kernel", "stride"},
    "avgpool2d": {"kernel", "stride"},
    "subsample_pad": {"stride", "pad"},
    "add": {"relu", "out_format"},
    "relu": set(),
    "flatten": set(),
    "global_avgpool": set(),
}


def _scale_from_json(
    doc: _Doc, arrays: dict[str, np.ndarray]
) -> tuple[np.ndarray | None, Fixed | None]:
    """A MAC layer's (scale, scale_format): both or neither (version 3)."""
    present = sorted(_SCALE_KEYS & set(doc.d))
    if not present:
        return None, None
    if len(present) == 1:
        missing = (_SCALE_KEYS - set(present)).pop()
        raise HwgenError(f"model.json: {doc.where} has '{present[0]}' but no '{missing}'")
    where = f"{doc.where}.scale_format"
    fmt = _weight_fmt_from_json(doc.get("scale_format", dict), where, 3)
    if not isinstance(fmt, Fixed):
        raise HwgenError(
            f"model.json: {where}.kind must be 'fixed', not {doc.d['scale_format']['kind']!r}"
        )
    return _array(arrays, doc, "scale"), fmt


def _layer_from_json(d: object, i: int, arrays: dict[str, np.ndarray], version: int) -> Layer:
    v2 = version >= 2
    doc = _Doc(d, f"layers[{i}]")
    name = doc.get("name", str)
    doc.where = f"layer {name}"
    op = doc.get("op", str)
    if not v2 and op in ("add", "global_avgpool", "subsample_pad"):
        raise HwgenError(f"model.json: layer {name} has op {op!r}, which needs version 2")
    if v2 and op in _KEYS:
        # Version 2 readers refuse what they do not know, so later keys cannot be misread.
        mac = op in ("conv2d", "linear")
        known = _KEYS[op] | (_SCALE_KEYS if mac and version >= 3 else set())
        unknown = sorted(set(doc.d) - known - {"name", "op", "inputs", "out_shape"})
        if unknown:
            raise HwgenError(f"model.json: layer {name} has unknown key {unknown[0]!r}")
    inputs = _inputs(doc, v2)
    if op in ("conv2d", "linear"):
        if version < 3 and _SCALE_KEYS & set(doc.d):  # version 1 ignores unknown keys
            key = min(_SCALE_KEYS & set(doc.d))
            raise HwgenError(f"model.json: layer {name} has '{key}', which needs version 3")
        scale, scale_format = _scale_from_json(doc, arrays)
        wfmt = _weight_fmt_from_json(
            doc.get("weight_format", dict), f"{doc.where}.weight_format", version
        )
    if op == "conv2d":
        return Conv2d(
            name,
            doc.get("in_channels", int),
            doc.get("out_channels", int),
            doc.ints("kernel", 2),
            wfmt,
            _act_from_json(doc.get("out_format", dict), f"{doc.where}.out_format", v2),
            _weights(arrays, doc, wfmt),
            _array(arrays, doc, "bias"),
            stride=doc.ints("stride", 2),
            padding=doc.ints("padding", 2),
            relu=doc.get("relu", bool),
            inputs=inputs,
            scale=scale,
            scale_format=scale_format,
        )
    if op == "linear":
        return Linear(
            name,
            doc.get("in_features", int),
            doc.get("out_features", int),
            wfmt,
            _act_from_json(doc.get("out_format", dict), f"{doc.where}.out_format", v2),
            _weights(arrays, doc, wfmt),
            _array(arrays, doc, "bias"),
            relu=doc.get("relu", bool),
            inputs=inputs,
            scale=scale,
            scale_format=scale_format,
        )
    pools: dict[str, Callable[..., Layer]] = {"maxpool2d": MaxPool2d, "avgpool2d": AvgPool2d}
    if op in pools:
        return pools[op](name, doc.ints("kernel", 2), doc.ints("stride", 2), inputs=inputs)
    if op == "subsample_pad":
        return SubsamplePad(name, doc.ints("stride", 2), doc.ints("pad", 2), inputs=inputs)
    if op == "add":
        out_format = _act_from_json(doc.get("out_format", dict), f"{doc.where}.out_format", v2)
        return Add(name, out_format, inputs, relu=doc.get("relu", bool))
    simple: dict[str, Callable[..., Layer]] = {
        "relu": ReLU, "flatten": Flatten, "global_avgpool": GlobalAvgPool,
    }  # fmt: skip
    if op in simple:
        return simple[op](name, inputs=inputs)
    raise HwgenError(f"model.json: layer {name} has unknown op {op!r}")


def from_json(model: object, arrays: dict[str, np.ndarray]) -> Network:
    """Build and check a network from a parsed ``model.json`` and its arrays."""
    doc = _Doc(model, "the top level")
    if doc.get("format", str) != FORMAT_NAME:
        raise HwgenError(f"model.json: format is {doc.d['format']!r}, not {FORMAT_NAME!r}")
    version = doc.get("version", int)
    if version not in range(1, FORMAT_VERSION + 1):
        raise HwgenError(
            f"model.json: unknown format version {version} (this hwgen reads 1 to {FORMAT_VERSION})"
        )
    v2 = version >= 2
    inp = _Doc(doc.get("input", dict), "input")
    raw_layers = doc.get("layers", list)
    layers = [_layer_from_json(d, i, arrays, version) for i, d in enumerate(raw_layers)]
    shape = inp.get("shape", list)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise HwgenError(f"model.json: input.shape must be integers, not {shape!r}")
    net = Network(
        tuple(shape),
        _act_from_json(inp.get("format", dict), "input.format", v2),
        tuple(layers),
        doc.get("name", str, "net"),
    )
    if v2 and doc.get("output", str) != net.output:
        raise HwgenError(
            f"model.json: output is {doc.d['output']!r}, but the last layer is {net.output!r} "
            "(layers are in topological order; every other layer feeds a later one)"
        )
    for layer, d in zip(net.layers, raw_layers, strict=True):
        shape = net.shapes[layer.name]
        ldoc = _Doc(d, f"layer {layer.name}")
        declared = ldoc.ints("out_shape", len(ldoc.get("out_shape", list)))
        if declared != shape:
            raise HwgenError(
                f"model.json: layer {layer.name} declares out_shape {list(declared)}, "
                f"but its input gives {list(shape)}"
            )
    return net


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    if not data.startswith(b"PK"):  # np.load would take anything else for a pickle
        raise HwgenError("weights.npz is not a valid .npz file (not a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as e:  # object arrays need pickling, which is refused
        raise HwgenError(f"weights.npz: unreadable array ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error) as e:
        raise HwgenError(f"weights.npz is not a valid .npz file ({e})") from None


def read_files(path: Path) -> tuple[bytes, bytes]:
    """The raw ``model.json`` and ``weights.npz`` of a ``.hwq`` directory or zip."""
    if path.is_dir():
        out = []
        for name in (MODEL_JSON, WEIGHTS_NPZ):
            if not (path / name).is_file():
                raise HwgenError(f"{path}: missing {name}")
            out.append((path / name).read_bytes())
        return out[0], out[1]
    if not path.exists():
        raise HwgenError(f"{path}: no such file or directory")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for name in (MODEL_JSON, WEIGHTS_NPZ):
                if name not in names:
                    raise HwgenError(f"{path}: missing {name}")
            return zf.read(MODEL_JSON), zf.read(WEIGHTS_NPZ)
    except (zipfile.BadZipFile, OSError, NotImplementedError, zlib.error) as e:
        raise HwgenError(f"{path}: not a .hwq directory or zip archive ({e})") from None


def load(path: str | os.PathLike) -> Network:
    """Read and fully check a ``.hwq``; any problem raises a one-line HwgenError."""
    path = Path(path)
    model_bytes, weights_bytes = read_files(path)
    try:
        model = json.loads(model_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HwgenError(f"{path}: model.json is not valid JSON ({e})") from None
    return from_json(model, _read_npz(weights_bytes))


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The free-form ``meta`` object of a ``.hwq`` (scheme, source, accuracy...)."""
    model = json.loads(read_files(Path(path))[0])
    return model.get("meta", {}) if isinstance(model, dict) else {}
