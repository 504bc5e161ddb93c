"""The intermediate representation: number formats, layer specs and the sequential network.

Plain frozen dataclasses, validated on construction; every error names the layer and the
bad value. Integers only: weights are integer arrays in their format, biases integers at
accumulator scale (DESIGN §2). Shapes are ``(C, H, W)`` for feature maps and ``(F,)`` for
vectors; a batch dimension is never part of the IR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from itertools import pairwise

import numpy as np

from hwgen.errors import HwgenError

ACT_FRAC_RANGE = (-32, 32)
WEIGHT_FRAC_RANGE = (-64, 64)
CODEBOOK_MAX_ENTRIES = 256  # indices fit uint8
ACT_BITS_MAX = 24
ACC_BITS_MAX = 62  # keeps every golden-model intermediate inside int64
# Rounding of a right shift into an activation format (docs/hwq-format.md §3): hwgen's own
# quantizers use half_up; Brevitas/QONNX ROUND is half_even and FLOOR is floor.
ROUNDINGS = ("half_up", "half_even", "floor")
_ROUNDING_SUFFIX = {"half_up": "", "half_even": ".even", "floor": ".floor"}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Shape = tuple[int, ...]


def _check_int(what: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise HwgenError(f"{what} must be an integer in [{lo}, {hi}], not {value!r}")


@dataclass(frozen=True)
class ActFormat:
    """Activation format A(bits, frac, signed): integer ``a``, real value ``a * 2**-frac``.

    ``rounding`` (one of ``ROUNDINGS``) is how a value is rounded when it is requantised
    into this format: a MAC layer's or an add's output, an average pool, a float input.
    """

    bits: int
    frac: int
    signed: bool = True
    rounding: str = "half_up"

    def __post_init__(self) -> None:
        _check_int("activation bits", self.bits, 2 if self.signed else 1, ACT_BITS_MAX)
        _check_int("activation frac", self.frac, *ACT_FRAC_RANGE)
        if self.rounding not in ROUNDINGS:
            raise HwgenError(
                f"activation rounding must be one of {', '.join(ROUNDINGS)}, not {self.rounding!r}"
            )

    @property
    def lo(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def __str__(self) -> str:
        sign = "s" if self.signed else "u"
        return f"{sign}{self.bits}.f{self.frac}{_ROUNDING_SUFFIX[self.rounding]}"


@dataclass(frozen=True)
class Fixed:
    """Fixed-point weights Fixed(bits, frac): integer ``w`` in two's complement range."""

    bits: int
    frac: int

    def __post_init__(self) -> None:
        _check_int("Fixed weight bits", self.bits, 2, 16)
        _check_int("Fixed weight frac", self.frac, *WEIGHT_FRAC_RANGE)

    @property
    def lo(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def hi(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def on_grid(self, w: np.ndarray) -> np.ndarray:
        """Boolean mask: which integers are representable in this format."""
        return (w >= self.lo) & (w <= self.hi)

    def __str__(self) -> str:
        return f"fixed{self.bits}.f{self.frac}"


@dataclass(frozen=True)
class Pow2:
    """Power-of-two weights Pow2(bits, emax) (INQ); bits 2 is ternary, bits 1 is binary.

    Real levels ``{0} ∪ {±2**e : emin <= e <= emax}`` (no zero when bits == 1). As an
    integer a weight is ``±2**(e - emin)`` or 0, with weight frac ``-emin``.
    """

    bits: int
    emax: int

    def __post_init__(self) -> None:
        _check_int("Pow2 weight bits", self.bits, 1, 7)
        _check_int("Pow2 weight emax", self.emax, *WEIGHT_FRAC_RANGE)
        if not WEIGHT_FRAC_RANGE[0] <= self.frac <= WEIGHT_FRAC_RANGE[1]:
            raise HwgenError(
                f"Pow2({self.bits}, emax={self.emax}) has weight frac {self.frac}, "
                f"outside {list(WEIGHT_FRAC_RANGE)}"
            )

    @property
    def emin(self) -> int:
        return self.emax + 1 - (1 << (self.bits - 2)) if self.bits >= 3 else self.emax

    @property
    def frac(self) -> int:
        return -self.emin

    @property
    def max_shift(self) -> int:
        """Largest shift ``e - emin``: the integer magnitudes are ``2**0 .. 2**max_shift``."""
        return self.emax - self.emin

    @property
    def has_zero(self) -> bool:
        return self.bits >= 2

    @property
    def lo(self) -> int:
        return -(1 << self.max_shift)

    @property
    def hi(self) -> int:
        return 1 << self.max_shift

    def on_grid(self, w: np.ndarray) -> np.ndarray:
        """Boolean mask: which integers are ±2**k (0 <= k <= max_shift), or 0 if allowed."""
        mag = np.abs(w)
        ok = (mag >= 1) & (mag <= self.hi) & ((mag & (mag - 1)) == 0)
        return ok | (w == 0) if self.has_zero else ok

    def __str__(self) -> str:
        kind = {1: "binary", 2: "ternary"}.get(self.bits, f"pow2_{self.bits}")
        return f"{kind}.emax{self.emax}"


@dataclass(frozen=True)
class Codebook:
    """Codebook weights Codebook(entries, frac) (DQC, TTQ): 2 to 256 distinct integers.

    A weight is one of ``entries`` (sorted, ``|e| < 2**31``), real value ``e * 2**-frac``.
    Layers hold the integer values; the ``.hwq`` file and the ROM hold each weight's index
    into ``entries``, ``bits`` wide.
    """

    entries: tuple[int, ...]
    frac: int

    def __post_init__(self) -> None:
        e = self.entries
        ok = isinstance(e, (tuple, list)) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in e
        )
        if not ok or not 2 <= len(e) <= CODEBOOK_MAX_ENTRIES:
            raise HwgenError(
                f"codebook entries must be 2 to {CODEBOOK_MAX_ENTRIES} integers, not {e!r}"
            )
        e = tuple(int(v) for v in e)
        if any(b <= a for a, b in pairwise(e)):
            raise HwgenError(f"codebook entries must be distinct and increasing, not {list(e)}")
        if max(-e[0], e[-1]) >= 1 << 31:
            raise HwgenError(f"codebook entry {max(e, key=abs)} is outside (-2^31, 2^31)")
        object.__setattr__(self, "entries", e)
        _check_int("codebook weight frac", self.frac, *WEIGHT_FRAC_RANGE)

    @property
    def bits(self) -> int:
        """Width of an index: ``ceil(log2(len(entries)))``."""
        return (len(self.entries) - 1).bit_length()

    @property
    def lo(self) -> int:
        return self.entries[0]

    @property
    def hi(self) -> int:
        return self.entries[-1]

    def on_grid(self, w: np.ndarray) -> np.ndarray:
        """Boolean mask: which integers are entries."""
        return np.isin(w, self.entries)

    def indices(self, w: np.ndarray) -> np.ndarray:
        """Each on-grid integer weight's index into ``entries`` (int64, same shape)."""
        return np.searchsorted(np.asarray(self.entries, np.int64), w).astype(np.int64)

    def __str__(self) -> str:
        e = self.entries
        shown = e if len(e) <= 8 else (*e[:3], "...", *e[-3:])
        return f"codebook{len(e)}[{','.join(map(str, shown))}].f{self.frac}"


PLANES_MAX = 8  # sign bits per weight code
PLANE_SCALE_BITS = 16  # each m_ic is a signed 16-bit integer, like a per-channel scale


@dataclass(frozen=True)
class Planes:
    """Binary-plane weights Planes(scales, frac) (alternating multi-bit codes): per output
    channel ``c``, ``M`` integer scales ``scales[c] = (m_0c, ..., m_(M-1)c)``.

    A weight of channel ``c`` is ``Σ_i m_ic·b_i`` with signs ``b_i ∈ {-1, +1}``, real value
    times ``2**-frac``. Layers hold those integers (so the golden model and every bound read
    them as plain weights); the ROM holds each weight's ``M`` sign bits, and any signs with
    the same sum compute the same value. The scales are in the format, not the layer, because
    they define which integers a channel's weights can be (``on_grid``), as a codebook's
    entries do.
    """

    scales: tuple[tuple[int, ...], ...]
    frac: int

    def __post_init__(self) -> None:
        rows = self.scales
        ok = isinstance(rows, (tuple, list)) and len(rows) >= 1
        ok = ok and all(
            isinstance(r, (tuple, list))
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in r)
            for r in rows
        )
        if not ok or len({len(r) for r in rows}) != 1 or not 1 <= len(rows[0]) <= PLANES_MAX:
            raise HwgenError(
                f"plane scales must be one row of 1 to {PLANES_MAX} integers per output "
                f"channel, all rows as long, not {rows!r}"
            )
        rows = tuple(tuple(int(v) for v in r) for r in rows)
        lim = 1 << (PLANE_SCALE_BITS - 1)
        for c, r in enumerate(rows):
            for v in r:
                if not -lim <= v < lim:
                    raise HwgenError(
                        f"plane scale {v} of channel {c} is outside [{-lim}, {lim - 1}]"
                    )
        object.__setattr__(self, "scales", rows)
        _check_int("planes weight frac", self.frac, *WEIGHT_FRAC_RANGE)

    @property
    def planes(self) -> int:
        """``M``, the planes per weight."""
        return len(self.scales[0])

    @property
    def bits(self) -> int:
        """Width of a weight code: one sign bit per plane."""
        return self.planes

    @property
    def channels(self) -> int:
        return len(self.scales)

    def values(self) -> np.ndarray:
        """(channels, 2**M) int64: the weight of each code, bit ``i`` the sign of plane ``i``
        (1 = -1)."""
        codes = np.arange(1 << self.planes)
        signs = 1 - 2 * ((codes[:, None] >> np.arange(self.planes)) & 1)  # (2**M, M)
        return np.asarray(self.scales, np.int64) @ signs.T

    @property
    def lo(self) -> int:
        return int(self.values().min())

    @property
    def hi(self) -> int:
        return int(self.values().max())

    def on_grid(self, w: np.ndarray) -> np.ndarray:
        """Boolean mask: which integers of ``w`` (output channel first) are a sum of their
        channel's signed scales."""
        w = np.asarray(w)
        if w.shape[:1] != (self.channels,):
            raise HwgenError(f"{self} has {self.channels} channels, weights {w.shape[:1]}")
        values = self.values()
        return np.stack([np.isin(w[c], values[c]) for c in range(self.channels)])

    def __str__(self) -> str:
        m = np.asarray(self.scales)
        return f"planes{self.planes}[{self.channels}x, m {m.min()}..{m.max()}].f{self.frac}"


