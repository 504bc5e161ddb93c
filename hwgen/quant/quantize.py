"""The quantize entry point: FloatNet + Precision + calibration data -> integer Network.

Weights first (per scheme), then activation formats greedily layer by layer in topological
order, add outputs included (hwgen.quant.activations). The returned precision is fully
resolved, so quantising again with it gives the identical Network (INQ too, for the same
seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FAdd, FConv2d, FLinear, FloatNet
from hwgen.ir import Add, Conv2d, Fixed, Linear, Network, Pow2, WeightFormat
from hwgen.quant import weights as wq
from hwgen.quant.activations import ActSpec, Curve, greedy_network
from hwgen.quant.inq import InqOptions, inq
from hwgen.quant.precision import AddPrecision, InputPrecision, LayerPrecision, Precision

DEFAULT_WEIGHT_BITS = {"fixed": 8, "inq": 5, "pow2": 5, "ternary": 2, "binary": 1, "auto": None}
DEFAULT_ACT_BITS = 8
RETRAINED = ("inq", "ternary", "binary")


@dataclass(frozen=True, eq=False)
class QuantResult:
    """A quantised network, the precision that reproduces it, and what the search saw.

    ``weight_curves``: per conv/linear layer, candidate weight frac (fixed) or emax (pow2)
    -> squared weight error. ``act_curves``: per conv/linear/add layer and ``"input"``,
    candidate act_frac -> squared activation error. ``detected``: per layer, the grid found
    by the auto scheme.
    ``float_weights``: the float weights before quantisation (for INQ: the retrained ones
    just before the last step). ``float_net``: the float model the activation formats were
    chosen for (for INQ: the retrained one, its weights on their powers of two).
    """

    net: Network
    precision: Precision
    detected: dict[str, str] = field(default_factory=dict)
    weight_curves: dict[str, Curve] = field(default_factory=dict)
    act_curves: dict[str, Curve] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    float_net: FloatNet | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The scheme and formats (add layers: the output's), for the ``.hwq`` meta object."""
        formats: dict[str, dict[str, str]] = {}
        for layer in self.net.layers:
            if isinstance(layer, (Conv2d, Linear)):
                formats[layer.name] = {
                    "weight": str(layer.weight_format),
                    "out": str(layer.out_format),
                }
            elif isinstance(layer, Add):
                formats[layer.name] = {"out": str(layer.out_format)}
        meta: dict[str, Any] = {
            "scheme": self.precision.scheme,
            "input_format": str(self.net.input_format),
            "formats": formats,
        }
        if self.detected:
            meta["detected"] = dict(self.detected)
        return meta


def _weight_bits(scheme: str, lp: LayerPrecision) -> int | None:
    bits = lp.weight_bits if lp.weight_bits is not None else DEFAULT_WEIGHT_BITS[scheme]
    if scheme in ("ternary", "binary") and bits != DEFAULT_WEIGHT_BITS[scheme]:
        raise HwgenError(
            f"scheme {scheme} has {DEFAULT_WEIGHT_BITS[scheme]}-bit weights, not {bits}"
        )
    return bits


def _claimed(name: str, w: np.ndarray, lp: LayerPrecision) -> tuple[WeightFormat, np.ndarray]:
    """Auto scheme: the detected grid, or the one the precision claims (checked exactly)."""
    found = wq.detect_format(name, w) if lp.weight_frac is None and lp.emax is None else None
    if lp.emax is not None:
        bits = lp.weight_bits if lp.weight_bits is not None else 5
        fmt: WeightFormat = Pow2(bits, lp.emax)
    elif lp.weight_frac is not None:
        fmt = Fixed(lp.weight_bits if lp.weight_bits is not None else 8, lp.weight_frac)
    elif lp.weight_bits is not None and isinstance(found, Pow2):
        fmt = Pow2(lp.weight_bits, found.emax)
    elif lp.weight_bits is not None and isinstance(found, Fixed):
        fmt = Fixed(lp.weight_bits, found.frac)
    else:
        assert found is not None
        fmt = found
    return fmt, wq.encode_exact(name, w, fmt)


def _pow2_format(scheme: str, bits: int, w: np.ndarray, curve: Curve, emax: int | None) -> Pow2:
    if emax is not None:
        return Pow2(bits, emax)
    if bits <= 2:
        # One magnitude only: n1 (made for the top of many levels) would zero most weights;
        # the least-squares level is the sensible single scale.
        return Pow2(bits, min(curve, key=lambda ce: (ce[1], ce[0]))[0])
    return Pow2(bits, wq.inq_emax(w))


