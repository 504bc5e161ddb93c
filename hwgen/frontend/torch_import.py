"""PyTorch importer: an ``nn.Module`` traced by torch.fx becomes a :class:`FloatNet`.

The module must be a chain (every intermediate tensor feeds exactly one op) of:
Conv2d (groups 1, dilation 1, zero padding), Linear, BatchNorm2d/1d (folded into the
Conv2d/Linear before it, with the running statistics), ReLU (module, ``F.relu``,
``torch.relu``, ``x.relu()``), MaxPool2d/AvgPool2d (module or functional; no padding,
dilation or ceil mode), Flatten (``nn.Flatten``, ``torch.flatten(x, 1)``,
``x.view(x.size(0), -1)``, ``x.reshape(...)``), Dropout and Identity (dropped).
Every op is checked before any tensor is computed; anything else is an error naming
the op and where it is. Shapes come from one run of ``torch.fx`` ShapeProp on a
dummy batch, with the module in eval mode (its modes are restored afterwards).

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
from hwgen.frontend.chain import ChainBuilder
from hwgen.frontend.graph import FloatNet

_NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_RELU_FUNCTIONS: set[Callable[..., Any]] = {F.relu, F.relu_, torch.relu, torch.relu_}
_DROPOUT_FUNCTIONS: set[Callable[..., Any]] = {F.dropout, F.dropout1d, F.dropout2d}
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
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_SHAPE_METHODS = {"size", "dim"}  # shape queries: they feed view/reshape, not the data chain


@dataclass
class _Op:
    """One data op of the chain: ``kind`` is conv, linear, bn, relu, pool, flatten or noop."""

    kind: str
    node: fx.Node
    name: str  # module path or node name, quoted in messages
    module: nn.Module | None = None
    pool: tuple[str, tuple[int, int], tuple[int, int]] | None = None  # kind, kernel, stride


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
    if any(isinstance(v, fx.Node) for v in (kernel_size, stride)):
        raise HwgenError(f"unsupported {kind} at {where}: window computed at run time")
    kernel = _pair(kernel_size)
    return kind, kernel, kernel if stride in (None, (), []) else _pair(stride)


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


def _module_op(node: fx.Node, m: nn.Module) -> _Op:
    path = str(node.target)
    where = f"layer '{path}'"
    if isinstance(m, nn.Conv2d):
        _check_conv(m, where)
        return _Op("conv", node, path, m)
    if isinstance(m, nn.Linear):
        return _Op("linear", node, path, m)
    if isinstance(m, _BN_MODULES):
        if m.running_mean is None or m.running_var is None:
            raise HwgenError(f"{type(m).__name__} at {where} has no running statistics to fold")
        return _Op("bn", node, path, m)
    if isinstance(m, nn.ReLU):
        return _Op("relu", node, path)
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
        return _Op("pool", node, path, pool=pool)
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
        return _Op("pool", node, path, pool=pool)
    if isinstance(m, nn.Flatten):
        return _Op("flatten", node, path)
    if isinstance(m, _NOOP_MODULES):
        return _Op("noop", node, path)
    raise HwgenError(f"unsupported op {type(m).__name__} at {where}")


def _function_op(node: fx.Node) -> _Op | None:
    """The op of a call_function node, or None for a shape query."""
    fn = node.target
    where = f"node '{node.name}'"
    if fn in _RELU_FUNCTIONS:
        return _Op("relu", node, node.name)
    if fn in _DROPOUT_FUNCTIONS:
        return _Op("noop", node, node.name)
    if fn is torch.flatten:
        return _Op("flatten", node, node.name)
    if fn in _POOL_FUNCTIONS:
        kind, params = _POOL_FUNCTIONS[fn]
        if len(node.args) > len(params) or set(node.kwargs) - set(params):
            raise HwgenError(f"unsupported arguments to {_get_qualified_name(fn)} at {where}")
        bound = dict(zip(params, node.args, strict=False)) | dict(node.kwargs)
        bound.pop("input", None)
        bound.pop("count_include_pad", None)  # irrelevant without padding
        kernel, stride = bound.pop("kernel_size", None), bound.pop("stride", None)
        pool = _pool_window(kind, where, kernel, stride, **bound)
        return _Op("pool", node, node.name, pool=pool)
    if fn is getattr and node.args[1:] == ("shape",):
        return None
    if fn is operator.getitem and _is_shape_query(node.args[0]):
        return None
    name = _get_qualified_name(fn) if callable(fn) else str(fn)
    raise HwgenError(f"unsupported op {name.replace('_operator.', 'operator.')} at {where}")


def _is_shape_query(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and (
        (arg.op == "call_method" and arg.target in _SHAPE_METHODS)
        or (arg.op == "call_function" and arg.target is getattr and arg.args[1:] == ("shape",))
    )


def _classify(gm: fx.GraphModule) -> tuple[list[_Op], fx.Node]:
    """Every node checked, before any computation: the data ops in order and the input node."""
    ops: list[_Op] = []
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise HwgenError(f"the model must take one input tensor, it takes {len(inputs)}")
    for node in gm.graph.nodes:
        if node.op == "call_module":
            ops.append(_module_op(node, gm.get_submodule(node.target)))
        elif node.op == "call_function":
            op = _function_op(node)
            if op is not None:
                ops.append(op)
        elif node.op == "call_method":
            if node.target in _SHAPE_METHODS:
                continue
            if node.target in ("relu", "relu_"):
                ops.append(_Op("relu", node, node.name))
            elif node.target in _RESHAPE_METHODS:
                ops.append(_Op("flatten", node, node.name))
            elif node.target == "contiguous":
                ops.append(_Op("noop", node, node.name))
            else:
                raise HwgenError(f"unsupported op Tensor.{node.target} at node '{node.name}'")
        elif node.op == "get_attr":
            raise HwgenError(
                f"unsupported op get_attr '{node.target}' at node '{node.name}' "
                "(a parameter used outside its module)"
            )
        elif node.op == "output" and not isinstance(node.args[0], fx.Node):
            raise HwgenError("the model must return one tensor, not a tuple or dict")
    return ops, inputs[0]


def _check_chain(ops: Sequence[_Op], x: fx.Node, out: fx.Node) -> None:
    """Each op consumes the previous op's output, which nothing else uses but shape queries."""
    for op in ops:
        if not op.node.args or op.node.args[0] is not x:
            raise HwgenError(
                f"the model is not a sequential chain: node '{op.node.name}' does not take "
                f"the output of '{x.name}' as its input"
            )
        data_users = [u for u in x.users if not _is_shape_query(u)]
        if len(data_users) != 1:
            names = ", ".join(sorted(u.name for u in data_users))
            raise HwgenError(
                f"the model is not a sequential chain: the output of '{x.name}' is used by {names}"
            )
        x = op.node
    if out.args[0] is not x:
        raise HwgenError(f"the model is not a sequential chain: it does not return '{x.name}'")


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