WeightFormat = Fixed | Pow2 | Codebook | Planes


class _ArrayEq:
    """Dataclass equality that compares numpy fields with np.array_equal."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):  # type: ignore[arg-type]
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


def _pair(what: str, value: object, lo: int) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise HwgenError(f"{what} must be an int or a pair of ints, not {value!r}")
    for v in value:
        _check_int(what, v, lo, 1 << 16)
    return (int(value[0]), int(value[1]))


def _int_array(what: str, a: object, shape: Shape) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise HwgenError(f"{what} must be an integer array, not dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise HwgenError(f"{what} holds {a.max()}, outside the int64 range")  # would wrap
    if a.shape != shape:
        raise HwgenError(f"{what} has shape {a.shape}, expected {shape}")
    a = a.astype(np.int64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class _MacLayer(_ArrayEq):
    """Shared checks of Conv2d and Linear: formats, weight grid, bias, scale.

    ``scale`` (optional, with ``scale_format``, a Fixed) holds one integer ``m_c`` per
    output channel: the exact accumulator is multiplied by it before requantisation
    (``requant_frac``, ``requant_range``; docs/hwq-format.md §3).
    """

    def _check_mac(self, wshape: Shape, cout: int) -> None:
        fmt = self.weight_format
        if not isinstance(fmt, (Fixed, Pow2, Codebook, Planes)):
            raise HwgenError(
                f"layer {self.name}: weight_format must be Fixed, Pow2, Codebook or Planes"
            )
        if isinstance(fmt, Planes) and fmt.channels != cout:
            raise HwgenError(
                f"layer {self.name}: {fmt.channels} rows of plane scales for {cout} channels"
            )
        if not isinstance(self.out_format, ActFormat):
            raise HwgenError(f"layer {self.name}: out_format must be an ActFormat")
        object.__setattr__(self, "relu", bool(self.relu))
        w = _int_array(f"layer {self.name}: weight", self.weight, wshape)
        bad = np.flatnonzero(~fmt.on_grid(w))
        if bad.size:
            idx = tuple(int(i) for i in np.unravel_index(bad[0], wshape))
            where = f"layer {self.name}: weight{list(idx)} = {w[idx]}"
            if isinstance(fmt, Planes):  # no sign code gives it: name the channel's scales
                c = idx[0]
                raise HwgenError(
                    f"{where} is no signed sum of channel {c}'s plane scales {list(fmt.scales[c])}"
                )
            raise HwgenError(f"{where} is not in {fmt}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", _int_array(f"layer {self.name}: bias", self.bias, (cout,)))
        if (self.scale is None) != (self.scale_format is None):
            given = "scale" if self.scale_format is None else "scale_format"
            raise HwgenError(
                f"layer {self.name}: {given} given without "
                f"{'scale_format' if given == 'scale' else 'scale'} (both or neither)"
            )
        if self.scale is None:
            return
        if not isinstance(self.scale_format, Fixed):
            raise HwgenError(
                f"layer {self.name}: scale_format must be Fixed, not {self.scale_format!r}"
            )
        m = _int_array(f"layer {self.name}: scale", self.scale, (cout,))
        bad = np.flatnonzero(~self.scale_format.on_grid(m))
        if bad.size:
            i = int(bad[0])
            raise HwgenError(
                f"layer {self.name}: scale[{i}] = {m[i]} is not in {self.scale_format}"
            )
        object.__setattr__(self, "scale", m)


@dataclass(frozen=True, eq=False)
class Conv2d(_MacLayer):
    """2-D convolution with zero padding; ``weight`` is (Cout, Cin, KH, KW)."""

    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    weight_format: WeightFormat
    out_format: ActFormat
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    relu: bool = False
    inputs: tuple[str, ...] = ()
    scale: np.ndarray | None = field(default=None, repr=False)
    scale_format: Fixed | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_int(f"layer {self.name}: in_channels", self.in_channels, 1, 1 << 16)
        _check_int(f"layer {self.name}: out_channels", self.out_channels, 1, 1 << 16)
        object.__setattr__(self, "kernel", _pair(f"layer {self.name}: kernel", self.kernel, 1))
        object.__setattr__(self, "stride", _pair(f"layer {self.name}: stride", self.stride, 1))
        object.__setattr__(self, "padding", _pair(f"layer {self.name}: padding", self.padding, 0))
        shape = (self.out_channels, self.in_channels, *self.kernel)
        self._check_mac(shape, self.out_channels)

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel[0] * self.kernel[1]


@dataclass(frozen=True, eq=False)
class Linear(_MacLayer):
    """Fully connected layer; ``weight`` is (out, in), the input in H,W,C order after Flatten."""

    name: str
    in_features: int
    out_features: int
    weight_format: WeightFormat
    out_format: ActFormat
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    relu: bool = False
    inputs: tuple[str, ...] = ()
    scale: np.ndarray | None = field(default=None, repr=False)
    scale_format: Fixed | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_int(f"layer {self.name}: in_features", self.in_features, 1, 1 << 24)
        _check_int(f"layer {self.name}: out_features", self.out_features, 1, 1 << 16)
        self._check_mac((self.out_features, self.in_features), self.out_features)

    @property
    def fan_in(self) -> int:
        return self.in_features


@dataclass(frozen=True)
class ReLU:
    """Standalone ReLU: ``max(x, 0)`` in the input's format."""

    name: str
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True)
class _Pool:
    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int] | None = None  # None: equal to the kernel, as in PyTorch
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "kernel", _pair(f"layer {self.name}: kernel", self.kernel, 1))
        stride = self.kernel if self.stride is None else self.stride
        object.__setattr__(self, "stride", _pair(f"layer {self.name}: stride", stride, 1))


