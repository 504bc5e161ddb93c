"""PyTorch importer: an ``nn.Module`` traced by torch.fx becomes a :class:`FloatNet`.

The module is a graph (a tensor may feed several ops: residual networks) of:
Conv2d (groups 1, dilation 1, zero padding), Linear, BatchNorm2d/1d (folded into the
Conv2d/Linear before it, with the running statistics), ReLU (module, ``F.relu``,
``torch.relu``, ``x.relu()``), the sum of two tensors (``a + b``, ``a += b``,
``torch.add``, ``a.add(b)``), MaxPool2d/AvgPool2d (module or functional; no padding,
dilation or ceil mode), global average pooling (``AdaptiveAvgPool2d(1)``,
``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``, an average pool whose window is the
whole map, e.g. ``F.avg_pool2d(x, x.size()[3])``), the option-A ResNet shortcut
(``x[:, :, ::sh, ::sw]`` and ``F.pad`` of the channel dimension with zeros), Flatten
(``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.view(x.size(0), -1)``, ``x.reshape(...)``,
``x.squeeze()`` of a (C, 1, 1) map), Dropout and Identity (dropped). Folding, fusion and
naming are :mod:`hwgen.frontend.builder`'s. Every op is checked before any tensor is computed;
anything else is an error naming the op and where it is. Shapes come from one run of
``torch.fx`` ShapeProp on a dummy batch, with the module in eval mode (its modes are
restored afterwards).

Weights are never unpickled from untrusted files: :func:`load_state_dict_file` reads
state dicts with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import operator
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import ShapeProp

from hwgen.errors import HwgenError
from hwgen.frontend.builder import INPUT, GraphBuilder
from hwgen.frontend.graph import FloatNet

_NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_RELU_FUNCTIONS: set[Callable[..., Any]] = {F.relu, F.relu_, torch.relu, torch.relu_}
_DROPOUT_FUNCTIONS: set[Callable[..., Any]] = {F.dropout, F.dropout1d, F.dropout2d}
_ADD_FUNCTIONS: set[Callable[..., Any]] = {operator.add, operator.iadd, torch.add}
# Functional pools are boolean-dispatch wrappers without a signature: their parameters in order.
_POOL_FUNCTIONS: dict[Callable[..., Any], tuple[str, tuple[str, ...]]] = {
    F.max_pool2d: (
        "MaxPool2d",
        ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    ),
    F.avg_pool2d: (
        "AvgPool2d",
        (
            "input",
            "kernel_size",
            "stride",
            "padding",
            "ceil_mode",
            "count_include_pad",
            "divisor_override",
        ),
    ),
}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze"}  # as far as they flatten
_SHAPE_METHODS = {"size", "dim"}  # shape queries: they feed view/reshape, not the data graph


@dataclass
class _Op:
    """One data op: ``kind`` is conv, linear, bn, relu, add, pool, gpool, subsample, pad,
    flatten or noop; ``inputs`` are the nodes of its tensor operands."""

    kind: str
    node: fx.Node
    name: str  # module path (or for a function, the module it is called in): names the layer
    inputs: tuple[fx.Node, ...]
    module: nn.Module | None = None
    # pool: (kind, kernel, stride) as given; subsample: stride; pad: (before, after);
    # gpool: keepdim
    arg: Any = None


def _path(node: fx.Node) -> str:
    """A function's layer name: the module it is called in (a block's add is named after
    the block), else the node's name."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack)) if stack else node.name


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pool_window(
    kind: str, where: str, kernel_size: Any, stride: Any, **settings: Any
) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Check a pooling op's settings against DESIGN §2; return (kind, kernel, stride)."""
    allowed = {
        "padding": 0,
        "dilation": 1,
        "ceil_mode": False,
        "return_indices": False,
        "divisor_override": None,
    }
    for key, value in settings.items():
        if key in allowed and value not in (allowed[key], (allowed[key],) * 2, [allowed[key]] * 2):
            raise HwgenError(f"unsupported {kind} setting {key}={value!r} at {where}")
    if not all(_is_size(v) for v in (kernel_size, stride)):
        raise HwgenError(f"unsupported {kind} at {where}: window computed at run time")
    return kind, kernel_size, stride


