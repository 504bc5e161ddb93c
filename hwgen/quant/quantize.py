"""The quantize entry point: FloatNet + Precision + calibration data -> integer Network.

Weights first (per scheme), then activation formats greedily layer by layer in topological
order, add outputs included (hwgen.quant.activations). The returned precision is fully
resolved, so quantising again with it gives the identical Network (INQ and the learned
schemes too, for the same seed).

The learned schemes (issue #11) retrain the float model with its weights quantised and
search the activation formats on the retrained model, whose weights are exactly the
quantised ones; the integer layers come from the quantiser's export:

- ``bc``, ``twn``, ``lab``, ``lat`` (:mod:`hwgen.quant.binarize`): ``Pow2(1, 0)`` /
  ``Pow2(2, 0)`` codes with each output channel's ``α_c`` as the per-channel scale ``m_c``
  (8-bit Fixed), :func:`hwgen.quant.binarize.scaled_mac_layer`;
- ``dqc`` (with a pinned zero entry), ``ttq`` (:mod:`hwgen.quant.codebook`): ``Codebook``
  weights, the layer holding the entries' integer values;
- ``amq`` (:mod:`hwgen.quant.multibit`, M planes per output channel): ``Planes`` weights
  (:func:`hwgen.quant.multibit.plane_format`, 8-bit ``m_ic``), the layer holding the exact
  integers ``Σ_i m_ic·b_i``; the engine adds or subtracts per plane and multiplies the M
  plane sums by the ``m_ic`` once per output.

Compression (issue #12) comes first, as the precision says: the low-rank split
(:func:`hwgen.quant.lowrank.lowrank`, retrained), then pruning
(:func:`hwgen.quant.prune.prune`, retrained), both with INQ's retraining settings, then the
weight scheme, which must keep the pruned weights at 0: ``fixed`` and ``pow2`` round 0.0 to
0 (``pow2`` needs a zero level: 2 bits or more), ``inq`` and ``ternary`` run
:func:`hwgen.quant.prune.masked_inq`, the learned schemes with a zero code (``twn``,
``lat``, ``ttq``, ``dqc`` with its zero entry) retrain with the prune masks, holding the
pruned weights at that code. ``binary``, ``bc``, ``lab``, ``amq`` and ``dqc`` without a zero
entry have no zero, and ``auto`` finds no grid in retrained weights: they refuse pruning
(:func:`prune_refusal`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FAdd, FConv2d, FLinear, FloatNet
from hwgen.ir import Add, Codebook, Conv2d, Fixed, Linear, Network, Pow2, WeightFormat
from hwgen.quant import weights as wq
from hwgen.quant.activations import ActSpec, Curve, LayerBuilder, greedy_network
from hwgen.quant.binarize import (
    RetrainOptions,
    ScaledCodes,
    binarize,
    retrain,
    scaled_mac_layer,
)
from hwgen.quant.codebook import CodebookOptions, dqc, ttq
from hwgen.quant.inq import InqOptions, inq
from hwgen.quant.lowrank import decompose, lowrank
from hwgen.quant.multibit import alternating, plane_format
from hwgen.quant.precision import (
    LEARNED,
    AddPrecision,
    InputPrecision,
    LayerPrecision,
    Precision,
)
from hwgen.quant.prune import block_sparsity, masked_inq, prune

DEFAULT_WEIGHT_BITS = {
    "fixed": 8, "inq": 5, "pow2": 5, "ternary": 2, "binary": 1, "auto": None, "bc": 1,
    "lab": 1, "twn": 2, "lat": 2, "ttq": 2, "dqc": 4, "amq": 2,
}  # fmt: skip
DEFAULT_ACT_BITS = 8
RETRAINED = ("inq", "ternary", "binary", *LEARNED)
# the schemes that keep pruned weights at 0 (pow2, inq, ternary: with a zero level; dqc:
# with its zero entry)
PRUNABLE = ("fixed", "pow2", "inq", "ternary", "twn", "lat", "ttq", "dqc")
NO_ZERO = {
    "binary": "its weights are ±1",
    "bc": "its binary codes are ±1",
    "lab": "its binary codes are ±1",
    "amq": "its binary planes are ±1",
    "auto": "its weights were quantized elsewhere and are not retrained",
}

WeightSource = tuple[WeightFormat, np.ndarray] | LayerBuilder


@dataclass(frozen=True, eq=False)
class QuantResult:
    """A quantised network, the precision that reproduces it, and what the search saw.

    ``weight_curves``: per conv/linear layer, candidate weight frac (fixed) or emax (pow2)
    -> squared weight error. ``act_curves``: per conv/linear/add layer and ``"input"``,
    candidate act_frac -> squared activation error. ``detected``: per layer, the grid found
    by the auto scheme.
    ``float_weights``: the float weights before quantisation (for INQ: the retrained ones
    just before the last step). ``float_net``: the float model the activation formats were
    chosen for (for INQ and the learned schemes: the retrained one, its weights exactly the
    quantised ones). ``weights``: each conv/linear layer's integer weights (or how to build
    its layer) as the activation search took them (:func:`with_activations` reuses them).
    """

    net: Network
    precision: Precision
    detected: dict[str, str] = field(default_factory=dict)
    weight_curves: dict[str, Curve] = field(default_factory=dict)
    act_curves: dict[str, Curve] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    float_net: FloatNet | None = None
    weights: dict[str, WeightSource] = field(default_factory=dict)

    @property
    def meta(self) -> dict[str, Any]:
        """The scheme and formats (add layers: the output's; a per-channel scale's format too),
        for the ``.hwq`` meta object."""
        formats: dict[str, dict[str, str]] = {}
        for layer in self.net.layers:
            if isinstance(layer, (Conv2d, Linear)):
                formats[layer.name] = {
                    "weight": str(layer.weight_format),
                    "out": str(layer.out_format),
                }
                if layer.scale_format is not None:
                    formats[layer.name]["scale"] = str(layer.scale_format)
            elif isinstance(layer, Add):
                formats[layer.name] = {"out": str(layer.out_format)}
        meta: dict[str, Any] = {
            "scheme": self.precision.scheme,
            "input_format": str(self.net.input_format),
            "formats": formats,
        }
        if self.detected:
            meta["detected"] = dict(self.detected)
        p = self.precision
        if p.pruned:
            block = p.block or 1
            meta["prune"] = {"block": block, "sparsity": p.pruned, "achieved": {
                layer.name: block_sparsity(layer.weight, block)
                for layer in self.net.layers if isinstance(layer, (Conv2d, Linear))
            }}  # fmt: skip
        if p.lowrank is not None or p.lowrank_energy is not None:
            meta["lowrank"] = {
                k: v
                for k, v in (
                    ("rank", p.lowrank),
                    ("energy", p.lowrank_energy),
                    ("layers", list(p.lowrank_layers) if p.lowrank_layers else None),
                )
                if v is not None
            }
        return meta


def _weight_bits(scheme: str, lp: LayerPrecision) -> int | None:
    bits = lp.weight_bits if lp.weight_bits is not None else DEFAULT_WEIGHT_BITS[scheme]
    fixed_width = ("ternary", "binary", "bc", "lab", "twn", "lat", "ttq")
    if scheme in fixed_width and bits != DEFAULT_WEIGHT_BITS[scheme]:
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


def _learned(
    fnet: FloatNet,
    scheme: str,
    bits: dict[str, int],
    train: tuple[np.ndarray, np.ndarray],
    retrain_options: RetrainOptions | None,
    codebook_options: CodebookOptions | None,
    progress: bool,
    masks: dict[str, np.ndarray] | None = None,
) -> tuple[FloatNet, dict[str, WeightSource]]:
    """Retrain ``fnet`` with a learned scheme; each layer's weights as the search takes them.
    ``masks``: the pruned weights (False) held at the zero code (twn, lat, ttq, dqc)."""
    sources: dict[str, WeightSource] = {}
    if scheme in ("dqc", "ttq"):
        options = codebook_options or CodebookOptions()
        if scheme == "dqc":
            fnet, books = dqc(
                fnet, bits, train, zero=options.zero, options=options, progress=progress,
                masks=masks,
            )  # fmt: skip
        else:
            fnet, books = ttq(fnet, train, options=options, progress=progress, masks=masks)
        for name, cb in books.items():
            sources[name] = (Codebook(cb.entries, cb.frac), cb.integers)
        return fnet, sources
    options = retrain_options or RetrainOptions()
    if scheme == "amq":

        def planes(m: int) -> Callable[[np.ndarray, np.ndarray | None], ScaledCodes]:
            return lambda w, d: alternating(w, m, options.per_channel)

        quantizers = {name: planes(m) for name, m in bits.items()}
        fnet, codes = retrain(
            fnet, quantizers, train, options, label="amq retraining", progress=progress
        )
        for name, sc in codes.items():
            sources[name] = plane_format(sc)
        return fnet, sources
    fnet, codes = binarize(fnet, scheme, train, options, progress=progress, masks=masks)
    by_name = {fl.name: fl for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))}
    for name, sc in codes.items():
        sources[name] = functools.partial(scaled_mac_layer, by_name[name], sc)
    return fnet, sources


def _lowrank_asked(precision: Precision) -> bool:
    return precision.lowrank is not None or precision.lowrank_energy is not None


def split_net(fnet: FloatNet, precision: Precision) -> FloatNet:
    """``fnet`` with the layers ``precision`` asks split (not retrained): its layer names are
    those the precision's tables use."""
    if not _lowrank_asked(precision):
        return fnet
    layers = _lowrank_layers(fnet, precision)
    return decompose(fnet, precision.lowrank, precision.lowrank_energy, layers)