@dataclass(frozen=True)
class MaxPool2d(_Pool):
    """Max pooling, no padding; exact, same format."""


@dataclass(frozen=True)
class AvgPool2d(_Pool):
    """Average pooling over a power-of-two window area: ``rhu(sum / area)``, same format."""

    def __post_init__(self) -> None:
        super().__post_init__()
        area = self.kernel[0] * self.kernel[1]
        if area & (area - 1):
            raise HwgenError(
                f"layer {self.name}: average pool window area {area} "
                f"({self.kernel[0]}x{self.kernel[1]}) is not a power of two"
            )


@dataclass(frozen=True)
class Flatten:
    """(C, H, W) -> (H*W*C,) in H, W, C order (the hardware's stream order)."""

    name: str
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True)
class GlobalAvgPool:
    """(C, H, W) -> (C, 1, 1): ``rhu(sum / (H*W))`` per channel, H*W a power of two."""

    name: str
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True)
class SubsamplePad:
    """The option-A ResNet shortcut: ``x[:, ::sh, ::sw]`` then zero channels around it.

    Output ``(before + C + after, ceil(H / sh), ceil(W / sw))``: channels ``[0, before)`` and
    the last ``after`` are 0, the others the subsampled input; exact, same format.
    """

    name: str
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)  # zero channels before, after
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "stride", _pair(f"layer {self.name}: stride", self.stride, 1))
        object.__setattr__(self, "pad", _pair(f"layer {self.name}: pad", self.pad, 0))


