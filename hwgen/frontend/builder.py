"""Building the float graph: the shapes, checks and folding both importers share.

An importer walks its source graph in topological order and calls one :class:`GraphBuilder`
method per op, passing the handles of the op's inputs (``"input"`` for the network input,
else what an earlier call returned); each method returns the handle of the op's output.
Ops that compute nothing (Dropout, Identity, flattening a flat vector) just pass their
input's handle on. :meth:`GraphBuilder.finish` then

- folds an inference BatchNorm into the Conv2d/Linear producing its input
  (``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``),
  and a constant added to a Linear's output (ONNX MatMul + Add) into its bias,
- fuses a ReLU into the Conv2d, Linear or Add producing its input (``relu=True``),
- merges consecutive subsample/channel-pad ops (option-A shortcuts) into one,

each only when the op is the only user of that tensor, and checks that every layer's
output is used. Flatten of a ``(C, H, W)`` map is in hwgen's H, W, C order: the input
columns of the Linear reading it are permuted once, so the float graph predicts exactly
what the source did. Shapes are tracked per tensor and every op is checked against them,
naming the op.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from hwgen.errors import HwgenError
from hwgen.frontend.graph import (
    FAdd,
    FAvgPool2d,
    FConv2d,
    FFlatten,
    FGlobalAvgPool,
    FLayer,
    FLinear,
    FloatNet,
    FMaxPool2d,
    FReLU,
    FSubsamplePad,
)

INPUT = "input"  # the handle of the network input
_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]+")


def identifier(path: str, fallback: str = "layer") -> str:
    """A layer name from a module path or node name: ``"features.0"`` -> ``"features_0"``."""
    name = _NOT_IDENT.sub("_", path).strip("_") or fallback
    if name == INPUT:  # reserved by hwgen.ir for the network input
        return f"{fallback}_input"
    return f"{fallback}_{name}" if name[0].isdigit() else name


def fold_batchnorm(
    weight: np.ndarray,
    bias: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of ``BN(layer(x))`` as one layer, in float64 (output channels first)."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    w = np.asarray(weight, np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    b = (np.asarray(bias, np.float64) - mean) * scale + np.asarray(beta, np.float64)
    return w, b


@dataclass(frozen=True, eq=False)
class _BatchNorm:
    """A BatchNorm waiting to be folded into the layer producing its input."""

    name: str
    kind: str
    stats: tuple[np.ndarray, ...] = field(repr=False)  # gamma, beta, mean, var
    eps: float
    inputs: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class _Bias:
    """A constant added to a Linear's output, waiting to be folded into its bias."""

    name: str
    bias: np.ndarray = field(repr=False)
    inputs: tuple[str, ...]


_Op = FLayer | _BatchNorm | _Bias


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


