"""ONNX importer: an ONNX graph becomes a :class:`FloatNet`.

Supported ops: Conv, Gemm, MatMul (+ Add of a constant as its bias), Add of two tensors
(a residual join), Relu, MaxPool, AveragePool, GlobalAveragePool, ReduceMean over H and W
(a global average pool), Slice with steps on H and W and Pad of the channel axis with zeros
(the option-A ResNet shortcut), Flatten, Reshape (only as a flatten), BatchNormalization
(folded into the Conv/Gemm before it), Dropout and Identity (dropped). A tensor may feed
several ops. Weights come from initializers or Constant nodes. Nodes whose inputs are all
constant (the shape and pad arithmetic ``torch.onnx.export`` writes, e.g. for
``x.view(x.size(0), -1)`` or ``F.pad``: Shape, Gather, Unsqueeze, Concat, Slice, ...) are
evaluated as constants. The input must have a static shape apart from the batch dimension.
Every node's op type is checked before anything is converted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hwgen.errors import HwgenError
from hwgen.frontend.builder import INPUT, GraphBuilder, identifier
from hwgen.frontend.graph import FloatNet

_DATA_OPS = {
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Relu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Slice",
    "Pad",
    "Flatten",
    "Reshape",
    "BatchNormalization",
    "Dropout",
    "Identity",
}
# Evaluated when every input is constant (the exporter's shape and pad arithmetic).
_CONST_OPS = {
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "ConstantOfShape",
    "Reshape",
    "Slice",
    "Transpose",
    "Identity",
    "Add",
    "Sub",
    "Mul",
    "Div",
}
_BATCH = 7919  # stands for a symbolic batch size while shape subgraphs are evaluated


def _where(node: onnx.NodeProto) -> str:
    return f"node '{node.name or node.output[0]}'"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _layer_path(node: onnx.NodeProto) -> str:
    """torch.onnx names nodes by module scope, ``/layers/layers.0/conv1/Conv``: the module's
    path (``layers.0.conv1``); a node outside any module by its op (``/Relu``: ``relu``)."""
    if not node.name.startswith("/"):
        return node.name or node.op_type.lower()
    path, prev = "", ""
    for part in [p for p in node.name.split("/") if p][:-1]:
        # a Sequential's child is named "<the Sequential's scope>.<index>"
        rel = part[len(prev) + 1 :] if prev and part.startswith(prev + ".") else part
        path, prev = f"{path}.{rel}" if path else rel, part
    return path or node.op_type.lower()


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
    """Walks the nodes in order: constants are evaluated, data ops handed to the builder."""

    def __init__(self, graph: onnx.GraphProto, const: set[str]) -> None:
        self.graph = graph
        name, shape, self.batch = _input_shape(graph)
        self.b = GraphBuilder(shape)
        self.handles = {name: INPUT}  # data tensor -> builder handle
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.const_tensors = const

    def const(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
        """Input ``i`` of ``node`` as a constant (None if absent)."""
        if i >= len(node.input) or not node.input[i]:
            return None
        if node.input[i] not in self.consts:
            raise HwgenError(f"{node.op_type} {_where(node)}: its {what} must be a constant")
        return self.consts[node.input[i]]

    def data(self, node: onnx.NodeProto, i: int = 0) -> str:
        """The builder handle of data input ``i``."""
        return self.handles[node.input[i]]

    def full_shape(self, x: str) -> tuple[int, ...]:
        return (self.batch, *self.b.shape(x))

    def run(self, name: str) -> FloatNet:
        for node in self.graph.node:
            if node.output[0] in self.const_tensors:
                self.consts[node.output[0]] = self.constant(node)
                continue
            used = [o for o in node.output[1:] if o and self.used(o)]
            if used:
                raise HwgenError(
                    f"unsupported use of output '{used[0]}' of {_where(node)} ({node.op_type})"
                )
            self.handles[node.output[0]] = self.convert(node)
        outs = [o.name for o in self.graph.output]
        if len(outs) != 1 or outs[0] not in self.handles:
            raise HwgenError(f"the model must return one tensor it computes; it returns {outs}")
        return self.b.finish(name, self.handles[outs[0]])

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
            if node.input[0] in self.handles:
                shape = self.full_shape(self.handles[node.input[0]])
            else:
                shape = np.shape(self.consts[node.input[0]])
            return np.array(shape, dtype=np.int64)[a.get("start", 0) : a.get("end")]
        args = [self.const(node, i, "input") for i in range(len(node.input))]
        data = args[0]
        assert data is not None
        if op in ("Identity", "Cast"):  # integer shape arithmetic: no cast needed
            return data
        if op == "Div":  # integer Div truncates
            q = data / args[1]
            return np.trunc(q).astype(data.dtype) if data.dtype.kind in "iu" else q
        if op in ("Add", "Sub", "Mul"):
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](data, args[1])
        if op == "Gather":
            return np.take(data, args[1], axis=a.get("axis", 0))
        if op in ("Unsqueeze", "Squeeze"):
            axes = a.get("axes", args[1] if len(args) > 1 else None)
            if op == "Squeeze":
                return np.squeeze(data, axis=None if axes is None else tuple(int(i) for i in axes))
            return np.expand_dims(data, tuple(int(i) for i in axes))
        if op == "Concat":
            return np.concatenate([p for p in args if p is not None], axis=a["axis"])
        if op == "ConstantOfShape":
            value = a["value"] if "value" in a else onnx.helper.make_tensor("v", 1, [1], [0.0])
            return np.full(tuple(int(d) for d in data), numpy_helper.to_array(value).reshape(-1)[0])
        if op == "Reshape":
            shape = [
                d if d != 0 or a.get("allowzero", 0) else data.shape[i]
                for i, d in enumerate(args[1])
            ]
            return data.reshape(shape)
        if op == "Transpose":
            return np.transpose(data, a.get("perm"))
        # Slice
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
            index[int(ax)] = slice(int(s), int(e), int(st))
        return data[tuple(index)]

    def convert(self, node: onnx.NodeProto) -> str:
        """Hand a data op to the builder; returns the handle of its output."""
        a = _attrs(node)
        where, path = _where(node), _layer_path(node)
        op = node.op_type
        if op == "Add" and node.input[0] not in self.handles:  # commutative: data first
            node = onnx.helper.make_node(
                "Add", [node.input[1], node.input[0]], list(node.output), name=node.name
            )
        x = self.data(node)
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
            pads = _pads(node, a, kernel, stride, self.b.shape(x)[1:])
            return self.b.conv(path, x, w, self.const(node, 2, "bias"), stride, pads)
        if op == "Gemm":
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
            return self.b.linear(path, x, w * a.get("alpha", 1.0), bias)
        if op == "MatMul":
            w = self.const(node, 1, "weight")
            assert w is not None
            if w.ndim != 2:
                raise HwgenError(f"unsupported MatMul with a {w.ndim}-D weight at {where}")
            return self.b.linear(path, x, w.T, None)
        if op == "Add":
            if node.input[1] in self.handles:
                return self.b.add(path, x, self.data(node, 1))
            bias = self.const(node, 1, "second operand")
            assert bias is not None
            return self.b.add_bias(path, x, bias)
        if op == "Relu":
            return self.b.relu(path, x)
        if op in ("MaxPool", "AveragePool"):
            return self.pool(node, a, path, x)
        if op in ("GlobalAveragePool", "ReduceMean"):
            return self.global_pool(node, a, path, x)
        if op == "Slice":
            return self.subsample(node, a, path, x)
        if op == "Pad":
            return self.pad(node, a, path, x)
        if op in ("Flatten", "Reshape"):
            return self.flatten(node, a, path, x)
        if op == "BatchNormalization":
            if a.get("training_mode", 0):
                raise HwgenError(f"unsupported BatchNormalization in training mode at {where}")
            stats = [self.const(node, i, "parameters") for i in range(1, 5)]
            gamma, beta, mean, var = (np.asarray(s, np.float64) for s in stats)
            eps = float(a.get("epsilon", 1e-5))
            return self.b.batchnorm(path, x, "BatchNormalization", gamma, beta, mean, var, eps)
        if op == "Dropout":
            mode = self.const(node, 2, "training_mode")
            if mode is not None and bool(mode):
                raise HwgenError(f"unsupported Dropout in training mode at {where}")
        return x  # Dropout, Identity

    def pool(self, node: onnx.NodeProto, a: dict[str, Any], path: str, x: str) -> str:
        kind = "MaxPool2d" if node.op_type == "MaxPool" else "AvgPool2d"
        kernel = tuple(a.get("kernel_shape", []))
        if len(kernel) != 2:
            raise HwgenError(f"unsupported {node.op_type} kernel {list(kernel)} at {_where(node)}")
        stride = tuple(a.get("strides", [1, 1]))
        bad = {k: a[k] for k in ("ceil_mode", "dilations") if k in a and a[k] not in (0, [1, 1])}
        if _pads(node, a, kernel, stride, self.b.shape(x)[1:]) != (0, 0):
            bad["pads"] = a.get("pads", a.get("auto_pad"))
        if bad:
            settings = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise HwgenError(f"unsupported {node.op_type} setting {settings} at {_where(node)}")
        return self.b.pool(path, x, kind, kernel, stride)

    def global_pool(self, node: onnx.NodeProto, a: dict[str, Any], path: str, x: str) -> str:
        """GlobalAveragePool, or ReduceMean over H and W (axes an attribute or, opset 18+,
        an input)."""
        keep = True
        if node.op_type == "ReduceMean":
            axes = a.get("axes")
            if axes is None:
                axes = self.const(node, 1, "axes")
            rank = len(self.full_shape(x))
            got = sorted(int(i) % rank for i in (axes if axes is not None else []))
            if rank != 4 or got != [2, 3]:
                raise HwgenError(
                    f"unsupported ReduceMean over axes {None if axes is None else list(axes)} "
                    f"at {_where(node)} (only over (2, 3): global average pooling)"
                )
            keep = bool(a.get("keepdims", 1))
        g = self.b.global_pool(path, x)
        return g if keep else self.b.flatten(path, g)

    def subsample(self, node: onnx.NodeProto, a: dict[str, Any], path: str, x: str) -> str:
        """Slice that keeps every sh-th row and sw-th column: ``x[:, :, ::sh, ::sw]``."""
        shape = self.full_shape(x)
        if "starts" in a:  # opset < 10
            starts, ends, axes = a["starts"], a["ends"], a.get("axes")
            steps = None
        else:
            starts, ends = self.const(node, 1, "starts"), self.const(node, 2, "ends")
            axes, steps = self.const(node, 3, "axes"), self.const(node, 4, "steps")
        assert starts is not None and ends is not None
        axes = range(len(starts)) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        stride = [1] * len(shape)
        ok = len(shape) == 4
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
            dim = int(ax) % len(shape)
            s = int(s) + shape[dim] if s < 0 else int(s)
            ok = ok and s == 0 and int(e) >= shape[dim] and int(st) >= 1 and stride[dim] == 1
            stride[dim] = int(st)
        if not ok or stride[:2] != [1, 1]:
            raise HwgenError(
                f"unsupported Slice at {_where(node)}: only x[:, :, ::sh, ::sw] "
                "(a strided subsample of H and W) is supported"
            )
        return self.b.subsample_pad(path, x, stride=(stride[2], stride[3]))

    def pad(self, node: onnx.NodeProto, a: dict[str, Any], path: str, x: str) -> str:
        """Pad of the channel axis only, with zeros."""
        rank = len(self.full_shape(x))
        pads = a.get("pads")
        if pads is None:
            pads = self.const(node, 1, "pads")
        value = a.get("value", self.const(node, 2, "constant value"))
        axes = self.const(node, 3, "axes")
        axes = range(rank) if axes is None else [int(i) % rank for i in axes]
        full = [0] * (2 * rank)
        for i, ax in enumerate(axes):
            full[ax], full[rank + ax] = int(pads[i]), int(pads[len(axes) + i])
        mode = _text(a.get("mode", "constant"))
        others = [p for i, p in enumerate(full) if i % rank != 1]
        if rank != 4 or mode != "constant" or any(others) or min(full) < 0 or np.any(value):
            raise HwgenError(
                f"unsupported Pad at {_where(node)}: only zero channels added before/after "
                f"are supported, not pads={full} mode={mode} value={value}"
            )
        return self.b.subsample_pad(path, x, pad=(full[1], full[rank + 1]))

    def flatten(self, node: onnx.NodeProto, a: dict[str, Any], path: str, x: str) -> str:
        shape = self.full_shape(x)
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
        return self.b.flatten(path, x)


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


def _const_tensors(graph: onnx.GraphProto) -> set[str]:
    """The tensors that are constants (shapes are static); the others carry data."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type in ("Constant", "Shape") or (inputs and all(i in const for i in inputs)):
            const.update(node.output)
    return const


def _check_ops(graph: onnx.GraphProto, const: set[str]) -> None:
    bad = [
        node
        for node in graph.node
        if node.domain not in ("", "ai.onnx")
        or node.op_type not in (_CONST_OPS if node.output[0] in const else _DATA_OPS)
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
    const = _const_tensors(model.graph)
    _check_ops(model.graph, const)
    return _Converter(model.graph, const).run(name or identifier(path.stem, "net"))