def _is_size(v: Any) -> bool:
    """A constant, or a size of a tensor (``x.size()[3]``, ``x.shape[2]``, ``x.size(3)``)."""
    if isinstance(v, (tuple, list)):
        return all(_is_size(i) for i in v)
    if not isinstance(v, fx.Node):
        return True
    if v.op == "call_function" and v.target is operator.getitem:
        query, dim = v.args[0], v.args[1]
    elif v.op == "call_method" and v.target == "size" and len(v.args) == 2:
        query, dim = v, v.args[1]
    else:
        return False
    return _is_shape_query(query) and isinstance(dim, int) and dim != 0  # not the batch size


def _size(v: Any) -> Any:
    """The value of a window checked by _is_size, once shapes are known."""
    if isinstance(v, (tuple, list)):
        return tuple(_size(i) for i in v)
    if not isinstance(v, fx.Node):
        return v
    query, i = (v.args[0], v.args[1]) if v.target is operator.getitem else (v, v.args[1])
    return _shape(query.args[0])[i]


def _check_conv(m: nn.Conv2d, where: str) -> None:
    bad = []
    if m.groups != 1:
        bad.append(f"groups={m.groups}")
    if tuple(m.dilation) != (1, 1):
        bad.append(f"dilation={m.dilation}")
    if m.padding_mode != "zeros":
        bad.append(f"padding_mode={m.padding_mode!r}")
    if m.padding == "same" and any(k % 2 == 0 for k in m.kernel_size):
        bad.append(f"padding='same' with even kernel {m.kernel_size} (asymmetric)")
    if bad:
        raise HwgenError(f"unsupported Conv2d setting {', '.join(bad)} at {where}")


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":  # stride 1 (torch checks), odd kernel (checked): symmetric
        return (m.kernel_size[0] // 2, m.kernel_size[1] // 2)
    return _pair(m.padding)


def _tensor(node: fx.Node, i: int, op: str, where: str) -> fx.Node:
    """Argument ``i`` of ``node``, which must be a tensor computed by the model."""
    arg = node.args[i] if i < len(node.args) else None
    if not isinstance(arg, fx.Node) or _is_shape_query(arg):
        raise HwgenError(f"unsupported op {op} with a constant operand {arg!r} at {where}")
    return arg


def _module_op(node: fx.Node, m: nn.Module) -> _Op:
    path = str(node.target)
    where = f"layer '{path}'"
    x = (_tensor(node, 0, type(m).__name__, where),)
    if isinstance(m, nn.Conv2d):
        _check_conv(m, where)
        return _Op("conv", node, path, x, m)
    if isinstance(m, nn.Linear):
        return _Op("linear", node, path, x, m)
    if isinstance(m, _BN_MODULES):
        if m.running_mean is None or m.running_var is None:
            raise HwgenError(f"{type(m).__name__} at {where} has no running statistics to fold")
        return _Op("bn", node, path, x, m)
    if isinstance(m, nn.ReLU):
        return _Op("relu", node, path, x)
    if isinstance(m, nn.MaxPool2d):
        pool = _pool_window(
            "MaxPool2d",
            where,
            m.kernel_size,
            m.stride,
            padding=m.padding,
            dilation=m.dilation,
            ceil_mode=m.ceil_mode,
            return_indices=m.return_indices,
        )
        return _Op("pool", node, path, x, arg=pool)
    if isinstance(m, nn.AvgPool2d):
        pool = _pool_window(
            "AvgPool2d",
            where,
            m.kernel_size,
            m.stride,
            padding=m.padding,
            ceil_mode=m.ceil_mode,
            divisor_override=m.divisor_override,
        )
        return _Op("pool", node, path, x, arg=pool)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if m.output_size not in (1, (1, 1), [1, 1]):
            raise HwgenError(
                f"unsupported AdaptiveAvgPool2d setting output_size={m.output_size!r} at {where} "
                "(only 1: global average pooling)"
            )
        return _Op("gpool", node, path, x, arg=True)
    if isinstance(m, nn.Flatten):
        return _Op("flatten", node, path, x)
    if isinstance(m, _NOOP_MODULES):
        return _Op("noop", node, path, x)
    raise HwgenError(f"unsupported op {type(m).__name__} at {where}")


def _bind(node: fx.Node, params: Sequence[str], op: str, where: str) -> dict[str, Any]:
    """The arguments of a call by parameter name (functionals whose signature is hidden)."""
    if len(node.args) > len(params) or set(node.kwargs) - set(params):
        raise HwgenError(f"unsupported arguments to {op} at {where}")
    return dict(zip(params, node.args, strict=False)) | dict(node.kwargs)


def _op_name(fn: Any) -> str:
    name = _get_qualified_name(fn) if callable(fn) else str(fn)
    return name.replace("_operator.", "operator.")


def _add_op(node: fx.Node, op: str) -> _Op:
    where = f"node '{node.name}'"
    alpha = node.kwargs.get("alpha", 1)
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or alpha != 1:
        raise HwgenError(f"unsupported arguments to {op} at {where} (only a + b)")
    a, b = (_tensor(node, i, op, where) for i in (0, 1))
    return _Op("add", node, _path(node), (a, b))


def _mean_op(node: fx.Node, op: str) -> _Op:
    """``x.mean((2, 3))`` / ``torch.mean(x, dim=(-1, -2), keepdim=True)``: a global pool."""
    where = f"node '{node.name}'"
    bound = _bind(node, ("input", "dim", "keepdim"), op, where)
    dims = bound.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if sorted(d % 4 if isinstance(d, int) else -1 for d in dims) != [2, 3]:
        raise HwgenError(
            f"unsupported op {op} over dims {dims} at {where} "
            "(only over (2, 3): global average pooling)"
        )
    return _Op(
        "gpool", node, _path(node), (_tensor(node, 0, op, where),), arg=bool(bound.get("keepdim"))
    )


def _subsample_op(node: fx.Node) -> _Op:
    """``x[:, :, ::sh, ::sw]`` (trailing slices may be left out, ``...`` stands for ``:``s)."""
    where = f"node '{node.name}'"
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if index.count(Ellipsis) == 1:
        i = index.index(Ellipsis)
        index = index[:i] + (slice(None),) * (5 - len(index)) + index[i + 1 :]
    full = (None, 0)
    ok = len(index) <= 4 and all(
        isinstance(s, slice)
        and s.start in full
        and s.stop is None
        and (s.step is None or (isinstance(s.step, int) and s.step >= 1))
        for s in index
    )
    steps = [s.step or 1 for s in index] + [1] * (4 - len(index)) if ok else []
    if not ok or steps[:2] != [1, 1]:
        raise HwgenError(
            f"unsupported indexing at {where}: only x[:, :, ::sh, ::sw] (a strided subsample of "
            f"H and W) is supported, not {index}"
        )
    return _Op(
        "subsample", node, _path(node), (_tensor(node, 0, "getitem", where),), arg=tuple(steps[2:])
    )


def _pad_op(node: fx.Node) -> _Op:
    """``F.pad(x, (0, 0, 0, 0, before, after))``: zero channels around a map."""
    where = f"node '{node.name}'"
    bound = _bind(node, ("input", "pad", "mode", "value"), "torch.nn.functional.pad", where)
    pad = bound.get("pad")
    value = bound.get("value")
    ok = (
        isinstance(pad, (tuple, list))
        and len(pad) % 2 == 0
        and len(pad) <= 8
        and all(isinstance(p, int) for p in pad)
        and bound.get("mode", "constant") == "constant"
        and value in (None, 0)
    )
    p = list(pad) + [0] * (8 - len(pad)) if ok else []
    if not ok or any(p[:4]) or any(p[6:]) or min(p) < 0:
        raise HwgenError(
            f"unsupported pad at {where}: only zero channels added before/after "
            f"(F.pad(x, (0, 0, 0, 0, before, after))), not pad={pad!r} "
            f"mode={bound.get('mode', 'constant')!r} value={value!r}"
        )
    return _Op("pad", node, _path(node), (_tensor(node, 0, "pad", where),), arg=(p[4], p[5]))


def _function_op(node: fx.Node) -> _Op | None:
    """The op of a call_function node, or None for a shape query."""
    fn = node.target
    where = f"node '{node.name}'"
    op = _op_name(fn)
    if fn is getattr and node.args[1:] == ("shape",):
        return None
    if fn is operator.getitem:
        return None if _is_shape_query(node.args[0]) else _subsample_op(node)
    if fn in _RELU_FUNCTIONS:
        return _Op("relu", node, _path(node), (_tensor(node, 0, op, where),))
    if fn in _DROPOUT_FUNCTIONS:
        return _Op("noop", node, _path(node), (_tensor(node, 0, op, where),))
    if fn is torch.flatten:
        return _Op("flatten", node, _path(node), (_tensor(node, 0, op, where),))
    if fn in _ADD_FUNCTIONS:
        return _add_op(node, op)
    if fn is torch.mean:
        return _mean_op(node, op)
    if fn is F.pad:
        return _pad_op(node)
    if fn is F.adaptive_avg_pool2d:
        size = _bind(node, ("input", "output_size"), op, where).get("output_size")
        if size not in (1, (1, 1), [1, 1]):
            raise HwgenError(f"unsupported {op} with output_size={size!r} at {where} (only 1)")
        return _Op("gpool", node, _path(node), (_tensor(node, 0, op, where),), arg=True)
    if fn in _POOL_FUNCTIONS:
        kind, params = _POOL_FUNCTIONS[fn]
        bound = _bind(node, params, op, where)
        bound.pop("input", None)
        bound.pop("count_include_pad", None)  # irrelevant without padding
        kernel, stride = bound.pop("kernel_size", None), bound.pop("stride", None)
        pool = _pool_window(kind, where, kernel, stride, **bound)
        return _Op("pool", node, _path(node), (_tensor(node, 0, op, where),), arg=pool)
    raise HwgenError(f"unsupported op {op} at {where}")


def _method_op(node: fx.Node) -> _Op | None:
    """The op of a call_method node (``x.relu()``), or None for a shape query."""
    method = node.target
    op = f"Tensor.{method}"
    where = f"node '{node.name}'"
    if method in _SHAPE_METHODS:
        return None
    if method in ("add", "add_"):
        return _add_op(node, op)
    if method == "mean":
        return _mean_op(node, op)
    kinds = {"relu": "relu", "relu_": "relu", "contiguous": "noop"} | dict.fromkeys(
        _RESHAPE_METHODS, "flatten"
    )
    if method not in kinds:
        raise HwgenError(f"unsupported op {op} at {where}")
    return _Op(kinds[str(method)], node, _path(node), (_tensor(node, 0, op, where),))


def _is_shape_query(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and (
        (arg.op == "call_method" and arg.target in _SHAPE_METHODS)
        or (arg.op == "call_function" and arg.target is getattr and arg.args[1:] == ("shape",))
    )


def _classify(gm: fx.GraphModule) -> tuple[list[_Op], fx.Node, fx.Node]:
    """Every node checked, before any computation: the data ops in order, the input node
    and the node of the returned tensor."""
    ops: list[_Op] = []
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise HwgenError(f"the model must take one input tensor, it takes {len(inputs)}")
    output = None
    for node in gm.graph.nodes:
        op = None
        if node.op == "call_module":
            op = _module_op(node, gm.get_submodule(node.target))
        elif node.op == "call_function":
            op = _function_op(node)
        elif node.op == "call_method":
            op = _method_op(node)
        elif node.op == "get_attr":
            raise HwgenError(
                f"unsupported op get_attr '{node.target}' at node '{node.name}' "
                "(a parameter used outside its module)"
            )
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise HwgenError("the model must return one tensor, not a tuple or dict")
            output = node.args[0]
        if op is not None:
            ops.append(op)
    assert output is not None  # fx graphs always end with an output node
    return ops, inputs[0], output


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _trace(module: nn.Module) -> fx.GraphModule:
    if fx.Tracer().is_leaf_module(module, ""):  # a bare nn.Conv2d etc.: trace it as one layer
        module = nn.Sequential(module)
    try:
        return fx.symbolic_trace(module)
    except Exception as e:  # tracing runs user code: any failure is the model's
        raise HwgenError(
            f"cannot trace {type(module).__name__} with torch.fx (data-dependent control flow?): "
            f"{_first_line(e)}"
        ) from None


def _propagate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            dtype = next((p.dtype for p in gm.parameters()), torch.float32)
            ShapeProp(gm).propagate(torch.zeros((2, *input_shape), dtype=dtype))
    except Exception as e:  # the module's own shape checks
        raise HwgenError(
            f"input shape {tuple(input_shape)} does not fit the model: {_first_line(e)}"
        ) from None
    finally:
        for m, training in modes.items():
            m.train(training)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _np(t: torch.Tensor | None) -> Any:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def _emit(b: GraphBuilder, op: _Op, xs: list[str]) -> str:
    """Hand ``op`` to the builder; returns the handle of its output."""
    m, x = op.module, xs[0]
    if op.kind == "conv":
        assert isinstance(m, nn.Conv2d)
        return b.conv(op.name, x, _np(m.weight), _np(m.bias), _pair(m.stride), _conv_padding(m))
    if op.kind == "linear":
        assert isinstance(m, nn.Linear)
        return b.linear(op.name, x, _np(m.weight), _np(m.bias))
    if op.kind == "bn":
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        n = m.num_features
        gamma = _np(m.weight) if m.affine else np.ones(n)
        beta = _np(m.bias) if m.affine else np.zeros(n)
        stats = (gamma, beta, _np(m.running_mean), _np(m.running_var))
        return b.batchnorm(op.name, x, type(m).__name__, *stats, m.eps)
    if op.kind == "relu":
        return b.relu(op.name, x)
    if op.kind == "add":
        return b.add(op.name, x, xs[1])
    if op.kind == "pool":
        kind, kernel, stride = op.arg
        kernel = _pair(_size(kernel))
        stride = kernel if stride in (None, (), []) else _pair(_size(stride))
        return b.pool(op.name, x, kind, kernel, stride)
    if op.kind == "gpool":
        g = b.global_pool(op.name, x)
        return g if op.arg else b.flatten(op.name, g)  # no keepdim: (N, C)
    if op.kind == "subsample":
        return b.subsample_pad(op.name, x, stride=op.arg) if op.arg != (1, 1) else x
    if op.kind == "pad":
        return b.subsample_pad(op.name, x, pad=op.arg) if op.arg != (0, 0) else x
    if op.kind == "flatten":
        in_shape, out_shape = torch.Size(_shape(op.inputs[0])), _shape(op.node)
        n = in_shape[0]
        if len(in_shape) in (2, 4) and out_shape == (n, in_shape[1:].numel()):
            return b.flatten(op.name, x)
        if out_shape != in_shape:
            raise HwgenError(
                f"unsupported reshape at node '{op.node.name}': {tuple(in_shape[1:])} -> "
                f"{tuple(out_shape[1:])} per image (only flattening is supported)"
            )
    return x  # noop, or a reshape that changes nothing


def from_module(module: nn.Module, input_shape: tuple[int, ...], name: str = "net") -> FloatNet:
    """Import a PyTorch module taking one ``(N, *input_shape)`` tensor as a float graph."""
    gm = _trace(module)
    ops, x, out = _classify(gm)
    _propagate_shapes(gm, input_shape)
    b = GraphBuilder(input_shape)
    handles = {x: INPUT}
    for op in ops:
        other = next((i for i in op.inputs if i not in handles), None)
        if other is not None:  # e.g. x + x.size(0)
            raise HwgenError(f"unsupported operand '{other.name}' at node '{op.node.name}'")
        handles[op.node] = _emit(b, op, [handles[i] for i in op.inputs])
    if out not in handles:
        raise HwgenError(f"the model must return a tensor it computes, not '{out.name}'")
    return b.finish(name, handles[out])


def load_state_dict_file(path: str | Path, module: nn.Module) -> nn.Module:
    """Load a ``torch.save(model.state_dict())`` file into ``module`` without unpickling code."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HwgenError(f"weights {path}: no such file") from None
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and "GLOBAL" in str(e):
            raise HwgenError(
                f"weights {path}: this is a pickled full model, which hwgen does not unpickle; "
                "save model.state_dict() instead, or export to ONNX with "
                "torch.onnx.export(..., dynamo=False)"
            ) from None
        raise HwgenError(f"weights {path}: not a readable PyTorch state dict") from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise HwgenError(f"weights {path}: not a readable PyTorch state dict (corrupt?)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HwgenError(f"weights {path}: expected a state dict of tensors, got {type(state)}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HwgenError(
            f"weights {path} do not match {type(module).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, t in expected.items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise HwgenError(
                f"weights {path}: '{key}' has shape {tuple(state[key].shape)}, "
                f"the module expects {tuple(t.shape)}"
            )
    module.load_state_dict(state)
    return module
