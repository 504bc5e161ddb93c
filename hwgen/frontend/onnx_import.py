"""ONNX importer: a sequential ONNX graph becomes a :class:`FloatNet`.

Supported ops: Conv, Gemm, MatMul (+ Add as its bias), Relu, MaxPool, AveragePool,
Flatten, Reshape (only as a flatten), BatchNormalization (folded into the Conv/Gemm
before it), Dropout and Identity (dropped); weights come from initializers or Constant
nodes. The small shape subgraphs that ``torch.onnx.export`` writes for
``x.view(x.size(0), -1)`` (Shape, Gather, Unsqueeze, Squeeze, Concat, Cast) are
evaluated as constants. The input must have a static shape apart from the batch
dimension. Every node's op type is checked before anything is converted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hwgen.errors import HwgenError
from hwgen.frontend.chain import ChainBuilder, identifier
from hwgen.frontend.graph import FloatNet

_DATA_OPS = {
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Relu",
    "MaxPool",
    "AveragePool",
    "Flatten",
    "Reshape",
    "BatchNormalization",
    "Dropout",
    "Identity",
}
_CONST_OPS = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast"}
_BATCH = 7919  # stands for a symbolic batch size while shape subgraphs are evaluated


def _where(node: onnx.NodeProto) -> str:
    return f"node '{node.name or node.output[0]}'"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _layer_path(node: onnx.NodeProto) -> str:
    """torch.onnx names nodes by module scope, ``/features/features.0/Conv``: keep the module."""
    parts = [p for p in node.name.split("/") if p]
    if not parts:
        return node.op_type.lower()
    if node.name.startswith("/"):
        return parts[-2] if len(parts) >= 2 else parts[-1].lower()
    return node.name


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise HwgenError(f"model {path}: no such file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise HwgenError(f"model {path}: not a valid ONNX model ({first})") from None
    except Exception:  # protobuf DecodeError and friends: the file is not ONNX
        raise HwgenError(
            f"model {path}: not a readable ONNX file (corrupt or truncated?)"
        ) from None
    return model


def _input_shape(graph: onnx.GraphProto) -> tuple[str, tuple[int, ...], int]:
    """The one real input: its name, per-image shape and batch size (_BATCH if symbolic)."""
    init = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    if len(inputs) != 1:
        raise HwgenError(f"the model must take one input tensor, it takes {len(inputs)}")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if not inp.type.tensor_type.HasField("shape") or len(dims) not in (2, 4):
        raise HwgenError(
            f"input '{inp.name}' must have a known NCHW or NF shape, "
            f"it has {len(dims) if inp.type.tensor_type.HasField('shape') else 'no'} dimensions"
        )
    shape = []
    for d in dims[1:]:
        if not d.HasField("dim_value") or d.dim_value < 1:
            raise HwgenError(
                f"input '{inp.name}' has a dynamic or unknown shape "
                f"{[d.dim_param or d.dim_value or '?' for d in dims]}: only the batch "
                "dimension may be dynamic (export with a fixed input size)"
            )
        shape.append(d.dim_value)
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else _BATCH
    return inp.name, tuple(shape), batch


def _pads(
    node: onnx.NodeProto,
    a: dict[str, Any],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    hw: tuple[int, ...],
) -> tuple[int, int]:
    """Symmetric (top/bottom, left/right) zero padding from ``pads`` or ``auto_pad``."""
    auto = _text(a.get("auto_pad", "NOTSET"))
    if auto == "VALID":
        return (0, 0)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [
            max((math.ceil(n / s) - 1) * s + k - n, 0)
            for n, s, k in zip(hw, stride, kernel, strict=True)
        ]
        pads = [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2]
    else:
        pads = list(a.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise HwgenError(
            f"unsupported asymmetric padding {pads} at {_where(node)} ({node.op_type})"
        )
    return (pads[0], pads[1])


class _Converter:
    """Walks the nodes in order, keeping the current data tensor and the known constants."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        name, shape, self.batch = _input_shape(graph)
        self.x = name
        self.b = ChainBuilder(shape)
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def const(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
        """Input ``i`` of ``node`` as a constant (None if absent)."""
        if i >= len(node.input) or not node.input[i]:
            return None
        if node.input[i] not in self.consts:
            raise HwgenError(f"{node.op_type} {_where(node)}: its {what} must be a constant")
        return self.consts[node.input[i]]

    def data_input(self, node: onnx.NodeProto) -> None:
        """Check the node reads the current data tensor (the graph is a chain)."""
        if not node.input or node.input[0] != self.x:
            raise HwgenError(
                f"the model is not a sequential chain: {_where(node)} ({node.op_type}) "
                f"does not take '{self.x}' as its input"
            )

    def full_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.b.shape)

    def run(self) -> None:
        for node in self.graph.node:
            if node.op_type in _CONST_OPS or (
                node.op_type == "Identity" and node.input[0] in self.consts
            ):
                self.consts[node.output[0]] = self.constant(node)
                continue
            if node.op_type == "Add" and len(node.input) == 2 and node.input[0] in self.consts:
                node = onnx.helper.make_node(  # commutative: data input first
                    "Add", [node.input[1], node.input[0]], list(node.output), name=node.name
                )
            self.data_input(node)
            used = [o for o in node.output[1:] if o and self.used(o)]
            if used:
                raise HwgenError(
                    f"unsupported use of output '{used[0]}' of {_where(node)} ({node.op_type})"
                )
            self.convert(node)
            self.x = node.output[0]
        outs = [o.name for o in self.graph.output]
        if outs != [self.x]:
            raise HwgenError(
                f"the model must return one tensor, the chain's last; it returns {outs}"
            )

    def used(self, name: str) -> bool:
        return any(name in n.input for n in self.graph.node) or any(
            o.name == name for o in self.graph.output
        )

    def constant(self, node: onnx.NodeProto) -> np.ndarray:
        a = _attrs(node)
        op = node.op_type
        if op == "Constant":
            if "value" not in a:
                raise HwgenError(f"unsupported Constant form at {_where(node)}")
            return numpy_helper.to_array(a["value"])
        if op == "Shape":
            if node.input[0] != self.x:
                raise HwgenError(f"unsupported Shape of '{node.input[0]}' at {_where(node)}")
            return np.array(self.full_shape(), dtype=np.int64)[a.get("start", 0) : a.get("end")]
        data = self.const(node, 0, "input")
        assert data is not None
        if op in ("Identity", "Cast"):
            return data
        if op == "Gather":
            idx = self.const(node, 1, "indices")
            return np.take(data, idx, axis=a.get("axis", 0))
        if op in ("Unsqueeze", "Squeeze"):
            axes = a.get("axes")
            if axes is None:
                axes = self.const(node, 1, "axes")
            if op == "Squeeze":
                return np.squeeze(data, axis=None if axes is None else tuple(int(i) for i in axes))
            return np.expand_dims(data, tuple(int(i) for i in axes))
        parts = [self.const(node, i, "input") for i in range(len(node.input))]  # Concat
        return np.concatenate([p for p in parts if p is not None], axis=a["axis"])

    def convert(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        where, path = _where(node), _layer_path(node)
        op = node.op_type
        if op == "Conv":
            w = self.const(node, 1, "weight")
            assert w is not None
            if w.ndim != 4:
                raise HwgenError(f"unsupported Conv with {w.ndim - 2} spatial dims at {where}")
            if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
                raise HwgenError(
                    f"unsupported Conv setting group={a.get('group', 1)} "
                    f"dilations={a.get('dilations', [1, 1])} at {where}"
                )
            kernel = (int(w.shape[2]), int(w.shape[3]))
            stride = tuple(a.get("strides", [1, 1]))
            pads = _pads(node, a, kernel, stride, self.b.shape[1:])
            self.b.conv(path, w, self.const(node, 2, "bias"), stride, pads)
        elif op == "Gemm":
            if a.get("transA", 0):
                raise HwgenError(f"unsupported Gemm with transA=1 at {where}")
            w = self.const(node, 1, "weight")
            assert w is not None
            if w.ndim != 2:
                raise HwgenError(f"unsupported Gemm with a {w.ndim}-D weight at {where}")
            w = w if a.get("transB", 0) else w.T
            c = self.const(node, 2, "bias")
            bias = None
            if c is not None:
                if c.size not in (1, w.shape[0]):
                    raise HwgenError(f"unsupported Gemm bias of shape {c.shape} at {where}")
                bias = np.broadcast_to(c.reshape(-1), (w.shape[0],)) * a.get("beta", 1.0)
            self.b.linear(path, w * a.get("alpha", 1.0), bias)
        elif op == "MatMul":
            w = self.const(node, 1, "weight")
            assert w is not None
            if w.ndim != 2:
                raise HwgenError(f"unsupported MatMul with a {w.ndim}-D weight at {where}")
            self.b.linear(path, w.T, None)
        elif op == "Add":
            bias = self.const(node, 1, "second operand")
            assert bias is not None
            self.b.add_bias(path, bias)
        elif op == "Relu":
            self.b.relu(path)
        elif op in ("MaxPool", "AveragePool"):
            self.pool(node, a, path)
        elif op in ("Flatten", "Reshape"):
            self.flatten(node, a, path)
        elif op == "BatchNormalization":
            if a.get("training_mode", 0):
                raise HwgenError(f"unsupported BatchNormalization in training mode at {where}")
            stats = [self.const(node, i, "parameters") for i in range(1, 5)]
            gamma, beta, mean, var = (np.asarray(s, np.float64) for s in stats)
            kind = "BatchNormalization"
            self.b.batchnorm(path, kind, gamma, beta, mean, var, float(a.get("epsilon", 1e-5)))
        elif op == "Dropout":
            mode = self.const(node, 2, "training_mode")
            if mode is not None and bool(mode):
                raise HwgenError(f"unsupported Dropout in training mode at {where}")
        # Identity on the data tensor: nothing to do

    def pool(self, node: onnx.NodeProto, a: dict[str, Any], path: str) -> None:
        kind = "MaxPool2d" if node.op_type == "MaxPool" else "AvgPool2d"
        kernel = tuple(a.get("kernel_shape", []))
        if len(kernel) != 2:
            raise HwgenError(f"unsupported {node.op_type} kernel {list(kernel)} at {_where(node)}")
        stride = tuple(a.get("strides", [1, 1]))
        bad = {k: a[k] for k in ("ceil_mode", "dilations") if k in a and a[k] not in (0, [1, 1])}
        if _pads(node, a, kernel, stride, self.b.shape[1:]) != (0, 0):
            bad["pads"] = a.get("pads", a.get("auto_pad"))
        if bad:
            settings = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise HwgenError(f"unsupported {node.op_type} setting {settings} at {_where(node)}")
        self.b.pool(path, kind, kernel, stride)

    def flatten(self, node: onnx.NodeProto, a: dict[str, Any], path: str) -> None:
        shape = self.full_shape()
        n_features = math.prod(shape[1:])
        if node.op_type == "Flatten":
            ok = a.get("axis", 1) == 1
            target = [shape[0], n_features]
        else:
            t = self.const(node, 1, "target shape")
            assert t is not None
            target = [int(v) for v in t]
            if not a.get("allowzero", 0):
                target = [
                    shape[i] if v == 0 and i < len(shape) else v for i, v in enumerate(target)
                ]
            ok = len(target) == 2 and (
                (target[0] == shape[0] and target[1] in (-1, n_features))
                or (target[0] == -1 and target[1] == n_features)
            )
        if not ok:
            raise HwgenError(
                f"unsupported {node.op_type} at {_where(node)}: only flattening "
                f"(N, ...) -> (N, {n_features}) is supported, not to {target}"
            )
        self.b.flatten(path)


_PLUMBING = frozenset(
    {
        "Expand",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Slice",
        "Cast",
        "ConstantOfShape",
        "Constant",
        "Transpose",
        "Range",
        "Where",
    }
)


def _check_ops(graph: onnx.GraphProto) -> None:
    bad = [
        node
        for node in graph.node
        if node.domain not in ("", "ai.onnx") or node.op_type not in _DATA_OPS | _CONST_OPS
    ]
    if bad:
        # Name the layer the user wrote (an LSTM), not the shape plumbing around it (Expand).
        worst = min(bad, key=lambda n: n.op_type in _PLUMBING)
        op = worst.op_type if worst.domain in ("", "ai.onnx") else f"{worst.domain}.{worst.op_type}"
        more = f" (and {len(bad) - 1} more unsupported nodes)" if len(bad) > 1 else ""
        raise HwgenError(f"unsupported op {op} at {_where(worst)}{more}")


def from_onnx(path: str | Path, name: str | None = None) -> FloatNet:
    """Import an ONNX file as a float graph; ``name`` defaults to the file's stem."""
    path = Path(path)
    model = _load(path)
    _check_ops(model.graph)
    conv = _Converter(model.graph)
    conv.run()
    return conv.b.finish(name or identifier(path.stem, "net"))
