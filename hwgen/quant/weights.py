"""Weight quantizers (pure NumPy): dynamic fixed point, INQ powers of two, exact-grid detection.

Every quantizer returns the integer weights of an IR format (DESIGN §2): ``Fixed(bits, frac)``
integers in two's complement range, ``Pow2(bits, emax)`` integers ``±2**(e - emin)`` or 0.
Errors are sums of squared differences between the float weights and their quantised values.
"""

from __future__ import annotations

import numpy as np

from hwgen.errors import HwgenError
from hwgen.ir import WEIGHT_FRAC_RANGE, Fixed, Pow2, WeightFormat, signed_bits
from hwgen.quant.precision import SCHEMES

FIXED_MAX_BITS = 16
Curve = list[tuple[int, float]]
POW2_MAX_BITS = 7


def rhu(x: np.ndarray) -> np.ndarray:
    """Round half up in float64: ``floor(x + 0.5)``."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def quantize_fixed(w: np.ndarray, fmt: Fixed) -> np.ndarray:
    """Integer weights of ``fmt``: ``clip(rhu(w * 2**frac))`` (round half up, saturate)."""
    return np.clip(rhu(np.asarray(w, np.float64) * 2.0**fmt.frac), fmt.lo, fmt.hi).astype(np.int64)


def dequantize(q: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """Real values of integer weights: ``q * 2**-frac``."""
    return np.asarray(q, np.float64) * 2.0**-fmt.frac


def weight_error(w: np.ndarray, q: np.ndarray, fmt: WeightFormat) -> float:
    """Squared quantisation error ``Σ (w - q * 2**-frac)**2``."""
    return float(np.sum((np.asarray(w, np.float64) - dequantize(q, fmt)) ** 2))


def _clamp_frac(f: int) -> int:
    return int(min(max(f, WEIGHT_FRAC_RANGE[0]), WEIGHT_FRAC_RANGE[1]))


def fixed_fit_frac(m: float, hi: int) -> int:
    """Largest frac whose rounding keeps magnitude ``m`` at most ``hi`` (no saturation)."""
    if m <= 0:
        return 0
    return _clamp_frac(int(np.floor(np.log2((hi + 0.5) / m))))


def fixed_curve(w: np.ndarray, bits: int, span: tuple[int, int] = (-2, 4)) -> Curve:
    """Squared error of ``Fixed(bits, f)`` for f around the largest non-saturating frac."""
    w = np.asarray(w, np.float64)
    hi = (1 << (bits - 1)) - 1
    f0 = fixed_fit_frac(float(np.abs(w).max(initial=0.0)), hi)
    fracs = sorted({_clamp_frac(f0 + d) for d in range(span[0], span[1] + 1)})
    return [(f, weight_error(w, quantize_fixed(w, Fixed(bits, f)), Fixed(bits, f))) for f in fracs]


def best_weight_frac(w: np.ndarray, bits: int) -> int:
    """The fraction length minimising the squared weight error at ``bits`` (Qiu et al.).

    Ties go to the smallest frac (the widest range); an all-zero tensor gets the fit frac 0.
    """
    return min(fixed_curve(w, bits), key=lambda fe: (fe[1], fe[0]))[0]


# ---------------------------------------------------------------- powers of two (INQ)


def inq_emax(w: np.ndarray) -> int:
    """INQ's ``n1 = floor(log2(4/3 * max|W|))``, exact: the e with ``3 * 2**e <= 4 * max|W|``."""
    m = float(np.abs(np.asarray(w, np.float64)).max(initial=0.0))
    if m == 0.0:
        return 0
    e = int(np.floor(np.log2(4.0 * m / 3.0)))
    while 3.0 * 2.0 ** (e + 1) <= 4.0 * m:  # both sides are exact in float64
        e += 1
    while 3.0 * 2.0**e > 4.0 * m:
        e -= 1
    return int(min(max(e, WEIGHT_FRAC_RANGE[0]), WEIGHT_FRAC_RANGE[1]))


def quantize_pow2(w: np.ndarray, fmt: Pow2) -> np.ndarray:
    """Integer weights of ``fmt``: each weight to its nearest level by INQ's rule.

    For adjacent levels ``α < β``: ``β * sgn(W)`` if ``(α+β)/2 <= |W| < 3β/2`` (ties go up),
    with ``α = 0`` below ``2**emin`` and 0 under ``2**(emin-1)``. Magnitudes from
    ``1.5 * 2**emax`` up (never with INQ's emax) saturate to ``2**emax``. Binary (bits 1) has
    no zero: every weight is ``±2**emax`` by its sign, and a zero weight is ``+2**emax``.
    """
    w = np.asarray(w, np.float64)
    if not fmt.has_zero:
        return np.where(w < 0, -1, 1).astype(np.int64)
    mag = np.abs(w)
    mant, k = np.frexp(mag)  # mag = mant * 2**k, mant in [0.5, 1): exact
    # |W| in [0.75 * 2**e, 1.5 * 2**e) goes to 2**e: e = k if mant >= 0.75 else k - 1.
    e = np.where(mant >= 0.75, k, k - 1)
    e = np.clip(e, fmt.emin, fmt.emax)
    nonzero = mag >= 2.0 ** (fmt.emin - 1)
    q = np.where(nonzero, np.left_shift(1, (e - fmt.emin).astype(np.int64)), 0)
    return (np.sign(w).astype(np.int64) * q).astype(np.int64)


