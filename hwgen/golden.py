"""The integer golden model: exactly the arithmetic of DESIGN §2, vectorised.

Everything here works on int64 NCHW (or NF) arrays. Convolutions and dense layers are
im2col + BLAS in floating point when a bound proven from the actual weights keeps every
partial sum exactly representable (below 2**24 in float32, 2**53 in float64), and in int64
otherwise. The hardware and the fake-quantised PyTorch model are judged against this file.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from hwgen.errors import HwgenError
from hwgen.ir import (
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
    add_frac,
    requant_frac,
)

_EXACT_FLOAT = ((np.float32, 2**24), (np.float64, 2**53))


def round_shift(v: np.ndarray, s: int, rounding: str) -> np.ndarray:
    """``v * 2**-s`` rounded as ``rounding`` says (docs/hwq-format.md §3), for s > 0.

    ``half_up`` is ``(v + 2**(s-1)) >> s``; ``half_even`` adds one less, plus bit ``s`` of
    ``v`` (1 when the floor is odd, which moves an exact tie up to the even neighbour);
    ``floor`` is ``v >> s``. Exact for int64 ``|v| < 2**61``.
    """
    s = min(s, 62)  # for |v| < 2**61 every shift of 62 or more gives the same result
    if rounding == "floor":
        return v >> s
    half = 1 << (s - 1)
    if rounding == "half_even":
        return (v + (half - 1) + ((v >> s) & 1)) >> s
    return (v + half) >> s


def requantize(acc: np.ndarray, s: int, fmt: ActFormat, relu: bool = False) -> np.ndarray:
    """``sat(round(acc * 2**-s))`` into ``fmt``, in its rounding; lower bound 0 when ``relu``."""
    lo, hi = (max(fmt.lo, 0) if relu else fmt.lo), fmt.hi
    acc = np.asarray(acc, dtype=np.int64)
    if s > 0:
        return np.clip(round_shift(acc, s, fmt.rounding), lo, hi)
    # Left shift: clip first so the shift cannot overflow; values clipped here saturate
    # anyway, and past 2**40 > |lo|, |hi| every nonzero value saturates.
    k = min(-s, 40)
    acc = np.clip(acc, -((-lo) >> k) - 1, (hi >> k) + 1)
    return np.clip(acc << k, lo, hi)


_ROUND_FLOAT = {
    "half_up": lambda v: np.floor(v + 0.5),
    "half_even": np.rint,  # ties to even, as torch.round and QONNX's ROUND
    "floor": np.floor,
}


def quantize_input(x: np.ndarray, fmt: ActFormat) -> np.ndarray:
    """A float tensor to ``fmt``: ``clip(round(x * 2**frac))`` in float64, in its rounding."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise HwgenError("input contains NaN or Inf")
    v = _ROUND_FLOAT[fmt.rounding](x * 2.0**fmt.frac)
    return np.clip(v, fmt.lo, fmt.hi).astype(np.int64)