@dataclass(frozen=True)
class Add:
    """Sum of two tensors of one shape, requantised to ``out_format`` (docs/hwq-format.md).

    Exact sum at ``F = max(frac_a, frac_b)``, then ``sat(rhu(s * 2**-(F - frac_o)))``, with
    the lower bound 0 when ``relu``.
    """

    name: str
    out_format: ActFormat
    inputs: tuple[str, ...] = ()
    relu: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.out_format, ActFormat):
            raise HwgenError(f"layer {self.name}: out_format must be an ActFormat")
        object.__setattr__(self, "relu", bool(self.relu))


Layer = (
    Conv2d | Linear | ReLU | MaxPool2d | AvgPool2d | Flatten | GlobalAvgPool | SubsamplePad | Add
)
LAYER_TYPES = (
    Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, Flatten, GlobalAvgPool, SubsamplePad, Add,
)  # fmt: skip


def _check_name(name: object) -> None:
    if name == INPUT:  # the network input's key in every per-layer output file
        raise HwgenError("layer name 'input' is reserved for the network input")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise HwgenError(f"layer name must be an identifier ([A-Za-z_][A-Za-z0-9_]*), not {name!r}")


def acc_frac(layer: Conv2d | Linear, in_format: ActFormat) -> int:
    """Fraction length of the accumulator: ``frac_a + frac_w``."""
    return in_format.frac + layer.weight_format.frac


