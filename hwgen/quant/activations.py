"""Activation formats, chosen greedily layer by layer against the float model (Qiu et al.).

For the network input and then each Conv2d/Linear/Add output in topological order, with
every earlier layer already quantised, the fraction length is the one whose dequantised
integer outputs are closest (squared error) to the float model's activations on calibration
data. A conv/linear layer's exact integer accumulators are computed once (hwgen.golden);
each candidate fraction length is then only a requantisation of them (for an add, of the
exact sum of its two already quantised inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from hwgen import golden as gm
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
from hwgen.ir import (
    ACT_FRAC_RANGE,
    INPUT,
    ActFormat,
    Add,
    AvgPool2d,
    Conv2d,
    Flatten,
    GlobalAvgPool,
    Layer,
    Linear,
    MaxPool2d,
    Network,
    ReLU,
    SubsamplePad,
    WeightFormat,
    check_add_bits,
    requant_frac,
)
from hwgen.quant.weights import Curve

CANDIDATES = (-2, 3)  # searched fracs: the largest non-saturating one, minus 2 .. plus 3

# A conv/linear layer's IR layer for given input and output formats (weights whose integer
# form depends on the input format: a per-channel scale's bias, hwgen.quant.binarize).
LayerBuilder = Callable[[ActFormat, ActFormat], Conv2d | Linear]


@dataclass(frozen=True)
class ActSpec:
    """What the precision fixes for one activation format; None means "choose it"."""

    bits: int
    frac: int | None = None
    signed: bool | None = None


def float_activations(fnet: FloatNet, x: np.ndarray) -> list[np.ndarray]:
    """Every layer's float64 output of the float model (the reference of the greedy search)."""
    with torch.no_grad():
        outs = fnet.forward(torch.as_tensor(np.asarray(x, np.float64)))
    return [o.numpy() for o in outs]


def _fit_frac(m: float, hi: int) -> int:
    """Largest frac for which magnitude ``m`` does not saturate at ``hi``."""
    f = 0 if m <= 0 else int(np.floor(np.log2((hi + 0.5) / m)))
    return min(max(f, ACT_FRAC_RANGE[0]), ACT_FRAC_RANGE[1])


def search_frac(
    ref: np.ndarray,
    spec: ActSpec,
    signed: bool,
    quantise: Callable[[ActFormat], np.ndarray],
) -> tuple[ActFormat, np.ndarray, Curve]:
    """The format of ``spec`` minimising ``Σ (q * 2**-frac - ref)**2``; its integers and curve.

    ``quantise(fmt)`` gives the integer activations in a candidate format. A frac given in
    ``spec`` is used as it is (the curve is still reported). Ties go to the smaller frac.
    """
    hi = ActFormat(spec.bits, 0, signed).hi
    f0 = _fit_frac(float(np.abs(ref).max(initial=0.0)), hi)
    lo_f, hi_f = ACT_FRAC_RANGE
    fracs = sorted({min(max(f0 + d, lo_f), hi_f) for d in range(CANDIDATES[0], CANDIDATES[1] + 1)})
    if spec.frac is not None and spec.frac not in fracs:
        fracs = sorted([*fracs, spec.frac])
    curve: Curve = []
    best: tuple[float, int, np.ndarray] | None = None  # (error, frac, integers); keep one
    for f in fracs:
        q = quantise(ActFormat(spec.bits, f, signed))
        err = float(np.sum((q * 2.0**-f - ref) ** 2))
        curve.append((f, err))
        wanted = f == spec.frac if spec.frac is not None else best is None or err < best[0]
        if wanted:  # fracs ascend, so a tie keeps the smaller frac
            best = (err, f, q)
    assert best is not None
    return ActFormat(spec.bits, best[1], signed), best[2], curve


def _bias_at(name: str, bias: np.ndarray, frac: int) -> np.ndarray:
    """The bias at accumulator scale: ``rhu(b * 2**frac)``."""
    b = np.floor(np.asarray(bias, np.float64) * 2.0**frac + 0.5)
    if not np.all(np.abs(b) < 2.0**61):
        raise HwgenError(f"layer {name}: bias too large at accumulator frac {frac}")
    return b.astype(np.int64)


def _ir_layer(fl: FLayer) -> Layer:
    """The IR layer of a float layer without weights or a format of its own."""
    if isinstance(fl, FReLU):
        return ReLU(fl.name, fl.inputs)
    if isinstance(fl, FFlatten):
        return Flatten(fl.name, fl.inputs)
    if isinstance(fl, FMaxPool2d):
        return MaxPool2d(fl.name, fl.kernel, fl.stride, fl.inputs)
    if isinstance(fl, FAvgPool2d):
        return AvgPool2d(fl.name, fl.kernel, fl.stride, fl.inputs)
    if isinstance(fl, FGlobalAvgPool):
        return GlobalAvgPool(fl.name, fl.inputs)
    if isinstance(fl, FSubsamplePad):
        return SubsamplePad(fl.name, fl.stride, fl.pad, fl.inputs)
    raise HwgenError(f"layer {getattr(fl, 'name', '?')}: unsupported float layer {fl!r}")


