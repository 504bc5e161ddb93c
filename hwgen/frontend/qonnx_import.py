"""Quantized ONNX in: Brevitas exports become an integer :class:`hwgen.ir.Network`, formats kept.

Two encodings of one model are read (``brevitas.export.export_qonnx`` and
``export_onnx_qcdq``):

- QONNX: ``Quant(x, scale, zero_point, bit_width)`` (attributes ``signed``, ``narrow``,
  ``rounding_mode``) and ``BipolarQuant(x, scale)``;
- QCDQ: ``QuantizeLinear`` [-> ``Clip``] -> ``DequantizeLinear`` on activations, and an
  integer constant [-> ``Clip``] -> ``DequantizeLinear`` (or ``QuantizeLinear`` of a float
  constant) on weights and biases; ``QuantizeLinear`` rounds half to even.

Every scale must be one power of two per tensor (``2**-frac``) with zero point 0; anything
else is refused in one line naming the node and the scale (per-channel scales: refused as
such). The graph around the quantizers is read by the plain ONNX importer
(:mod:`hwgen.frontend.onnx_import`: Conv, Gemm, MatMul + Add, Add, Relu, MaxPool,
AveragePool, GlobalAveragePool, Flatten, Reshape, ...), then each layer gets its formats:

- weights: the quantizer's grid, exactly: ``Pow2`` when every weight is 0 or a signed
  power of two that a Pow2 of at most the quantizer's bits holds (ternary; ``BipolarQuant``
  or a 1-bit signed ``Quant`` is binary), else ``Fixed(bits, frac)`` with the quantizer's
  bits (one more for an unsigned weight quantizer);
- biases: quantized (Brevitas ``Int*Bias``, at the accumulator scale) or float, they must
  lie exactly on the accumulator grid ``2**-(frac_in + frac_w)``; a float bias off that
  grid is refused, never rounded, so the integer network computes what the file computes;
- activations: the quantizer after a Conv/Gemm/MatMul/Add output (before or after its
  Relu) is that layer's output format: ``bits``, ``frac``, ``signed`` and the rounding
  (``ROUND`` is ``half_even``, ``FLOOR`` is ``floor``; others are refused). The first
  quantizer on the input is the input format. A layer output without a quantizer keeps its
  exact value (accumulator frac, as many bits as its range needs, at most 24). Any other
  quantizer must change nothing (the tensor is already on its grid) — except the one after
  an average pool, which must round to the pool's input scale in that input's rounding
  (what hwgen's average pool does). Narrow-range and binary activations are refused;
  BatchNormalization too (it cannot be folded into quantized weights exactly).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from hwgen.errors import HwgenError
from hwgen.frontend import onnx_import as ox
from hwgen.frontend.builder import INPUT, identifier
from hwgen.frontend.graph import FAdd, FAvgPool2d, FConv2d, FGlobalAvgPool, FLinear, FReLU
from hwgen.ir import (
    ACT_BITS_MAX,
    ActFormat,
    Add,
    Fixed,
    Layer,
    Network,
    WeightFormat,
    acc_range,
    add_frac,
    add_range,
    signed_bits,
)
from hwgen.quant import weights as wq
from hwgen.quant.activations import _ir_layer, mac_layer

QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")
_QONNX_OPS = ("Quant", "BipolarQuant")
_QCDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_ROUNDING = {"ROUND": "half_even", "HALF_EVEN": "half_even", "FLOOR": "floor"}
_MAC_OPS = ("Conv", "Gemm", "MatMul")
# Constant ops that keep a weight's values (a quantized weight's grid passes through them).
_KEEPS_GRID = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast")


@dataclass(frozen=True)
class Grid:
    """A quantizer: integers ``lo .. hi`` times ``2**-frac``; ``rounding`` None for binary."""

    where: str
    frac: int
    lo: int
    hi: int
    rounding: str | None

    @property
    def binary(self) -> bool:
        return self.rounding is None

    def act_format(self) -> ActFormat:
        """The activation format of this quantizer (one line naming it if there is none)."""
        if self.binary:
            raise HwgenError(f"{self.where}: binary (bipolar) activations are not supported")
        signed = self.lo < 0
        bits = signed_bits(self.lo, self.hi) if signed else max(self.hi.bit_length(), 1)
        full = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if full != (self.lo, self.hi):
            raise HwgenError(
                f"{self.where}: activation range [{self.lo}, {self.hi}] is not a full two's "
                "complement or unsigned range (narrow range is not supported for activations)"
            )
        return _format(self.where, bits, self.frac, signed, self.rounding)


def _format(where: str, bits: int, frac: int, signed: bool, rounding: str | None) -> ActFormat:
    try:
        return ActFormat(bits, frac, signed, rounding or "half_up")
    except HwgenError as e:
        raise HwgenError(f"{where}: {e}") from None


@dataclass(frozen=True)
class _Event:
    """A quantizer on a data tensor: the builder handle it reads, and the ONNX tensor."""

    handle: str
    grid: Grid
    src: str  # the ONNX tensor quantized


@dataclass(frozen=True, eq=False)
class QuantizedModel:
    """An imported model: the network, and per tensor (``"input"`` and each layer) the ONNX
    tensor whose values are that tensor's integers times ``2**-frac`` (for a Flatten, in the
    ONNX model's C, H, W order)."""

    net: Network
    tensors: dict[str, str] = field(default_factory=dict)


