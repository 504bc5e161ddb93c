"""Folding shared by the importers: BatchNorm, ReLU and Flatten into the float graph.

Both importers walk a sequential chain of ops and hand each one to a
:class:`ChainBuilder`, which

- folds an inference BatchNorm into the Conv2d/Linear right before it
  (``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``),
- fuses a ReLU into the Conv2d/Linear right before it (``relu=True``),
- turns Flatten of a ``(C, H, W)`` map into hwgen's H, W, C order by permuting the input
  columns of the next Linear once, so the float graph predicts exactly what the source did,
- tracks the feature shape and checks every layer against it, naming the layer.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from hwgen.errors import HwgenError
from hwgen.frontend.graph import (
    FAvgPool2d,
    FConv2d,
    FFlatten,
    FLayer,
    FLinear,
    FloatNet,
    FMaxPool2d,
    FReLU,
)

_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]+")


def identifier(path: str, fallback: str = "layer") -> str:
    """A layer name from a module path or node name: ``"features.0"`` -> ``"features_0"``."""
    name = _NOT_IDENT.sub("_", path).strip("_") or fallback
    if name == "input":  # reserved by hwgen.ir for the network input
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


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


class ChainBuilder:
    """Builds a :class:`FloatNet` from a sequential chain of ops, one call per op.

    ``name`` arguments are the op's name in the source model (module path or node name):
    messages quote it, and the layer's identifier is derived from it, made unique.
    """

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise HwgenError(f"input shape must be (C, H, W) or (F,), positive, not {shape}")
        self.input_shape = shape
        self.shape = shape  # current feature shape, no batch dimension
        self.layers: list[FLayer] = []
        self._names: set[str] = set()
        self._flattened: tuple[int, int, int] | None = None  # C, H, W awaiting the next Linear

    def name(self, path: str, fallback: str = "layer") -> str:
        """A unique identifier derived from ``path``."""
        base = identifier(path, fallback)
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _need(self, ndim: int, what: str, name: str) -> None:
        if len(self.shape) != ndim:
            kind = "a (C, H, W) feature map" if ndim == 3 else "a flat (F,) vector"
            raise HwgenError(f"{what} '{name}' needs {kind}, but its input is {_fmt(self.shape)}")

    def conv(
        self,
        name: str,
        weight: np.ndarray,
        bias: np.ndarray | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> None:
        self._need(3, "Conv2d", name)
        c, h, w = self.shape
        cout, cin, kh, kw = weight.shape
        if cin != c:
            raise HwgenError(f"Conv2d '{name}' expects {cin} input channels, its input has {c}")
        oh = (h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (w + 2 * padding[1] - kw) // stride[1] + 1
        if oh < 1 or ow < 1:
            raise HwgenError(f"Conv2d '{name}': kernel {kh}x{kw} too big for {_fmt(self.shape)}")
        b = np.zeros(cout) if bias is None else bias
        layer = FConv2d(self.name(name), _f64(weight, name), _f64(b, name), stride, padding)
        self._append(layer, (cout, oh, ow))

    def linear(self, name: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self._need(1, "Linear", name)
        out, n_in = weight.shape
        if n_in != self.shape[0]:
            raise HwgenError(
                f"Linear '{name}' expects {n_in} input features, its input has {self.shape[0]}"
            )
        w = _f64(weight, name)
        if self._flattened is not None:  # columns C, H, W -> H, W, C (DESIGN §2 layouts)
            w = w.reshape(out, *self._flattened).transpose(0, 2, 3, 1).reshape(out, n_in)
            self._flattened = None
        b = np.zeros(out) if bias is None else bias
        layer = FLinear(self.name(name), np.ascontiguousarray(w), _f64(b, name))
        self._append(layer, (out,))

    def add_bias(self, name: str, bias: np.ndarray) -> None:
        """A constant added to the output of the Linear right before it (ONNX MatMul + Add)."""
        last = self.layers[-1] if self.layers else None
        if not isinstance(last, FLinear) or last.relu:
            raise HwgenError(f"Add '{name}' is supported only as the bias of the MatMul before it")
        b = _f64(bias, name)
        if b.size != last.bias.size or b.shape[-1] != last.bias.size:
            raise HwgenError(
                f"Add '{name}' adds a constant of shape {_fmt(b.shape)} "
                f"to Linear '{last.name}' with {last.bias.size} outputs"
            )
        self.layers[-1] = replace(last, bias=last.bias + b.reshape(-1))

    def batchnorm(
        self,
        name: str,
        kind: str,
        gamma: np.ndarray,
        beta: np.ndarray,
        mean: np.ndarray,
        var: np.ndarray,
        eps: float,
    ) -> None:
        """Fold an inference BatchNorm into the Conv2d/Linear right before it."""
        last = self.layers[-1] if self.layers else None
        if not isinstance(last, (FConv2d, FLinear)) or last.relu:
            after = type(last).__name__[1:] if last is not None else "the input"
            if getattr(last, "relu", False):
                after = "a fused ReLU"
            raise HwgenError(
                f"{kind} '{name}' cannot be folded: it must directly follow a Conv2d or Linear, "
                f"not {after}"
            )
        if np.size(mean) != last.bias.size:
            raise HwgenError(
                f"{kind} '{name}' has {np.size(mean)} channels, "
                f"'{last.name}' has {last.bias.size} outputs"
            )
        w, b = fold_batchnorm(last.weight, last.bias, gamma, beta, mean, var, eps)
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise HwgenError(f"{kind} '{name}' folds to non-finite weights (check its running_var)")
        self.layers[-1] = replace(last, weight=w, bias=b)

    def relu(self, name: str) -> None:
        """Fuse into the Conv2d/Linear right before it, else a standalone ReLU layer."""
        last = self.layers[-1] if self.layers else None
        if isinstance(last, (FConv2d, FLinear)) and not last.relu:
            self.layers[-1] = replace(last, relu=True)
        else:
            self._append(FReLU(self.name(name)), self.shape)

    def pool(self, name: str, kind: str, kernel: tuple[int, int], stride: tuple[int, int]) -> None:
        self._need(3, kind, name)
        c, h, w = self.shape
        if kernel[0] > h or kernel[1] > w:
            raise HwgenError(f"{kind} '{name}': window {kernel} too big for {_fmt(self.shape)}")
        out = (c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)
        cls = FMaxPool2d if kind == "MaxPool2d" else FAvgPool2d
        self._append(cls(self.name(name), kernel, stride), out)

    def flatten(self, name: str) -> None:
        """Flatten a (C, H, W) map in H, W, C order; a no-op on a flat vector."""
        if len(self.shape) == 1:
            return
        c, h, w = self.shape
        if h * w > 1:
            self._flattened = (c, h, w)
        self._append(FFlatten(self.name(name)), (c * h * w,))

    def finish(self, name: str) -> FloatNet:
        if self._flattened is not None:
            raise HwgenError(
                f"the model ends with a Flatten of a {_fmt(self._flattened)} map: hwgen flattens "
                "in H, W, C order, which matches the source only when a Linear follows"
            )
        return FloatNet(self.input_shape, tuple(self.layers), name)

    def _append(self, layer: FLayer, shape: tuple[int, ...]) -> None:
        self.layers.append(layer)
        self.shape = shape


def _f64(a: np.ndarray, name: str) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise HwgenError(f"layer '{name}' has non-finite (NaN or inf) weights")
    return a