class GraphBuilder:
    """Builds a :class:`FloatNet` one source op at a time (see the module docstring).

    ``path`` arguments are the op's name in the source model (module path or node name):
    messages quote it, and the layer's name is derived from it, made unique.
    """

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise HwgenError(f"input shape must be (C, H, W) or (F,), positive, not {shape}")
        self.input_shape = shape
        self._ops: list[_Op] = []
        self._shapes: dict[str, tuple[int, ...]] = {INPUT: shape}
        self._paths: dict[str, str] = {INPUT: INPUT}
        self._flattened: dict[str, tuple[int, int, int]] = {}  # handle -> C, H, W before Flatten
        self.layer_names: dict[str, str] = {}  # set by finish()

    def shape(self, x: str) -> tuple[int, ...]:
        """The per-image shape of tensor ``x``."""
        return self._shapes[x]

    def _key(self) -> str:
        """A handle for a new op; layers get their names in finish(), after folding, so a
        folded op takes no name."""
        return f"%{len(self._ops)}"

    def _need(self, ndim: int, what: str, path: str, x: str) -> tuple[int, ...]:
        shape = self._shapes[x]
        if len(shape) != ndim:
            kind = "a (C, H, W) feature map" if ndim == 3 else "a flat (F,) vector"
            raise HwgenError(f"{what} '{path}' needs {kind}, but its input is {_fmt(shape)}")
        return shape

    def _append(self, op: _Op, path: str, shape: tuple[int, ...]) -> str:
        self._ops.append(op)
        self._shapes[op.name] = shape
        self._paths[op.name] = path
        return op.name

    def conv(
        self,
        path: str,
        x: str,
        weight: np.ndarray,
        bias: np.ndarray | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> str:
        c, h, w = self._need(3, "Conv2d", path, x)
        cout, cin, kh, kw = weight.shape
        if cin != c:
            raise HwgenError(f"Conv2d '{path}' expects {cin} input channels, its input has {c}")
        oh = (h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (w + 2 * padding[1] - kw) // stride[1] + 1
        if oh < 1 or ow < 1:
            raise HwgenError(f"Conv2d '{path}': kernel {kh}x{kw} too big for {_fmt((c, h, w))}")
        b = np.zeros(cout) if bias is None else bias
        layer = FConv2d(
            self._key(), _f64(weight, path), _f64(b, path), stride, padding, inputs=(x,)
        )
        return self._append(layer, path, (cout, oh, ow))

    def linear(self, path: str, x: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        (n,) = self._need(1, "Linear", path, x)
        out, n_in = weight.shape
        if n_in != n:
            raise HwgenError(f"Linear '{path}' expects {n_in} input features, its input has {n}")
        w = _f64(weight, path)
        if x in self._flattened:  # columns C, H, W -> H, W, C (DESIGN §2 layouts)
            w = w.reshape(out, *self._flattened[x]).transpose(0, 2, 3, 1).reshape(out, n_in)
        b = np.zeros(out) if bias is None else bias
        layer = FLinear(self._key(), np.ascontiguousarray(w), _f64(b, path), inputs=(x,))
        return self._append(layer, path, (out,))

    def add_bias(self, path: str, x: str, bias: np.ndarray) -> str:
        """A constant added to the output of the Linear producing ``x`` (ONNX MatMul + Add)."""
        b = _f64(bias, path)
        n = self._shapes[x]
        if len(n) != 1 or b.size != n[0] or b.ndim == 0 or b.shape[-1] != n[0]:
            raise HwgenError(
                f"Add '{path}' adds a constant of shape {_fmt(b.shape)} to a tensor of shape "
                f"{_fmt(n)}: only a bias after a MatMul is supported"
            )
        return self._append(_Bias(self._key(), b.reshape(-1), (x,)), path, n)

    def batchnorm(
        self,
        path: str,
        x: str,
        kind: str,
        gamma: np.ndarray,
        beta: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        eps: float,
    ) -> str:
        """An inference BatchNorm, folded into the Conv2d/Linear producing ``x`` by finish()."""
        shape = self._shapes[x]
        if np.size(mean) != shape[0]:
            raise HwgenError(
                f"{kind} '{path}' has {np.size(mean)} channels, its input has {shape[0]}"
            )
        stats = tuple(np.asarray(s, np.float64).reshape(-1) for s in (gamma, beta, mean, var))
        op = _BatchNorm(self._key(), kind, stats, float(eps), (x,))
        return self._append(op, path, shape)

    def relu(self, path: str, x: str) -> str:
        """A ReLU; finish() fuses it into the Conv2d/Linear/Add producing ``x`` if it can."""
        h = self._append(FReLU(self._key(), (x,)), path, self._shapes[x])
        if x in self._flattened:  # elementwise: the order of the flat vector is unchanged
            self._flattened[h] = self._flattened[x]
        return h

    def add(self, path: str, a: str, b: str) -> str:
        """The sum of two tensors of one shape (a residual join)."""
        sa, sb = self._shapes[a], self._shapes[b]
        if sa != sb:
            raise HwgenError(
                f"Add '{path}' adds tensors of different shapes {_fmt(sa)} and {_fmt(sb)}"
            )
        if self._flattened.get(a) != self._flattened.get(b):
            raise HwgenError(
                f"Add '{path}' adds a flattened (C, H, W) map to a tensor in another order"
            )
        h = self._append(FAdd(self._key(), (a, b)), path, sa)
        if a in self._flattened:
            self._flattened[h] = self._flattened[a]
        return h

    def pool(
        self, path: str, x: str, kind: str, kernel: tuple[int, int], stride: tuple[int, int]
    ) -> str:
        c, h, w = self._need(3, kind, path, x)
        if kind == "AvgPool2d" and tuple(kernel) == (h, w):  # F.avg_pool2d(x, x.size(3))
            return self.global_pool(path, x)
        if kernel[0] > h or kernel[1] > w:
            raise HwgenError(f"{kind} '{path}': window {kernel} too big for {_fmt((c, h, w))}")
        out = (c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)
        cls = FMaxPool2d if kind == "MaxPool2d" else FAvgPool2d
        return self._append(cls(self._key(), kernel, stride, (x,)), path, out)

    def global_pool(self, path: str, x: str) -> str:
        """Global average pool (C, H, W) -> (C, 1, 1); H*W must be a power of two."""
        c, h, w = self._need(3, "global average pool", path, x)
        if (h * w) & (h * w - 1):
            raise HwgenError(
                f"global average pool '{path}' over {h}x{w} = {h * w} values: hwgen needs "
                "a power of two (it divides by a shift)"
            )
        return self._append(FGlobalAvgPool(self._key(), (x,)), path, (c, 1, 1))

    def subsample_pad(
        self, path: str, x: str, stride: tuple[int, int] = (1, 1), pad: tuple[int, int] = (0, 0)
    ) -> str:
        """``x[:, :, ::sh, ::sw]`` and/or zero channels before/after (option-A shortcut)."""
        c, h, w = self._need(3, "subsample/pad", path, x)
        (sh, sw), (before, after) = stride, pad
        if min(sh, sw) < 1 or min(before, after) < 0:
            raise HwgenError(f"subsample/pad '{path}': bad stride {stride} or pad {pad}")
        out = (before + c + after, -(-h // sh), -(-w // sw))
        return self._append(FSubsamplePad(self._key(), stride, pad, (x,)), path, out)

    def flatten(self, path: str, x: str) -> str:
        """Flatten a (C, H, W) map in H, W, C order; a flat vector is returned as is."""
        shape = self._shapes[x]
        if len(shape) == 1:
            return x
        c, h, w = shape
        name = self._append(FFlatten(self._key(), (x,)), path, (c * h * w,))
        if h * w > 1:
            self._flattened[name] = (c, h, w)
        return name

    def finish(self, name: str, output: str) -> FloatNet:
        """Fold, fuse and merge (module docstring); ``output`` is the model's output tensor."""
        if output in self._flattened:
            raise HwgenError(
                f"the model ends with a Flatten of a {_fmt(self._flattened[output])} map: hwgen "
                "flattens in H, W, C order, which matches the source only when a Linear follows"
            )
        users = Counter(i for op in self._ops for i in op.inputs)
        users[output] += 1
        layers: dict[str, FLayer] = {}
        alias: dict[str, str] = {}  # an op folded away -> the layer that now computes it
        for op in self._ops:
            x = op.inputs[0]
            op = replace(op, inputs=tuple(alias.get(i, i) for i in op.inputs))
            src = layers.get(op.inputs[0])
            merged = self._fold(op, src, sole=users[x] == 1)
            if merged is None:
                layers[op.name] = op
            else:
                layers[merged.name] = merged
                alias[op.name] = merged.name
        output = alias.get(output, output)
        used = Counter(i for layer in layers.values() for i in layer.inputs)
        for layer in layers.values():
            if layer.name != output and not used[layer.name]:
                raise HwgenError(f"the output of '{self._paths[layer.name]}' is never used")
        if output == INPUT:
            raise HwgenError("the model computes nothing: it returns its input")
        names, taken = {INPUT: INPUT}, {INPUT}
        for key in layers:
            base = identifier(self._paths[key])
            unique, i = base, 1
            while unique in taken:
                unique, i = f"{base}_{i}", i + 1
            names[key] = unique
            taken.add(unique)
        named = [
            replace(layer, name=names[layer.name], inputs=tuple(names[i] for i in layer.inputs))
            for layer in layers.values()
        ]
        # Every handle (folded ones too) -> the name of the layer that computes it, for an
        # importer that keeps per-op facts (hwgen.frontend.qonnx_import's quantizers).
        self.layer_names = {h: names[alias.get(h, h)] for h in [INPUT, *self._shapes]}
        return FloatNet(self.input_shape, tuple(named), name)

    def _fold(self, op: _Op, src: FLayer | None, sole: bool) -> FLayer | None:
        """``src`` with ``op`` folded into it, or None if ``op`` stays a layer of its own."""
        path = self._paths[op.name]
        if isinstance(op, _BatchNorm):
            if not isinstance(src, (FConv2d, FLinear)) or src.relu:
                after = "the input" if src is None else type(src).__name__[1:]
                if getattr(src, "relu", False):
                    after = "a fused ReLU"
                raise HwgenError(
                    f"{op.kind} '{path}' cannot be folded: it must directly follow a Conv2d or "
                    f"Linear, not {after}"
                )
            if not sole:
                raise HwgenError(
                    f"{op.kind} '{path}' cannot be folded: the output of "
                    f"'{self._paths[src.name]}' before it is also used elsewhere"
                )
            w, b = fold_batchnorm(src.weight, src.bias, *op.stats, op.eps)
            if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
                raise HwgenError(
                    f"{op.kind} '{path}' folds to non-finite weights (check its running_var)"
                )
            return replace(src, weight=w, bias=b)
        if isinstance(op, _Bias):
            if not isinstance(src, FLinear) or src.relu or not sole:
                raise HwgenError(
                    f"Add '{path}' is supported only as the bias of the MatMul before it"
                )
            return replace(src, bias=src.bias + op.bias)
        if isinstance(op, FReLU) and sole and isinstance(src, (FConv2d, FLinear, FAdd)):
            return None if src.relu else replace(src, relu=True)
        if isinstance(op, FSubsamplePad) and sole and isinstance(src, FSubsamplePad):
            # x[::a][::b] == x[::a*b]; zero channels around zero channels add up
            stride = (src.stride[0] * op.stride[0], src.stride[1] * op.stride[1])
            pad = (src.pad[0] + op.pad[0], src.pad[1] + op.pad[1])
            return replace(src, stride=stride, pad=pad)
        return None


def _f64(a: np.ndarray, path: str) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise HwgenError(f"layer '{path}' has non-finite (NaN or inf) weights")
    return a