def _emit(b: ChainBuilder, op: _Op, in_shape: tuple[int, ...]) -> None:
    m = op.module
    if op.kind == "conv":
        assert isinstance(m, nn.Conv2d)
        b.conv(op.name, _np(m.weight), _np(m.bias), _pair(m.stride), _conv_padding(m))
    elif op.kind == "linear":
        assert isinstance(m, nn.Linear)
        b.linear(op.name, _np(m.weight), _np(m.bias))
    elif op.kind == "bn":
        assert isinstance(m, nn.modules.batchnorm._BatchNorm)
        n = m.num_features
        gamma = _np(m.weight) if m.affine else np.ones(n)
        beta = _np(m.bias) if m.affine else np.zeros(n)
        b.batchnorm(
            op.name, type(m).__name__, gamma, beta, _np(m.running_mean), _np(m.running_var), m.eps
        )
    elif op.kind == "relu":
        b.relu(op.name)
    elif op.kind == "pool":
        assert op.pool is not None
        b.pool(op.name, *op.pool)
    elif op.kind == "flatten":
        out_shape = _shape(op.node)
        n = in_shape[0]
        if len(in_shape) in (2, 4) and out_shape == (n, in_shape[1:].numel()):
            b.flatten(op.name)
        elif out_shape != in_shape:
            raise HwgenError(
                f"unsupported reshape at node '{op.node.name}': {tuple(in_shape[1:])} -> "
                f"{tuple(out_shape[1:])} per image (only flattening is supported)"
            )


def from_module(module: nn.Module, input_shape: tuple[int, ...], name: str = "net") -> FloatNet:
    """Import a PyTorch module taking one ``(N, *input_shape)`` tensor as a float graph."""
    gm = _trace(module)
    ops, x = _classify(gm)
    _check_chain(ops, x, next(n for n in gm.graph.nodes if n.op == "output"))
    _propagate_shapes(gm, input_shape)
    b = ChainBuilder(input_shape)
    prev = x
    for op in ops:
        _emit(b, op, torch.Size(_shape(prev)))
        prev = op.node
    return b.finish(name)


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