def acc_range(layer: Conv2d | Linear, in_format: ActFormat) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-output-channel (min, max) of ``bias + Σ a_i w_i`` over all inputs in range.

    Each term is extreme at an end of the input range, independently, so these bounds are
    reached: they are the tightest overflow-free accumulator range.
    """
    w = layer.weight.reshape(layer.weight.shape[0], -1)
    lo, hi = in_format.lo, in_format.hi
    # In float64: np.abs of an int64 -2**63 bias overflows.
    bias_max = float(np.abs(layer.bias.astype(np.float64)).max())
    worst = float(np.abs(w).sum(1).max()) * max(-lo, hi) + bias_max
    if worst >= 2.0**62:  # would overflow int64: exact Python integers instead
        w = w.astype(object)
    a, b = w * lo, w * hi
    return layer.bias + np.minimum(a, b).sum(1), layer.bias + np.maximum(a, b).sum(1)


def requant_frac(layer: Conv2d | Linear, in_format: ActFormat) -> int:
    """Fraction length of what the requantiser shifts: the accumulator's ``frac_a + frac_w``,
    plus ``frac_m`` when the layer scales it by ``m_c``."""
    fm = 0 if layer.scale_format is None else layer.scale_format.frac
    return acc_frac(layer, in_format) + fm


def requant_range(layer: Conv2d | Linear, in_format: ActFormat) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-output-channel (min, max) of the requantiser's input ``acc_c * m_c`` (the
    accumulator itself without a scale): the products of ``acc_range``'s ends with ``m_c``."""
    lo, hi = acc_range(layer, in_format)
    if layer.scale is None:
        return lo, hi
    # Python integers: a 62-bit end times a 16-bit scale overflows int64.
    lo, hi, m = lo.astype(object), hi.astype(object), layer.scale.astype(object)
    return np.minimum(lo * m, hi * m), np.maximum(lo * m, hi * m)


def signed_bits(lo: int, hi: int) -> int:
    """Bits of the narrowest two's complement integer holding every value in [lo, hi]."""
    return max((-int(lo) - 1).bit_length() if lo < 0 else 0, int(hi).bit_length()) + 1