def quantize(
    fnet: FloatNet,
    precision: Precision,
    calib_x: np.ndarray,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    progress: bool = True,
    inq_options: InqOptions | None = None,
    float_acts: list[np.ndarray] | None = None,
) -> QuantResult:
    """Quantise ``fnet`` as ``precision`` says; unset values are chosen (see module doc).

    ``train`` (images, labels) is needed by the retrained schemes (inq, ternary, binary).
    ``float_acts`` may pass the float model's activations on ``calib_x`` to save their
    recomputation when quantising the same model many times (fixed, pow2, auto only).
    """
    scheme = precision.scheme
    macs = [fl for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    adds = [fl.name for fl in fnet.layers if isinstance(fl, FAdd)]
    precision.check_names([fl.name for fl in macs], adds)
    formats: dict[str, tuple[WeightFormat, np.ndarray]] = {}
    weight_curves: dict[str, Curve] = {}
    detected: dict[str, str] = {}
    float_weights = {fl.name: np.asarray(fl.weight, np.float64) for fl in macs}
    pow2_fmts: dict[str, Pow2] = {}
    for fl in macs:
        lp = precision.layer(fl.name)
        assert isinstance(lp, LayerPrecision)  # check_names: only adds are AddPrecision
        w = float_weights[fl.name]
        bits = _weight_bits(scheme, lp)
        if scheme == "auto":
            fmt, q = _claimed(fl.name, w, lp)
            detected[fl.name] = str(fmt)
            formats[fl.name] = (fmt, q)
        elif scheme == "fixed":
            assert bits is not None
            weight_curves[fl.name] = wq.fixed_curve(w, bits)
            frac = lp.weight_frac if lp.weight_frac is not None else wq.best_weight_frac(w, bits)
            fmt = Fixed(bits, frac)
            formats[fl.name] = (fmt, wq.quantize_fixed(w, fmt))
        else:
            assert bits is not None
            weight_curves[fl.name] = wq.pow2_curve(w, bits)
            pow2_fmts[fl.name] = _pow2_format(scheme, bits, w, weight_curves[fl.name], lp.emax)
            formats[fl.name] = (pow2_fmts[fl.name], wq.quantize_pow2(w, pow2_fmts[fl.name]))
    if scheme in RETRAINED:
        if train is None:
            raise HwgenError(f"scheme {scheme} retrains the model: it needs labelled training data")
        options = inq_options or InqOptions()
        fnet, float_weights = inq(fnet, pow2_fmts, train, options, progress=progress)
        float_acts = None  # the retrained model is the new reference
        for fl in fnet.layers:
            if isinstance(fl, (FConv2d, FLinear)):
                fmt = pow2_fmts[fl.name]
                formats[fl.name] = (fmt, wq.encode_exact(fl.name, fl.weight, fmt))
    specs = {}
    for name in [fl.name for fl in macs] + adds:
        ap = precision.layer(name)
        bits = ap.act_bits if ap.act_bits is not None else DEFAULT_ACT_BITS
        specs[name] = ActSpec(bits, ap.act_frac, ap.act_signed)
    ip = precision.input
    in_spec = ActSpec(
        ip.act_bits if ip.act_bits is not None else DEFAULT_ACT_BITS, ip.act_frac, ip.act_signed
    )
    net, act_curves = greedy_network(fnet, formats, in_spec, specs, calib_x, float_acts)
    return QuantResult(
        net, resolved(net, scheme), detected, weight_curves, act_curves, float_weights, fnet
    )


def resolved(net: Network, scheme: str) -> Precision:
    """The precision that states every format of ``net`` explicitly."""
    layers: dict[str, LayerPrecision | AddPrecision] = {}
    for layer in net.layers:
        if isinstance(layer, Add):
            of = layer.out_format
            layers[layer.name] = AddPrecision(of.bits, of.frac, of.signed)
        if isinstance(layer, (Conv2d, Linear)):
            wf, of = layer.weight_format, layer.out_format
            layers[layer.name] = LayerPrecision(
                weight_bits=wf.bits,
                act_bits=of.bits,
                weight_frac=wf.frac if isinstance(wf, Fixed) else None,
                emax=wf.emax if isinstance(wf, Pow2) else None,
                act_frac=of.frac,
                act_signed=of.signed,
            )
    f = net.input_format
    return Precision(scheme, layers, InputPrecision(f.bits, f.frac, f.signed))