def _lowrank_layers(fnet: FloatNet, precision: Precision) -> tuple[str, ...]:
    """The layers to split: those named, else every conv layer (splitting a small
    classifier costs 8-26 points on digits, :mod:`hwgen.quant.lowrank`)."""
    if precision.lowrank_layers is not None:
        return precision.lowrank_layers
    return tuple(fl.name for fl in fnet.layers if isinstance(fl, FConv2d))


def prune_refusal(scheme: str, codebook_options: CodebookOptions | None = None) -> str | None:
    """Why ``scheme`` (with these dqc options) cannot keep pruned weights at 0; None if it can
    (a pow2 scheme's bits are checked by :func:`quantize`)."""
    if scheme == "dqc" and not (codebook_options or CodebookOptions()).zero:
        return "scheme dqc without its zero entry (--no-zero) cannot keep pruned weights at zero"
    if scheme in PRUNABLE:
        return None
    why = NO_ZERO.get(scheme, "it has no zero weight")
    return (
        f"scheme {scheme} cannot keep pruned weights at zero: prune with {', '.join(PRUNABLE)} "
        f"({why})"
    )


def _check_prunable(
    scheme: str, precision: Precision, codebook_options: CodebookOptions | None
) -> None:
    """Refuse a scheme that would not keep the pruned weights at 0, before any retraining."""
    pruned = precision.pruned
    if not pruned:
        if precision.block is not None:
            raise HwgenError(f"block {precision.block}: no layer is pruned (give a prune target)")
        return
    refusal = prune_refusal(scheme, codebook_options)
    if refusal is not None:
        raise HwgenError(refusal)
    for name in pruned:
        lp = precision.layer(name)
        bits = getattr(lp, "weight_bits", None) or DEFAULT_WEIGHT_BITS[scheme]
        if scheme in ("pow2", "inq", "ternary") and bits < 2:
            raise HwgenError(
                f"layer {name}: scheme {scheme} at {bits} bit has no zero weight to prune to"
            )


