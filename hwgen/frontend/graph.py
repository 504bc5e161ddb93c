"""The float graph: what the importers produce and the quantizers consume.

A sequential list of float layers mirroring the IR (hwgen.ir) with real-valued weights.
Importers have already folded BatchNorm, dropped Dropout/Identity, fused a ReLU that
follows a Conv2d/Linear into its ``relu`` flag, and permuted the first Linear after a
Flatten so that Flatten is in H, W, C order (DESIGN §2 layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True, eq=False)
class FLinear:
    name: str
    weight: np.ndarray = field(repr=False)  # (out, in) float64, input in H, W, C order
    bias: np.ndarray = field(repr=False)  # (out,) float64
    relu: bool = False


@dataclass(frozen=True)
class FReLU:
    name: str


@dataclass(frozen=True)
class FMaxPool2d:
    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class FAvgPool2d:
    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class FFlatten:
    name: str


FLayer = FConv2d | FLinear | FReLU | FMaxPool2d | FAvgPool2d | FFlatten


@dataclass(frozen=True)
class FloatNet:
    """A float sequential network with its input shape (C, H, W) or (F,)."""

    input_shape: tuple[int, ...]
    layers: tuple[FLayer, ...]
    name: str = "net"

    def __post_init__(self) -> None:
        if not self.layers:
            raise HwgenError("the model has no layers")

    def layer_forward(self, layer: FLayer, x: torch.Tensor) -> torch.Tensor:
        """One layer in the dtype of ``x`` (float32 or float64)."""
        if isinstance(layer, (FConv2d, FLinear)):
            w = torch.as_tensor(layer.weight, dtype=x.dtype)
            b = torch.as_tensor(layer.bias, dtype=x.dtype)
            if isinstance(layer, FConv2d):
                y = F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
            else:
                y = F.linear(x, w, b)
            return torch.relu(y) if layer.relu else y
        if isinstance(layer, FReLU):
            return torch.relu(x)
        if isinstance(layer, FMaxPool2d):
            return F.max_pool2d(x, layer.kernel, layer.stride)
        if isinstance(layer, FAvgPool2d):
            return F.avg_pool2d(x, layer.kernel, layer.stride)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) if x.ndim == 4 else x  # HWC

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output for a float batch (NCHW or NF)."""
        outs = []
        for layer in self.layers:
            x = self.layer_forward(layer, x)
            outs.append(x)
        return outs