def acc_bits(layer: Conv2d | Linear, in_format: ActFormat) -> int:
    """Accumulator width that can never overflow for any input in range (DESIGN §2)."""
    lo, hi = acc_range(layer, in_format)
    return signed_bits(int(lo.min()), int(hi.max()))


def requant_bits(layer: Conv2d | Linear, in_format: ActFormat) -> int:
    """Width of the requantiser's input ``acc_c * m_c`` (``acc_bits`` without a scale)."""
    lo, hi = requant_range(layer, in_format)
    return signed_bits(int(lo.min()), int(hi.max()))


def add_frac(fa: ActFormat, fb: ActFormat) -> int:
    """Fraction length of an add's exact sum: the finer of its two inputs."""
    return max(fa.frac, fb.frac)


def add_range(fa: ActFormat, fb: ActFormat) -> tuple[int, int]:
    """Exact (min, max) of an add's aligned sum ``a * 2**(F-fa) + b * 2**(F-fb)``."""
    f = add_frac(fa, fb)
    ka, kb = f - fa.frac, f - fb.frac
    return (fa.lo << ka) + (fb.lo << kb), (fa.hi << ka) + (fb.hi << kb)


def check_add_bits(name: str, fa: ActFormat, fb: ActFormat) -> None:
    """Refuse an add whose exact aligned sum could need more than ``ACC_BITS_MAX`` bits."""
    bits = signed_bits(*add_range(fa, fb))
    if bits > ACC_BITS_MAX:
        raise HwgenError(
            f"layer {name}: aligning {fa} with {fb} needs {bits} bits (max {ACC_BITS_MAX}); "
            "use closer fraction lengths"
        )