def quantize(
    fnet: FloatNet,
    precision: Precision,
    calib_x: np.ndarray,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    progress: bool = True,
    inq_options: InqOptions | None = None,
    retrain_options: RetrainOptions | None = None,
    codebook_options: CodebookOptions | None = None,
    float_acts: list[np.ndarray] | None = None,
) -> QuantResult:
    """Quantise ``fnet`` as ``precision`` says; unset values are chosen (see module doc).

    ``train`` (images, labels) is needed by the retrained schemes (``RETRAINED``).
    ``inq_options`` set INQ's retraining (inq, ternary, binary), ``retrain_options`` that of
    bc, twn, lab, lat and amq, ``codebook_options`` that of dqc and ttq.
    ``float_acts`` may pass the float model's activations on ``calib_x`` to save their
    recomputation when quantising the same model many times (fixed, pow2, auto only).
    Low-rank and pruning (see the module doc) retrain with ``inq_options`` and need ``train``
    whatever the scheme; the precision's layer names are those after the split
    (:func:`split_net`).
    """
    scheme = precision.scheme
    compressed = _lowrank_asked(precision) or bool(precision.pruned)
    if compressed and scheme == "auto":
        raise HwgenError("scheme auto keeps weights quantized elsewhere: it cannot be retrained")
    if compressed and train is None:
        raise HwgenError("low-rank and pruning retrain the model: they need labelled training data")
    if _lowrank_asked(precision):
        precision = replace(precision, lowrank_layers=_lowrank_layers(fnet, precision))
    split = split_net(fnet, precision)  # checked before any retraining
    adds = [fl.name for fl in split.layers if isinstance(fl, FAdd)]
    precision.check_names(
        [fl.name for fl in split.layers if isinstance(fl, (FConv2d, FLinear))], adds
    )
    _check_prunable(scheme, precision, codebook_options)
    if compressed:
        float_acts = None  # the retrained model is the new reference
    if _lowrank_asked(precision):
        assert train is not None
        fnet = lowrank(
            fnet, train, precision.lowrank, precision.lowrank_energy, precision.lowrank_layers,
            inq_options, progress=progress,
        )  # fmt: skip
    masks = None
    if precision.pruned:
        assert train is not None
        fnet, masks = prune(
            fnet, train, precision.pruned, precision.block, options=inq_options, progress=progress
        )
    macs = [fl for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    sources: dict[str, WeightSource] = {}
    weight_curves: dict[str, Curve] = {}
    detected: dict[str, str] = {}
    float_weights = {fl.name: np.asarray(fl.weight, np.float64) for fl in macs}
    pow2_fmts: dict[str, Pow2] = {}
    learned_bits: dict[str, int] = {}
    for fl in macs:
        lp = precision.layer(fl.name)
        assert isinstance(lp, LayerPrecision)  # check_names: only adds are AddPrecision
        w = float_weights[fl.name]
        bits = _weight_bits(scheme, lp)
        if scheme in LEARNED:
            assert bits is not None
            learned_bits[fl.name] = bits
        elif scheme == "auto":
            fmt, q = _claimed(fl.name, w, lp)
            detected[fl.name] = str(fmt)
            sources[fl.name] = (fmt, q)
        elif scheme == "fixed":
            assert bits is not None
            weight_curves[fl.name] = wq.fixed_curve(w, bits)
            frac = lp.weight_frac if lp.weight_frac is not None else wq.best_weight_frac(w, bits)
            fmt = Fixed(bits, frac)
            sources[fl.name] = (fmt, wq.quantize_fixed(w, fmt))
        else:
            assert bits is not None
            weight_curves[fl.name] = wq.pow2_curve(w, bits)
            pow2_fmts[fl.name] = _pow2_format(scheme, bits, w, weight_curves[fl.name], lp.emax)
            sources[fl.name] = (pow2_fmts[fl.name], wq.quantize_pow2(w, pow2_fmts[fl.name]))
    if scheme in RETRAINED:
        if train is None:
            raise HwgenError(f"scheme {scheme} retrains the model: it needs labelled training data")
        float_acts = None  # the retrained model is the new reference
    if scheme in LEARNED:
        assert train is not None
        fnet, sources = _learned(
            fnet, scheme, learned_bits, train, retrain_options, codebook_options, progress, masks
        )
    elif scheme in RETRAINED:
        assert train is not None
        options = inq_options or InqOptions()
        if masks is not None:
            fnet = masked_inq(fnet, masks, pow2_fmts, train, options, progress=progress)
        else:
            fnet, float_weights = inq(fnet, pow2_fmts, train, options, progress=progress)
        for fl in fnet.layers:
            if isinstance(fl, (FConv2d, FLinear)):
                fmt = pow2_fmts[fl.name]
                sources[fl.name] = (fmt, wq.encode_exact(fl.name, fl.weight, fmt))
    net, act_curves = _search(fnet, sources, precision, calib_x, float_acts)
    return QuantResult(
        net,
        resolved(net, scheme, learned_bits, like=precision),
        detected,
        weight_curves,
        act_curves,
        float_weights,
        fnet,
        sources,
    )


def _search(
    fnet: FloatNet,
    sources: dict[str, WeightSource],
    precision: Precision,
    calib_x: np.ndarray,
    float_acts: list[np.ndarray] | None,
) -> tuple[Network, dict[str, Curve]]:
    """The greedy activation formats for these weights, as ``precision`` asks."""
    specs = {}
    for fl in fnet.layers:
        if isinstance(fl, (FConv2d, FLinear, FAdd)):
            ap = precision.layer(fl.name)
            bits = ap.act_bits if ap.act_bits is not None else DEFAULT_ACT_BITS
            specs[fl.name] = ActSpec(bits, ap.act_frac, ap.act_signed)
    ip = precision.input
    in_spec = ActSpec(
        ip.act_bits if ip.act_bits is not None else DEFAULT_ACT_BITS, ip.act_frac, ip.act_signed
    )
    return greedy_network(fnet, sources, in_spec, specs, calib_x, float_acts)


def with_activations(base: QuantResult, precision: Precision, calib_x: np.ndarray) -> QuantResult:
    """``base``'s retrained model and integer weights with the activation formats chosen
    again as ``precision`` says (its weight settings are not read: the weights are kept).
    The result's precision reproduces it (``base``'s scheme, seed and options)."""
    assert base.float_net is not None
    net, act_curves = _search(base.float_net, base.weights, precision, calib_x, None)
    scheme = base.precision.scheme
    bits = {
        n: lp.weight_bits
        for n, lp in base.precision.layers.items()
        if isinstance(lp, LayerPrecision)
    }
    precision = resolved(net, scheme, bits, like=base.precision)
    return replace(base, net=net, precision=precision, act_curves=act_curves)


def resolved(
    net: Network,
    scheme: str,
    learned_bits: Mapping[str, int | None] | None = None,
    like: Precision | None = None,
) -> Precision:
    """The precision that states every format of ``net`` explicitly.

    A learned scheme's layers state the scheme's bits (``learned_bits``, per layer; the
    scheme's default where missing) and no weight frac or emax: they are learned again.
    The compression settings (prune targets, block, low rank) are ``like``'s.
    """
    learned_bits = learned_bits or {}
    layers: dict[str, LayerPrecision | AddPrecision] = {}
    for layer in net.layers:
        if isinstance(layer, Add):
            of = layer.out_format
            layers[layer.name] = AddPrecision(of.bits, of.frac, of.signed)
        if isinstance(layer, (Conv2d, Linear)):
            wf, of = layer.weight_format, layer.out_format
            if scheme in LEARNED:
                got = learned_bits.get(layer.name)
                lp = LayerPrecision(
                    weight_bits=got if got is not None else DEFAULT_WEIGHT_BITS[scheme]
                )
            else:
                lp = LayerPrecision(
                    weight_bits=wf.bits,
                    weight_frac=wf.frac if isinstance(wf, Fixed) else None,
                    emax=wf.emax if isinstance(wf, Pow2) else None,
                )
            prune = like.pruned.get(layer.name) if like is not None else None
            layers[layer.name] = replace(
                lp, act_bits=of.bits, act_frac=of.frac, act_signed=of.signed, prune=prune
            )
    f = net.input_format
    p = Precision(scheme, layers, InputPrecision(f.bits, f.frac, f.signed))
    if like is None:
        return p
    return replace(
        p,
        block=like.block if like.pruned else None,
        lowrank=like.lowrank,
        lowrank_energy=like.lowrank_energy,
        lowrank_layers=like.lowrank_layers,
    )
