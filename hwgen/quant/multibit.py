"""Alternating multi-bit binary codes (Xu et al., ICLR 2018), per output channel.

Each row ``w`` (an output channel's weights, or the whole layer) is approximated by
``Σ_{i<M} α_i·b_i`` with ``b_i ∈ {-1, +1}^n``:

- greedy start: ``b_i = sign(r)``, ``α_i = mean|r|`` on the residual ``r`` left by the
  planes before;
- then alternately ``α`` by least squares given the codes, and the codes given ``α``: each
  weight takes the code vector whose value ``Σ α_i b_i`` is nearest among the ``2**M``
  (the values sorted once per row, then a binary search: the paper's search tree).

Both half-steps are optimal given the other, so the squared error never increases.
Retraining is :func:`hwgen.quant.binarize.retrain` (straight-through, Adam, float64,
snapped). :func:`plane_format` gives the IR's ``Planes`` format of a layer's planes with
integer scales and the exact integer weights they stand for.
"""

from __future__ import annotations

import itertools

import numpy as np

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FConv2d, FLinear, FloatNet
from hwgen.ir import Planes
from hwgen.quant.binarize import (
    DEFAULT_SCALE_BITS,
    RetrainOptions,
    ScaledCodes,
    channel_alpha,
    channel_rows,
    quantize_scales,
    retrain,
)

MAX_PLANES = 4
DEFAULT_ITERATIONS = 2  # the paper's "two alternating cycles"


def _check_planes(m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_PLANES:
        raise HwgenError(f"multi-bit planes must be an integer in [1, {MAX_PLANES}], not {m!r}")


def _scaled(w: np.ndarray, planes: np.ndarray, alpha: np.ndarray) -> ScaledCodes:
    """Rows' planes (rows, M, n) and scales (rows, M) as a layer's ScaledCodes."""
    codes = np.moveaxis(planes, 1, 0).reshape((planes.shape[1], *w.shape))
    return ScaledCodes(codes.astype(np.int64), channel_alpha(alpha.T, w.shape[0]))


def _greedy_rows(rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    r = rows.copy()
    planes = np.empty((rows.shape[0], m, rows.shape[1]), np.int64)
    alpha = np.empty((rows.shape[0], m))
    for i in range(m):
        planes[:, i] = np.where(r < 0, -1, 1)
        alpha[:, i] = np.abs(r).mean(axis=1)
        r -= alpha[:, i, None] * planes[:, i]
    return planes, alpha


def greedy(w: np.ndarray, m: int, per_channel: bool = True) -> ScaledCodes:
    """The greedy ``m``-plane codes of ``w``: each plane the sign of what is left."""
    _check_planes(m)
    w = np.asarray(w, np.float64)
    planes, alpha = _greedy_rows(channel_rows(w, per_channel), m)
    return _scaled(w, planes, alpha)


def _least_squares(row: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """The ``α`` minimising ``|row - α @ planes|²`` (minimum norm if the planes repeat)."""
    return np.linalg.lstsq(planes.T.astype(np.float64), row, rcond=None)[0]


def _nearest_codes(row: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """For each weight, the ±1 code vector (M, n) whose value ``α @ b`` is nearest."""
    table = np.array(list(itertools.product((-1, 1), repeat=alpha.size)), np.int64)
    values = table @ alpha
    order = np.argsort(values, kind="stable")
    sv = values[order]
    # nearest of the sorted values: a weight past the midpoint of two goes to the upper one
    k = np.searchsorted((sv[:-1] + sv[1:]) / 2, row, side="right")
    return table[order[k]].T


def alternating(
    w: np.ndarray, m: int, per_channel: bool = True, iterations: int = DEFAULT_ITERATIONS
) -> ScaledCodes:
    """Alternating multi-bit codes: the greedy start, then ``iterations`` × (α, codes)."""
    _check_planes(m)
    if iterations < 0:
        raise HwgenError(f"alternating iterations must be >= 0, not {iterations}")
    w = np.asarray(w, np.float64)
    rows = channel_rows(w, per_channel)
    planes, alpha = _greedy_rows(rows, m)
    for r in range(rows.shape[0]):
        for _ in range(iterations):
            alpha[r] = _least_squares(rows[r], planes[r])
            planes[r] = _nearest_codes(rows[r], alpha[r])
        if iterations:  # the scales that fit the final codes
            alpha[r] = _least_squares(rows[r], planes[r])
    return _scaled(w, planes, alpha)


def multibit(
    fnet: FloatNet,
    m: int,
    train: tuple[np.ndarray, np.ndarray],
    options: RetrainOptions | None = None,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    progress: bool = True,
) -> tuple[FloatNet, dict[str, ScaledCodes]]:
    """Every conv/linear layer as ``m`` alternating binary planes, retrained straight-through."""
    _check_planes(m)
    options = options or RetrainOptions()

    def quantize(w: np.ndarray, d: np.ndarray | None) -> ScaledCodes:
        return alternating(w, m, options.per_channel, iterations)

    macs = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    return retrain(
        fnet, dict.fromkeys(macs, quantize), train, options, label=f"{m}-bit retraining",
        progress=progress,
    )  # fmt: skip


def plane_format(sc: ScaledCodes, bits: int = DEFAULT_SCALE_BITS) -> tuple[Planes, np.ndarray]:
    """The planes with integer scales as a ``Planes`` format, and the exact integer weights.

    The scales become integers ``m_ic`` of one ``Fixed(bits, frac)`` per layer
    (:func:`hwgen.quant.binarize.quantize_scales`), held per output channel by the format;
    the weight ``Σ_i m_ic·b_i`` at that frac is what ``M`` add/subtract plane sums combined
    by the ``m_ic`` compute.
    """
    m, fmt = quantize_scales(sc.alpha, bits)  # (M, Cout)
    shape = m.shape + (1,) * (sc.codes.ndim - 2)
    w = np.sum(m.reshape(shape) * sc.codes, axis=0).astype(np.int64)
    return Planes(tuple(map(tuple, m.T.tolist())), fmt.frac), w