def mac_layer(
    fl: FConv2d | FLinear,
    wfmt: WeightFormat,
    wq: np.ndarray,
    in_format: ActFormat,
    out_format: ActFormat,
) -> Conv2d | Linear:
    """The IR layer of a float conv/linear with integer weights; bias at accumulator scale."""
    bias = _bias_at(fl.name, fl.bias, in_format.frac + wfmt.frac)
    if isinstance(fl, FConv2d):
        cout, cin, kh, kw = fl.weight.shape
        return Conv2d(
            fl.name, cin, cout, (kh, kw), wfmt, out_format, wq, bias,
            stride=fl.stride, padding=fl.padding, relu=fl.relu, inputs=fl.inputs,
        )  # fmt: skip
    out_f, in_f = fl.weight.shape
    return Linear(fl.name, in_f, out_f, wfmt, out_format, wq, bias, relu=fl.relu, inputs=fl.inputs)


def greedy_network(
    fnet: FloatNet,
    weights: dict[str, tuple[WeightFormat, np.ndarray] | LayerBuilder],
    input_spec: ActSpec,
    layer_specs: dict[str, ActSpec],
    calib_x: np.ndarray,
    float_acts: list[np.ndarray] | None = None,
) -> tuple[Network, dict[str, Curve]]:
    """The integer network with greedily chosen activation formats, and the error curves.

    ``weights`` holds each conv/linear layer's format and integer weights, or a
    :data:`LayerBuilder` that makes its IR layer; ``layer_specs``
    each conv/linear and add layer's activation spec; ``float_acts`` may pass in
    :func:`float_activations` of ``calib_x`` when it is reused across calls. A ReLU output
    (fused into a conv/linear/add) gets an unsigned format unless the spec says otherwise.
    Curves are keyed by layer name and ``"input"``.
    """
    x = np.asarray(calib_x, np.float64)
    if x.ndim < 2 or x.shape[1:] != tuple(fnet.input_shape) or x.shape[0] == 0:
        raise HwgenError(
            f"calibration data has shape {x.shape}, expected (N, "
            f"{', '.join(map(str, fnet.input_shape))}) with N >= 1"
        )
    if not np.all(np.isfinite(x)):
        raise HwgenError("calibration data contains NaN or Inf")
    if float_acts is None:
        float_acts = float_activations(fnet, x)
    signed_in = input_spec.signed if input_spec.signed is not None else bool(x.min() < 0)
    fmt, a, curve = search_frac(x, input_spec, signed_in, lambda f: gm.quantize_input(x, f))
    ints, fmts = {INPUT: a}, {INPUT: fmt}  # every tensor so far, by name
    curves = {INPUT: curve}
    last_use = {i: k for k, fl in enumerate(fnet.layers) for i in fl.inputs}
    layers: list[Layer] = []
    for k, (fl, ref) in enumerate(zip(fnet.layers, float_acts, strict=True)):
        xs, fs = [ints[i] for i in fl.inputs], [fmts[i] for i in fl.inputs]
        for i in fl.inputs:
            if last_use[i] == k:  # big calibration sets: keep only the tensors still needed
                ints.pop(i, None)
        quantise: Callable[[ActFormat], np.ndarray]
        if isinstance(fl, (FConv2d, FLinear)):
            spec = layer_specs[fl.name]
            signed = spec.signed if spec.signed is not None else not fl.relu
            given = weights[fl.name]
            out0 = ActFormat(spec.bits, 0, signed)
            mac = given(fs[0], out0) if callable(given) else mac_layer(fl, *given, fs[0], out0)
            proto: Layer = mac
            acc_fn = gm.conv2d_acc if isinstance(mac, Conv2d) else gm.linear_acc
            acc = acc_fn(xs[0], mac, fs[0])  # once; each candidate only requantises it
            if mac.scale is not None:
                acc = acc * mac.scale.reshape(-1, *(1,) * (acc.ndim - 2))
            facc = requant_frac(mac, fs[0])

            def quantise(o: ActFormat, acc=acc, facc=facc, relu=fl.relu) -> np.ndarray:
                return gm.requantize(acc, facc - o.frac, o, relu)

        elif isinstance(fl, FAdd):
            spec = layer_specs[fl.name]
            signed = spec.signed if spec.signed is not None else not fl.relu
            check_add_bits(fl.name, *fs)
            proto = Add(fl.name, ActFormat(spec.bits, 0, signed), fl.inputs, fl.relu)

            def quantise(o: ActFormat, proto=proto, xs=xs, fs=fs) -> np.ndarray:
                return gm.layer_forward(replace(proto, out_format=o), xs, fs)

        else:
            layer = _ir_layer(fl)
            ints[fl.name], fmts[fl.name] = gm.layer_forward(layer, xs, fs), fs[0]
            layers.append(layer)
            continue
        out_fmt, ints[fl.name], curves[fl.name] = search_frac(ref, spec, signed, quantise)
        fmts[fl.name] = out_fmt
        layers.append(replace(proto, out_format=out_fmt))
    net = Network(tuple(fnet.input_shape), fmts[INPUT], tuple(layers), fnet.name)
    return net, curves