def pow2_curve(w: np.ndarray, bits: int, span: tuple[int, int] = (-5, 2)) -> Curve:
    """Squared error of ``Pow2(bits, emax)`` for emax around INQ's n1."""
    n1 = inq_emax(w)
    out = []
    for d in range(span[0], span[1] + 1):
        try:
            fmt = Pow2(bits, n1 + d)
        except HwgenError:  # emax or frac outside the IR's range
            continue
        out.append((fmt.emax, weight_error(w, quantize_pow2(w, fmt), fmt)))
    return out


# ---------------------------------------------------------------- exact grids (auto)


def _lowest_bit_exponent(w: np.ndarray) -> np.ndarray:
    """For each nonzero finite float, the exponent of its lowest set bit (w = odd * 2**that)."""
    mant, k = np.frexp(np.abs(w))
    m = (mant * 2.0**53).astype(np.int64)  # the 53-bit integer mantissa, exact
    tz = np.zeros_like(m)
    nz = m != 0
    low = m & -m  # lowest set bit
    tz[nz] = np.log2(low[nz].astype(np.float64)).astype(np.int64)  # exact: a power of two
    return k - 53 + tz


def _where(layer: str, w: np.ndarray, flat: int) -> str:
    idx = [int(i) for i in np.unravel_index(flat, w.shape)]
    return f"layer {layer}: weight{idx} = {float(w.flat[flat])!r}"


def encode_exact(layer: str, w: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """Integer weights equal to ``w`` in ``fmt``; an error names the first weight off its grid."""
    w = np.asarray(w, np.float64)
    scaled = w * 2.0**fmt.frac
    ok = np.isfinite(scaled) & (scaled == np.floor(scaled))
    q = np.where(ok, scaled, 0).astype(np.int64)
    ok &= fmt.on_grid(q)
    if isinstance(fmt, Pow2) and not fmt.has_zero:
        ok &= w != 0
    bad = np.flatnonzero(~ok)
    if bad.size:
        raise HwgenError(f"{_where(layer, w, int(bad[0]))} is not exactly on the grid of {fmt}")
    return q


def detect_pow2(w: np.ndarray) -> Pow2 | None:
    """The smallest ``Pow2(bits, emax)`` holding every weight exactly, or None."""
    w = np.asarray(w, np.float64)
    nz = w[w != 0]
    if nz.size == 0:
        return Pow2(2, 0)
    mant, k = np.frexp(np.abs(nz))
    if not np.all(mant == 0.5):
        return None
    emax, emin = int(k.max()) - 1, int(k.min()) - 1
    for bits in range(1, POW2_MAX_BITS + 1):
        if bits == 1 and nz.size != w.size:
            continue  # binary has no zero
        try:
            fmt = Pow2(bits, emax)
        except HwgenError:
            return None
        if fmt.emin <= emin:
            return fmt
    return None


def detect_fixed(w: np.ndarray) -> Fixed | None:
    """The smallest ``Fixed(bits, frac)`` (bits <= 16) holding every weight exactly, or None."""
    w = np.asarray(w, np.float64)
    nz = w[w != 0]
    frac = 0 if nz.size == 0 else int(-_lowest_bit_exponent(nz).min())
    if not WEIGHT_FRAC_RANGE[0] <= frac <= WEIGHT_FRAC_RANGE[1]:
        return None
    q = w * 2.0**frac
    if np.abs(q).max(initial=0.0) > 2.0**FIXED_MAX_BITS:
        return None
    bits = max(2, signed_bits(int(q.min(initial=0)), int(q.max(initial=0))))
    return Fixed(bits, frac) if bits <= FIXED_MAX_BITS else None


def detect_format(layer: str, w: np.ndarray) -> WeightFormat:
    """The exact grid of a layer's weights: powers of two first (cheaper hardware), then fixed.

    Weights on neither grid are an error naming the first weight that is off the finest
    16-bit fixed-point grid wide enough for the layer's range.
    """
    w = np.asarray(w, np.float64)
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise HwgenError(f"{_where(layer, w, int(bad[0]))} is not finite")
    fmt = detect_pow2(w)
    if fmt is None:
        fmt = detect_fixed(w)
    if fmt is not None:
        return fmt
    f = fixed_fit_frac(float(np.abs(w).max()), (1 << (FIXED_MAX_BITS - 1)) - 1)
    scaled = w * 2.0**f
    off = np.flatnonzero(scaled != np.floor(scaled))
    flat = int(off[0]) if off.size else int(np.abs(w).argmax())
    quantizers = "|".join(s for s in SCHEMES if s != "auto")
    raise HwgenError(
        f"{_where(layer, w, flat)} is on no power-of-two grid (<= {POW2_MAX_BITS} bits) "
        f"or fixed-point grid (<= {FIXED_MAX_BITS} bits): weights are not on any grid, so "
        f"this model is not quantized; use --scheme {quantizers}"
    )