def _pow2_frac(where: str, scale: np.ndarray | None) -> int:
    """``frac`` with ``scale == 2**-frac`` for every element, else one line naming the node."""
    s = np.asarray(scale if scale is not None else 1.0, np.float64).reshape(-1)
    values = np.unique(s)
    if values.size > 1:
        raise HwgenError(
            f"{where}: per-channel scales ({values.size} different values, e.g. "
            f"{values[0]:.6g} and {values[-1]:.6g}): hwgen needs one power-of-two scale "
            "per tensor"
        )
    v = float(values[0]) if values.size else 1.0
    mant, exp = math.frexp(v) if math.isfinite(v) else (0.0, 0)
    if v <= 0 or mant != 0.5:
        raise HwgenError(
            f"{where}: scale {v:.9g} is not a power of two (hwgen needs power-of-two scales: "
            "Brevitas *FixedPoint quantizers or restrict_scaling_type=POWER_OF_TWO)"
        )
    return 1 - exp


def _zero(where: str, zp: np.ndarray | None) -> None:
    if zp is not None and np.any(np.asarray(zp) != 0):
        raise HwgenError(
            f"{where}: zero point {np.asarray(zp).reshape(-1)[0]} is not 0 (only symmetric "
            "quantizers are supported)"
        )


def _int_range(where: str, dtype: np.dtype) -> tuple[int, int]:
    if dtype.kind not in "iu":
        raise HwgenError(f"{where}: integer type {dtype} is not an integer")
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _is_qonnx(node: onnx.NodeProto) -> bool:
    return node.op_type in _QONNX_OPS and node.domain in QONNX_DOMAINS


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph holds QONNX quantizers or QCDQ ``QuantizeLinear``/``DequantizeLinear``."""
    return any(
        _is_qonnx(n) or (n.op_type in _QCDQ_OPS and n.domain in ("", "ai.onnx"))
        for n in model.graph.node
    )


def _round(x: np.ndarray, rounding: str) -> np.ndarray:
    return np.rint(x) if rounding == "half_even" else np.floor(x)


class _Converter(ox._Converter):
    """The ONNX importer's walk, with quantizers: on constants they are evaluated (and their
    grids kept by tensor), on data they pass the tensor on and are recorded as events."""

    def __init__(self, graph: onnx.GraphProto, const: set[str]) -> None:
        super().__init__(graph, const)
        self.grids: dict[str, Grid] = {}  # constant tensor -> the grid of its values
        self.ranges: dict[str, tuple[int, int]] = {}  # QCDQ integer constant -> its range
        self.pending: dict[str, tuple[Grid, str]] = {}  # QuantizeLinear data output
        self.events: list[_Event] = []
        self.kinds: dict[str, str] = {}  # builder handle -> the ONNX op that made it
        self.weight_of: dict[str, str] = {}  # MAC handle -> its weight tensor
        self.readers = Counter(i for n in graph.node for i in n.input)
        self.readers.update(o.name for o in graph.output)

    # ------------------------------------------------------------ quantizer parameters

    def quant_grid(self, node: onnx.NodeProto) -> Grid:
        """The grid of a QONNX ``Quant`` or ``BipolarQuant``."""
        where = f"{node.op_type} {ox._where(node)}"
        frac = _pow2_frac(where, self.const(node, 1, "scale"))
        if node.op_type == "BipolarQuant":
            return Grid(where, frac, -1, 1, None)
        _zero(where, self.const(node, 2, "zero point"))
        bw = np.asarray(self.const(node, 3, "bit width"), np.float64).reshape(-1)
        if bw.size != 1 or bw[0] != int(bw[0]) or not 1 <= bw[0] <= 32:
            raise HwgenError(f"{where}: bit width {bw.tolist()} is not an integer in 1 .. 32")
        bits = int(bw[0])
        a = ox._attrs(node)
        signed, narrow = bool(a.get("signed", 1)), bool(a.get("narrow", 0))
        if bits == 1 and signed:  # QONNX executes a signed 1-bit Quant as bipolar
            return Grid(where, frac, -1, 1, None)
        mode = str(ox._text(a.get("rounding_mode", "ROUND"))).upper()
        if mode not in _ROUNDING:
            raise HwgenError(
                f"{where}: rounding mode {mode} is not supported (ROUND or FLOOR: hwgen's "
                "half_even and floor)"
            )
        lo = -(1 << (bits - 1)) + narrow if signed else 0
        hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1 - narrow
        return Grid(where, frac, lo, hi, _ROUNDING[mode])

    def qcdq_grid(self, node: onnx.NodeProto) -> Grid:
        """The grid of a ``QuantizeLinear`` (its zero point's integer type) or of a
        ``DequantizeLinear`` of a constant (the range its integers were clipped to)."""
        where = f"{node.op_type} {ox._where(node)}"
        frac = _pow2_frac(where, self.const(node, 1, "scale"))
        zp = self.const(node, 2, "zero point")
        _zero(where, zp)
        x = node.input[0]
        if node.op_type == "QuantizeLinear":
            lo, hi = _int_range(where, np.dtype(np.uint8) if zp is None else zp.dtype)
        elif x in self.ranges:  # after QuantizeLinear or Clip
            lo, hi = self.ranges[x]
        else:  # an integer initializer
            lo, hi = _int_range(where, np.asarray(self.consts[x]).dtype)
        return Grid(where, frac, lo, hi, "half_even")

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float]:
        a = ox._attrs(node)
        lo = self.const(node, 1, "min") if len(node.input) > 1 else a.get("min")
        hi = self.const(node, 2, "max") if len(node.input) > 2 else a.get("max")
        lo = -np.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
        hi = np.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
        return lo, hi

    # ------------------------------------------------------------ the walk

    def constant(self, node: onnx.NodeProto) -> np.ndarray:
        op, out = node.op_type, node.output[0]
        if _is_qonnx(node):
            grid = self.quant_grid(node)
            x = np.asarray(self.const(node, 0, "input"), np.float64) * 2.0**grid.frac
            if grid.binary:
                q = np.where(x >= 0, 1.0, -1.0)
            else:  # QONNX clips, then rounds: the same as rounding, then clipping
                q = _round(np.clip(x, grid.lo, grid.hi), str(grid.rounding))
            self.grids[out] = grid
            return q * 2.0**-grid.frac
        if op == "QuantizeLinear":
            grid = self.qcdq_grid(node)
            x = np.asarray(self.const(node, 0, "input"), np.float64) * 2.0**grid.frac
            self.ranges[out] = (grid.lo, grid.hi)
            return np.clip(np.rint(x), grid.lo, grid.hi).astype(np.int64)
        if op == "Clip":
            x = np.asarray(self.consts[node.input[0]])
            lo, hi = self.clip_bounds(node)
            if node.input[0] not in self.ranges and x.dtype.kind not in "iu":
                return np.clip(x, lo, hi)
            lo0, hi0 = self.ranges.get(node.input[0], _int_range(ox._where(node), x.dtype))
            self.ranges[out] = (max(lo0, math.ceil(lo)), min(hi0, math.floor(hi)))
            return np.clip(x, *self.ranges[out])
        if op == "DequantizeLinear":
            grid = self.qcdq_grid(node)
            self.grids[out] = grid
            q = np.asarray(self.const(node, 0, "input"))
            return q.astype(np.float64) * 2.0**-grid.frac
        value = super().constant(node)
        if op in _KEEPS_GRID and node.input[0] in self.grids:
            self.grids[out] = self.grids[node.input[0]]
        return value

    def convert(self, node: onnx.NodeProto) -> str:
        op, where = node.op_type, ox._where(node)
        if _is_qonnx(node):
            x = self.data(node)
            self.events.append(_Event(x, self.quant_grid(node), node.input[0]))
            return x
        if op == "QuantizeLinear":
            self.pending[node.output[0]] = (self.qcdq_grid(node), node.input[0])
            return self.data(node)
        if op in ("Clip", "DequantizeLinear") and node.input[0] not in self.pending:
            raise HwgenError(
                f"unsupported {op} at {where}: on data, only as QuantizeLinear -> [Clip ->] "
                "DequantizeLinear"
            )
        if op == "Clip":
            grid, src = self.pending[node.input[0]]
            lo, hi = self.clip_bounds(node)
            narrowed = Grid(
                grid.where,
                grid.frac,
                max(grid.lo, math.ceil(lo)),
                min(grid.hi, math.floor(hi)),
                grid.rounding,
            )
            self.pending[node.output[0]] = (narrowed, src)
            return self.data(node)
        if op == "DequantizeLinear":
            grid, src = self.pending[node.input[0]]
            what = f"DequantizeLinear {where}"
            _zero(what, self.const(node, 2, "zero point"))
            frac = _pow2_frac(what, self.const(node, 1, "scale"))
            if frac != grid.frac:
                raise HwgenError(
                    f"{what}: scale 2^{-frac} differs from its QuantizeLinear's 2^{-grid.frac}"
                )
            self.events.append(_Event(self.data(node), grid, src))
            return self.data(node)
        if op == "BatchNormalization":
            raise HwgenError(
                f"unsupported BatchNormalization at {where} in a quantized model: it cannot "
                "be folded into quantized weights exactly (merge it into the conv before "
                "quantization-aware training)"
            )
        h = super().convert(node)
        self.kinds.setdefault(h, op)
        if op in _MAC_OPS:
            self.weight_of[h] = node.input[1]
        return h


def _check_ops(graph: onnx.GraphProto, const: set[str]) -> None:
    """Every node is a quantizer or an op the ONNX importer reads (named otherwise)."""
    quant = {"QuantizeLinear", "DequantizeLinear", "Clip"}
    bad = [
        n
        for n in graph.node
        if not _is_qonnx(n)
        and (
            n.domain not in ("", "ai.onnx")
            or n.op_type not in (ox._CONST_OPS if n.output[0] in const else ox._DATA_OPS) | quant
        )
    ]
    if bad:
        worst = min(bad, key=lambda n: n.op_type in ox._PLUMBING)
        op = worst.op_type if worst.domain in ("", "ai.onnx") else f"{worst.domain}.{worst.op_type}"
        more = f" (and {len(bad) - 1} more unsupported nodes)" if len(bad) > 1 else ""
        raise HwgenError(f"unsupported op {op} at {ox._where(worst)}{more}")


def _weight_format(name: str, w: np.ndarray, grid: Grid) -> WeightFormat:
    """Pow2 if every weight is 0 or ±2**k within the quantizer's bits, else Fixed."""
    bits = signed_bits(grid.lo, grid.hi)
    pow2 = wq.detect_pow2(w)
    if pow2 is not None and (pow2.bits <= bits or grid.binary):
        return pow2
    try:
        return Fixed(max(bits, 2), grid.frac)
    except HwgenError as e:
        raise HwgenError(f"{grid.where} (weights of layer {name}): {e}") from None


def _exact_format(name: str, lo: int, hi: int, frac: int) -> ActFormat:
    """The narrowest format holding ``[lo, hi]`` at ``frac``: an unquantized layer output."""
    signed = lo < 0
    bits = signed_bits(lo, hi) if signed else max(int(hi).bit_length(), 1)
    if bits > ACT_BITS_MAX:
        raise HwgenError(
            f"layer {name}: its output has no activation quantizer and its exact value needs "
            f"{bits} bits (at most {ACT_BITS_MAX}): quantize it (e.g. a Brevitas QuantIdentity)"
        )
    return _format(f"layer {name} (no activation quantizer)", bits, frac, signed, None)


def _sole_reader(conv: _Converter, event: _Event) -> None:
    if conv.readers[event.src] != 1:
        raise HwgenError(
            f"{event.grid.where}: the unquantized tensor '{event.src}' is also read "
            "elsewhere; hwgen keeps only the quantized one"
        )


def _no_op(event: _Event, fmt: ActFormat, relu: bool, what: str) -> None:
    """Refuse a quantizer that would change a tensor hwgen does not requantize there."""
    g = event.grid
    lo = max(fmt.lo, 0) if relu else fmt.lo
    if g.binary or g.frac != fmt.frac or g.lo > lo or g.hi < fmt.hi:
        raise HwgenError(
            f"{g.where} requantizes the output of {what} (format {fmt}): hwgen requantizes "
            "only at a Conv, Gemm/MatMul or Add output (and at the input)"
        )


class _Assembler:
    """Turns the float graph plus the recorded quantizers into the integer Network."""

    def __init__(self, conv: _Converter, names: dict[str, str]) -> None:
        self.conv = conv
        self.names = names  # builder handle -> layer name
        self.events: dict[str, list[_Event]] = defaultdict(list)
        for e in conv.events:
            self.events[names[e.handle]].append(e)
        self.fmts: dict[str, ActFormat] = {}

    def group(self, name: str) -> list[str]:
        """The handles folded into layer ``name``, in the order the ops came."""
        return [h for h, n in self.names.items() if n == name]

    def requant(self, name: str) -> _Event | None:
        """The quantizer giving layer ``name`` its output format, checked; None if none.

        It may read the layer's output before a fused Relu (rounding and ReLU commute), not
        before the bias of a MatMul + Add, and must be the only reader of what it quantizes.
        """
        events = self.events.get(name, [])
        if not events:
            return None
        first = events[0]
        group = self.group(name)
        after = group[group.index(first.handle) + 1 :]
        if any(self.conv.kinds.get(h) != "Relu" for h in after):
            raise HwgenError(
                f"{first.grid.where}: quantizes layer {name} before its bias is added; "
                "hwgen requantizes the complete output"
            )
        _sole_reader(self.conv, first)
        return first

    def mac(self, fl: FConv2d | FLinear, in_fmt: ActFormat) -> Layer:
        handle = next(h for h in self.group(fl.name) if h in self.conv.weight_of)
        tensor = self.conv.weight_of[handle]
        grid = self.conv.grids.get(tensor)
        if grid is None:
            raise HwgenError(
                f"layer {fl.name}: its weight '{tensor}' is not quantized (no Quant or "
                "DequantizeLinear on it)"
            )
        wfmt = _weight_format(fl.name, fl.weight, grid)
        q = wq.encode_exact(fl.name, fl.weight, wfmt)
        facc = in_fmt.frac + wfmt.frac
        scaled = np.asarray(fl.bias, np.float64) * 2.0**facc
        off = np.flatnonzero((scaled != np.floor(scaled)) | ~(np.abs(scaled) < 2.0**61))
        if off.size:
            i = int(off[0])
            raise HwgenError(
                f"layer {fl.name}: bias[{i}] = {float(fl.bias[i])!r} is not on the "
                f"accumulator grid 2^-{facc} (input frac {in_fmt.frac} + weight frac "
                f"{wfmt.frac}); quantize the bias in Brevitas (e.g. bias_quant=Int32Bias)"
            )
        proto = mac_layer(fl, wfmt, q, in_fmt, ActFormat(8, 0))
        event = self.requant(fl.name)
        if event is not None:
            out = event.grid.act_format()
        else:
            lo, hi = acc_range(proto, in_fmt)
            lo_i = max(int(lo.min()), 0) if fl.relu else int(lo.min())
            out = _exact_format(fl.name, lo_i, int(hi.max()), facc)
        return mac_layer(fl, wfmt, q, in_fmt, out)

    def add(self, fl: FAdd, fa: ActFormat, fb: ActFormat) -> Layer:
        event = self.requant(fl.name)
        if event is not None:
            out = event.grid.act_format()
        else:
            lo, hi = add_range(fa, fb)
            out = _exact_format(fl.name, max(lo, 0) if fl.relu else lo, hi, add_frac(fa, fb))
        return Add(fl.name, out, fl.inputs, fl.relu)

    def layers(self, fnet_layers: tuple) -> list[Layer]:
        out: list[Layer] = []
        for fl in fnet_layers:
            fs = [self.fmts[i] for i in fl.inputs]
            events = self.events.get(fl.name, [])
            if isinstance(fl, (FConv2d, FLinear)):
                layer = self.mac(fl, fs[0])
                fmt, skip = layer.out_format, 1
            elif isinstance(fl, FAdd):
                layer = self.add(fl, *fs)
                fmt, skip = layer.out_format, 1
            else:
                layer, fmt, skip = _ir_layer(fl), fs[0], 0
                if isinstance(fl, (FAvgPool2d, FGlobalAvgPool)):
                    self.pool_quant(fl.name, events, fmt)
                    skip = 1
            relu = bool(getattr(fl, "relu", False)) or isinstance(fl, FReLU)
            for e in events[skip:]:
                _no_op(e, fmt, relu, f"layer {fl.name}")
            self.fmts[fl.name] = fmt
            out.append(layer)
        return out

    def pool_quant(self, name: str, events: list[_Event], fmt: ActFormat) -> None:
        """An average pool's mean must be requantized to its input's grid, rounding alike."""
        g = events[0].grid if events else None
        if g is None or g.binary or g.frac != fmt.frac or g.rounding != fmt.rounding:
            got = "no quantizer" if g is None else f"{g.where}"
            raise HwgenError(
                f"layer {name}: an average pool must be followed by a quantizer to its "
                f"input's scale 2^-{fmt.frac} rounding {fmt.rounding} (hwgen's average "
                f"pool), found {got}"
            )
        _no_op(events[0], fmt, False, f"layer {name}")


def from_qonnx(path: str | Path, name: str | None = None) -> QuantizedModel:
    """Import a QONNX or QCDQ file as an integer network (module docstring)."""
    path = Path(path)
    model = ox._load(path)
    if not is_quantized(model):
        raise HwgenError(f"model {path}: no QONNX Quant or QCDQ QuantizeLinear nodes")
    const = ox._const_tensors(model.graph)
    _check_ops(model.graph, const)
    conv = _Converter(model.graph, const)
    fnet = conv.run(name or identifier(path.stem, "net"))
    asm = _Assembler(conv, conv.b.layer_names)
    inputs = asm.events.get(INPUT, [])
    if not inputs:
        raise HwgenError(
            f"model {path}: its input is not quantized (a Quant or QuantizeLinear must read "
            "it first, e.g. a Brevitas QuantIdentity)"
        )
    _sole_reader(conv, inputs[0])
    asm.fmts[INPUT] = inputs[0].grid.act_format()
    for e in inputs[1:]:
        _no_op(e, asm.fmts[INPUT], False, "the input")
    layers = asm.layers(fnet.layers)
    net = Network(fnet.input_shape, asm.fmts[INPUT], tuple(layers), fnet.name)
    tensors = {}
    for tensor, handle in conv.handles.items():  # in walk order: the last tensor wins
        tensors[asm.names[handle]] = tensor
    return QuantizedModel(net, tensors)