def _out_shape(layer: Layer, shapes: list[Shape]) -> Shape:
    n, shape = layer.name, shapes[0]
    if isinstance(layer, Add):
        if shapes[1] != shape:
            raise HwgenError(f"layer {n}: adds inputs of different shapes {shape} and {shapes[1]}")
        return shape
    spatial = (Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool, SubsamplePad)
    if isinstance(layer, spatial) and len(shape) != 3:
        raise HwgenError(f"layer {n}: needs a (C, H, W) feature map, got shape {shape}")
    if isinstance(layer, GlobalAvgPool):
        c, h, w = shape
        if (h * w) & (h * w - 1):
            raise HwgenError(
                f"layer {n}: global average pool over {h}x{w} = {h * w} values, not a power of two"
            )
        return (c, 1, 1)
    if isinstance(layer, SubsamplePad):
        c, h, w = shape
        (sh, sw), (before, after) = layer.stride, layer.pad
        return (before + c + after, -(-h // sh), -(-w // sw))
    if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d)):
        c, h, w = shape
        (kh, kw), (sh, sw) = layer.kernel, layer.stride
        ph, pw = layer.padding if isinstance(layer, Conv2d) else (0, 0)
        if isinstance(layer, Conv2d) and c != layer.in_channels:
            raise HwgenError(f"layer {n}: in_channels is {layer.in_channels}, input has {c}")
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise HwgenError(f"layer {n}: kernel {kh}x{kw} larger than padded input {h}x{w}")
        oc = layer.out_channels if isinstance(layer, Conv2d) else c
        return (oc, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    if isinstance(layer, Linear):
        if len(shape) != 1:
            raise HwgenError(f"layer {n}: needs a flat input (add Flatten), got shape {shape}")
        if shape[0] != layer.in_features:
            raise HwgenError(f"layer {n}: in_features is {layer.in_features}, input has {shape[0]}")
        return (layer.out_features,)
    if isinstance(layer, Flatten):
        return (int(np.prod(shape)),)
    return shape  # ReLU


def _out_format(layer: Layer, formats: list[ActFormat]) -> ActFormat:
    if isinstance(layer, (Conv2d, Linear)):
        bits = acc_bits(layer, formats[0])
        if bits > ACC_BITS_MAX:
            raise HwgenError(
                f"layer {layer.name}: accumulator needs {bits} bits (max {ACC_BITS_MAX}); "
                "use narrower weights or activations"
            )
        bits = requant_bits(layer, formats[0])
        if bits > ACC_BITS_MAX:
            raise HwgenError(
                f"layer {layer.name}: accumulator times scale needs {bits} bits "
                f"(max {ACC_BITS_MAX}); use a narrower scale, weights or activations"
            )
        return layer.out_format
    if isinstance(layer, Add):
        check_add_bits(layer.name, *formats)
        return layer.out_format
    return formats[0]


INPUT = "input"  # the name of the network input among layer inputs


@dataclass(frozen=True, eq=False)
class Network(_ArrayEq):
    """A network of integer layers: a DAG in topological order, with its input (C, H, W).

    Each layer names its inputs (``"input"`` or an earlier layer); a layer given without
    inputs reads the layer before it (or the network input), so a plain list of layers is a
    chain. ``add`` takes two inputs, every other op one. Every layer but the last feeds some
    later layer: the last layer is the network's output. ``shapes`` and ``formats`` map
    ``"input"`` and every layer name to that tensor's shape and format; both are derived
    and checked on construction.
    """

    input_shape: Shape
    input_format: ActFormat
    layers: tuple[Layer, ...]
    name: str = "net"
    shapes: dict[str, Shape] = field(init=False, repr=False, compare=False)
    formats: dict[str, ActFormat] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if not self.layers:
            raise HwgenError("the network has no layers")
        if len(self.input_shape) not in (1, 3) or min(self.input_shape) < 1:
            raise HwgenError(
                f"network input shape must be (C, H, W) or (F,), not {self.input_shape}"
            )
        if not isinstance(self.input_format, ActFormat):
            raise HwgenError("network input_format must be an ActFormat")
        shapes, formats = {INPUT: self.input_shape}, {INPUT: self.input_format}
        used: set[str] = set()
        layers = []
        prev = INPUT
        for layer in self.layers:
            if not isinstance(layer, LAYER_TYPES):
                raise HwgenError(f"unsupported layer type {type(layer).__name__}")
            if layer.name in shapes:
                raise HwgenError(f"layer name {layer.name!r} is used twice")
            if not layer.inputs:
                layer = replace(layer, inputs=(prev,))
            elif isinstance(layer.inputs, list):
                layer = replace(layer, inputs=tuple(layer.inputs))
            inputs = layer.inputs
            arity = 2 if isinstance(layer, Add) else 1
            if not isinstance(inputs, tuple) or len(inputs) != arity:
                raise HwgenError(
                    f"layer {layer.name}: takes {arity} input{'s' * (arity > 1)}, "
                    f"not {list(inputs) if isinstance(inputs, tuple) else inputs!r}"
                )
            for src in inputs:
                if src not in shapes:
                    raise HwgenError(
                        f"layer {layer.name}: input {src!r} is not the network input or an "
                        "earlier layer"
                    )
            used.update(inputs)
            shapes[layer.name] = _out_shape(layer, [shapes[i] for i in inputs])
            formats[layer.name] = _out_format(layer, [formats[i] for i in inputs])
            layers.append(layer)
            prev = layer.name
        for layer in layers[:-1]:
            if layer.name not in used:
                raise HwgenError(
                    f"layer {layer.name}: its output is never used (only the last layer, "
                    f"{prev}, is the network output)"
                )
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "formats", formats)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise HwgenError(f"no layer named {name!r} (layers: {', '.join(self.names)})")

    def index(self, name: str) -> int:
        return self.layers.index(self.layer(name))

    def in_shape(self, layer: Layer) -> Shape:
        """Shape of the (first) input of ``layer``."""
        return self.shapes[layer.inputs[0]]

    def in_format(self, layer: Layer) -> ActFormat:
        """Format of the (first) input of ``layer``."""
        return self.formats[layer.inputs[0]]

    def consumers(self, name: str) -> list[Layer]:
        """The layers that read tensor ``name`` (``"input"`` or a layer), in order."""
        return [layer for layer in self.layers if name in layer.inputs]

    @property
    def is_chain(self) -> bool:
        """Whether every layer reads only the one before it (a version 1 network)."""
        prev = INPUT
        for layer in self.layers:
            if layer.inputs != (prev,):
                return False
            prev = layer.name
        return True

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def output(self) -> str:
        return self.layers[-1].name

    @property
    def output_shape(self) -> Shape:
        return self.shapes[self.output]

    @property
    def output_format(self) -> ActFormat:
        return self.formats[self.output]
