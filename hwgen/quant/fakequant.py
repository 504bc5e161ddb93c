"""The fake-quantised PyTorch model: the integer arithmetic of a Network, evaluated in float64.

Weights are ``w * 2**-frac_w``, biases ``b * 2**-frac_acc``, and every activation is rounded
in its format's rounding and saturated: ``half_up`` is ``floor(x * 2**frac + 0.5)`` (never
``torch.round``, which rounds half to even), ``half_even`` is ``torch.round`` and ``floor``
is ``torch.floor``. All values are dyadic rationals, so float64 is exact while every
accumulator, and its product with a per-output-channel scale, stays below 2**53 (checked
from the actual weights and scales); the outputs then equal the golden model's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwgen import golden as gm
from hwgen.errors import HwgenError
from hwgen.ir import (
    INPUT,
    ActFormat,
    Add,
    AvgPool2d,
    Conv2d,
    Flatten,
    GlobalAvgPool,
    Linear,
    MaxPool2d,
    Network,
    ReLU,
    SubsamplePad,
    acc_bits,
    acc_frac,
    add_range,
    requant_bits,
    signed_bits,
)

_ROUND = {
    "half_up": lambda v: torch.floor(v + 0.5),
    "half_even": torch.round,
    "floor": torch.floor,
}


def _fq(x: torch.Tensor, fmt: ActFormat, relu: bool = False) -> torch.Tensor:
    """Round to ``fmt`` in its rounding and saturate; returns the real value ``q * 2**-frac``."""
    lo = max(fmt.lo, 0) if relu else fmt.lo
    q = torch.clamp(_ROUND[fmt.rounding](x * 2.0**fmt.frac), lo, fmt.hi)
    return q * 2.0**-fmt.frac


class FakeQuantNet(nn.Module):
    """A Network as a float64 PyTorch module; ``forward`` returns every layer's real values."""

    def __init__(self, net: Network) -> None:
        super().__init__()
        self.net = net
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scales: dict[str, torch.Tensor] = {}
        for layer in net.layers:
            if isinstance(layer, (Conv2d, Linear)):
                fmt = net.in_format(layer)
                if acc_bits(layer, fmt) > 53:
                    raise HwgenError(
                        f"layer {layer.name}: accumulator of {acc_bits(layer, fmt)} bits is not "
                        "exact in float64 fake quantisation"
                    )
                self.weights[layer.name] = (
                    torch.as_tensor(layer.weight * 2.0**-layer.weight_format.frac),
                    torch.as_tensor(layer.bias * 2.0 ** -acc_frac(layer, fmt)),
                )
                if layer.scale is not None:
                    # acc * m is exact in float64 while the integer product stays below 2**53
                    if requant_bits(layer, fmt) > 53:
                        raise HwgenError(
                            f"layer {layer.name}: accumulator times scale of "
                            f"{requant_bits(layer, fmt)} bits is not exact in float64 fake "
                            "quantisation"
                        )
                    m = layer.scale * 2.0**-layer.scale_format.frac
                    self.scales[layer.name] = torch.as_tensor(m)
            elif isinstance(layer, Add):
                bits = signed_bits(*add_range(*(net.formats[i] for i in layer.inputs)))
                if bits > 53:
                    raise HwgenError(
                        f"layer {layer.name}: aligned sum of {bits} bits is not exact in "
                        "float64 fake quantisation"
                    )

    def _scaled(self, layer: Conv2d | Linear, acc: torch.Tensor) -> torch.Tensor:
        """The accumulator times the layer's per-output-channel scale, if it has one."""
        if layer.name not in self.scales:
            return acc
        m = self.scales[layer.name]
        return acc * (m.reshape(-1, 1, 1) if acc.ndim == 4 else m)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        acts = {INPUT: _fq(x.to(torch.float64), net.input_format)}
        for layer in net.layers:
            x = acts[layer.inputs[0]]
            fmt = net.in_format(layer)
            if isinstance(layer, Conv2d):
                w, b = self.weights[layer.name]
                y = F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
                x = _fq(self._scaled(layer, y), layer.out_format, layer.relu)
            elif isinstance(layer, Linear):
                w, b = self.weights[layer.name]
                x = _fq(self._scaled(layer, F.linear(x, w, b)), layer.out_format, layer.relu)
            elif isinstance(layer, Add):
                # both inputs are exact dyadic values: their float64 sum is the aligned sum
                x = _fq(x + acts[layer.inputs[1]], layer.out_format, layer.relu)
            elif isinstance(layer, ReLU):
                x = torch.relu(x)
            elif isinstance(layer, MaxPool2d):
                x = F.max_pool2d(x, layer.kernel, layer.stride)
            elif isinstance(layer, (AvgPool2d, GlobalAvgPool)):
                # integer window sum / area (a power of two, so exact), rounded in the format
                kernel = x.shape[2:] if isinstance(layer, GlobalAvgPool) else layer.kernel
                stride = kernel if isinstance(layer, GlobalAvgPool) else layer.stride
                a = F.avg_pool2d(x * 2.0**fmt.frac, tuple(kernel), tuple(stride))
                x = _ROUND[fmt.rounding](a) * 2.0**-fmt.frac
            elif isinstance(layer, SubsamplePad):
                (sh, sw), (before, after) = layer.stride, layer.pad
                x = F.pad(x[:, :, ::sh, ::sw], (0, 0, 0, 0, before, after))
            elif isinstance(layer, Flatten):
                x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) if x.ndim == 4 else x
            acts[layer.name] = x
        return [acts[layer.name] for layer in net.layers]


def fake_quant_forward(net: Network, x_float: np.ndarray) -> list[np.ndarray]:
    """Every layer's output as integers (int64) computed by :class:`FakeQuantNet`."""
    with torch.no_grad():
        outs = FakeQuantNet(net)(torch.as_tensor(np.asarray(x_float, np.float64)))
    return [
        (o * 2.0 ** net.formats[layer.name].frac).numpy().astype(np.int64)
        for o, layer in zip(outs, net.layers, strict=True)
    ]


def fake_quant_predict(net: Network, x_float: np.ndarray) -> np.ndarray:
    """Predicted class per image from the fake-quantised model."""
    out = fake_quant_forward(net, x_float)[-1]
    return out.reshape(out.shape[0], -1).argmax(axis=1)


def golden_predict(net: Network, x_float: np.ndarray) -> np.ndarray:
    """Predicted class per float image with the integer golden model."""
    return gm.predict(net, gm.quantize_input(x_float, net.input_format))


def accuracy(net: Network, x_float: np.ndarray, y: np.ndarray) -> float:
    """Fraction of images the integer golden model classifies as ``y``."""
    y = np.asarray(y)
    if y.shape != (np.asarray(x_float).shape[0],):
        raise HwgenError(f"labels have shape {y.shape}, expected ({np.asarray(x_float).shape[0]},)")
    return float(np.mean(golden_predict(net, x_float) == y))