def check_input(x: np.ndarray, net: Network) -> np.ndarray:
    """Validate an NCHW (or NF) integer batch against the network's input shape and format."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise HwgenError(f"input must be an integer array, not dtype {x.dtype}")
    if x.shape[1:] != net.input_shape:
        raise HwgenError(
            f"input has shape {x.shape}, expected (N, {', '.join(map(str, net.input_shape))})"
        )
    fmt = net.input_format
    if x.size and (x.min() < fmt.lo or x.max() > fmt.hi):
        bad = x.min() if x.min() < fmt.lo else x.max()
        raise HwgenError(
            f"input value {bad} is outside the input format {fmt} [{fmt.lo}, {fmt.hi}]"
        )
    return x.astype(np.int64)


def _matmul_exact(a: np.ndarray, w: np.ndarray, bound: float) -> np.ndarray:
    """``a @ w.T`` for int64 arrays whose every partial sum is at most ``bound`` in magnitude."""
    for dtype, limit in _EXACT_FLOAT:
        if bound < limit:
            return (a.astype(dtype) @ w.T.astype(dtype)).astype(np.int64)
    return a @ w.T


def _mac_bound(w: np.ndarray, fmt: ActFormat) -> float:
    return float(np.abs(w).sum(1).max()) * max(-fmt.lo, fmt.hi)


def conv2d_acc(x: np.ndarray, layer: Conv2d, in_format: ActFormat) -> np.ndarray:
    """The exact accumulators ``bias + Σ a w`` of a convolution, (N, Cout, OH, OW) int64."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
    w = layer.weight.reshape(layer.out_channels, -1)
    bound = _mac_bound(w, in_format)
    n = x.shape[0]
    dtype = next((d for d, lim in _EXACT_FLOAT if bound < lim), np.int64)
    xp = np.pad(x.astype(dtype), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    oh, ow = win.shape[2], win.shape[3]
    # Per image, columns (Cin*KH*KW, OH*OW): the copy runs along OW (cache friendly) and the
    # product (Cout, OH*OW) is already NCHW, so no transpose of the result is needed.
    cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(n, w.shape[1], oh * ow)
    acc = (w.astype(dtype) @ cols).astype(np.int64).reshape(n, w.shape[0], oh, ow)
    return acc + layer.bias[None, :, None, None]


def linear_acc(x: np.ndarray, layer: Linear, in_format: ActFormat) -> np.ndarray:
    """The exact accumulators ``bias + Σ a w`` of a dense layer, (N, out) int64."""
    return _matmul_exact(x, layer.weight, _mac_bound(layer.weight, in_format)) + layer.bias


def flatten_hwc(x: np.ndarray) -> np.ndarray:
    """NCHW -> N, H*W*C (channels fastest), the order the hardware streams."""
    if x.ndim != 4:
        return x
    n, c, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(n, h * w * c)  # explicit sizes: n may be 0


def add_forward(
    a: np.ndarray, b: np.ndarray, fa: ActFormat, fb: ActFormat, layer: Add
) -> np.ndarray:
    """``sat(round((a·2^(F-fa) + b·2^(F-fb)) · 2^-(F-fo)))`` with F the finer input frac, in
    the output format's rounding."""
    f = add_frac(fa, fb)
    total = (a << (f - fa.frac)) + (b << (f - fb.frac))  # Network proved it fits 62 bits
    return requantize(total, f - layer.out_format.frac, layer.out_format, layer.relu)


def subsample_pad(x: np.ndarray, layer: SubsamplePad) -> np.ndarray:
    """``x[:, :, ::sh, ::sw]`` with ``pad`` zero channels before and after."""
    (sh, sw), (before, after) = layer.stride, layer.pad
    return np.pad(x[:, :, ::sh, ::sw], ((0, 0), (before, after), (0, 0), (0, 0)))


def _avg(total: np.ndarray, area: int, fmt: ActFormat) -> np.ndarray:
    """``round(total / area)`` in ``fmt.rounding``: the mean, in the format of the input."""
    m = area.bit_length() - 1  # area is a power of two
    return round_shift(total, m, fmt.rounding) if m else total


def layer_forward(
    layer: Layer, x: np.ndarray | list[np.ndarray], in_format: ActFormat | list[ActFormat]
) -> np.ndarray:
    """One layer on int64 batches whose values are in their formats.

    ``x`` and ``in_format`` are lists (one entry per input) for ``add``; a single array and
    format, or one-element lists, for every other op.
    """
    if isinstance(layer, Add):
        assert isinstance(x, list) and isinstance(in_format, list)
        return add_forward(x[0], x[1], in_format[0], in_format[1], layer)
    if isinstance(x, list):
        x = x[0]
    if isinstance(in_format, list):
        in_format = in_format[0]
    if isinstance(layer, (Conv2d, Linear)):
        acc_fn = conv2d_acc if isinstance(layer, Conv2d) else linear_acc
        acc = acc_fn(x, layer, in_format)
        if layer.scale is not None:  # Network proved acc * m fits 62 bits
            acc = acc * layer.scale.reshape(-1, *(1,) * (acc.ndim - 2))
        s = requant_frac(layer, in_format) - layer.out_format.frac
        return requantize(acc, s, layer.out_format, layer.relu)
    if isinstance(layer, ReLU):
        return np.maximum(x, 0)
    if isinstance(layer, Flatten):
        return flatten_hwc(x)
    if isinstance(layer, SubsamplePad):
        return subsample_pad(x, layer)
    if isinstance(layer, GlobalAvgPool):
        return _avg(x.sum(axis=(2, 3), keepdims=True), x.shape[2] * x.shape[3], in_format)
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    if isinstance(layer, MaxPool2d):
        return win.max(axis=(4, 5))
    assert isinstance(layer, AvgPool2d)
    return _avg(win.sum(axis=(4, 5)), kh * kw, in_format)


def forward(net: Network, x: np.ndarray) -> list[np.ndarray]:
    """Every layer's output (int64, NCHW or NF), in layer order, for an integer input batch."""
    acts = {INPUT: check_input(x, net)}
    for layer in net.layers:
        acts[layer.name] = layer_forward(
            layer, [acts[i] for i in layer.inputs], [net.formats[i] for i in layer.inputs]
        )
    return [acts[layer.name] for layer in net.layers]


def predict(net: Network, x: np.ndarray) -> np.ndarray:
    """Predicted class per image: the first index of the maximum of the last layer's output."""
    out = forward(net, x)[-1]
    return out.reshape(out.shape[0], int(np.prod(out.shape[1:]))).argmax(axis=1)
