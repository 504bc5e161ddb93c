"""The float graph: what the importers produce and the quantizers consume.

A list of float layers in topological order mirroring the IR (hwgen.ir) with real-valued
weights; like the IR, each layer names its inputs (empty: the layer before it). Importers
have already folded BatchNorm, dropped Dropout/Identity, fused a ReLU that follows a
Conv2d/Linear into its ``relu`` flag, and permuted the first Linear after a Flatten so that
Flatten is in H, W, C order (DESIGN §2 layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from hwgen.errors import HwgenError


@dataclass(frozen=True, eq=False)
class FConv2d:
    name: str
    weight: np.ndarray = field(repr=False)  # (Cout, Cin, KH, KW) float64
    bias: np.ndarray = field(repr=False)  # (Cout,) float64
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    relu: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class FLinear:
    name: str
    weight: np.ndarray = field(repr=False)  # (out, in) float64, input in H, W, C order
    bias: np.ndarray = field(repr=False)  # (out,) float64
    relu: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FReLU:
    name: str
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FMaxPool2d:
    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FAvgPool2d:
    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FFlatten:
    name: str
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FGlobalAvgPool:
    name: str
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FSubsamplePad:
    name: str
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)  # zero channels before, after
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FAdd:
    name: str
    inputs: tuple[str, ...] = ()
    relu: bool = False


FLayer = (
    FConv2d
    | FLinear
    | FReLU
    | FMaxPool2d
    | FAvgPool2d
    | FFlatten
    | FGlobalAvgPool
    | FSubsamplePad
    | FAdd
)
MAC_TYPES = (FConv2d, FLinear)


@dataclass(frozen=True)
class FloatNet:
    """A float network with its input shape (C, H, W) or (F,); layers in topological order.

    A layer given without inputs reads the one before it; the last layer is the output.
    """

    input_shape: tuple[int, ...]
    layers: tuple[FLayer, ...]
    name: str = "net"

    def __post_init__(self) -> None:
        if not self.layers:
            raise HwgenError("the model has no layers")
        prev, layers, seen = "input", [], {"input"}
        for layer in self.layers:
            if not layer.inputs:
                layer = replace(layer, inputs=(prev,))
            missing = [i for i in layer.inputs if i not in seen]
            if missing:
                raise HwgenError(
                    f"layer {layer.name}: input {missing[0]!r} is not defined before it"
                )
            seen.add(layer.name)
            layers.append(layer)
            prev = layer.name
        object.__setattr__(self, "layers", tuple(layers))

    def layer_forward(self, layer: FLayer, *xs: torch.Tensor) -> torch.Tensor:
        """One layer in the dtype of its inputs (float32 or float64)."""
        x = xs[0]
        if isinstance(layer, (FConv2d, FLinear)):
            w = torch.as_tensor(layer.weight, dtype=x.dtype)
            b = torch.as_tensor(layer.bias, dtype=x.dtype)
            if isinstance(layer, FConv2d):
                y = F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
            else:
                y = F.linear(x, w, b)
            return torch.relu(y) if layer.relu else y
        if isinstance(layer, FAdd):
            y = x + xs[1]
            return torch.relu(y) if layer.relu else y
        if isinstance(layer, FReLU):
            return torch.relu(x)
        if isinstance(layer, FMaxPool2d):
            return F.max_pool2d(x, layer.kernel, layer.stride)
        if isinstance(layer, FAvgPool2d):
            return F.avg_pool2d(x, layer.kernel, layer.stride)
        if isinstance(layer, FGlobalAvgPool):
            return x.mean(dim=(2, 3), keepdim=True)
        if isinstance(layer, FSubsamplePad):
            (sh, sw), (before, after) = layer.stride, layer.pad
            return F.pad(x[:, :, ::sh, ::sw], (0, 0, 0, 0, before, after))
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) if x.ndim == 4 else x  # HWC

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output for a float batch (NCHW or NF), in layer order."""
        acts = {"input": x}
        for layer in self.layers:
            acts[layer.name] = self.layer_forward(layer, *(acts[i] for i in layer.inputs))
        return [acts[layer.name] for layer in self.layers]
