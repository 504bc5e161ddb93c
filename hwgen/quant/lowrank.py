"""Low-rank layers: a KHxKW conv as a KHx1 conv then a 1xKW conv, a dense layer as two.

Conv (Jaderberg, Vedaldi & Zisserman 2014, scheme 2): with ``W`` (Cout, Cin, KH, KW),
``V`` (r, Cin, KH, 1) and ``H`` (Cout, r, 1, KW), the two convs compute

    y[o, i, j] = sum_{r, x} H[o, r, x] sum_{c, y} V[r, c, y] in[c, i*sh + y, j*sw + x]

i.e. the kernel ``sum_r H[o, r, x] V[r, c, y]``. Laid out as the (Cin*KH, KW*Cout) matrix
``M[(c, y), (x, o)] = W[o, c, y, x]`` that kernel is ``V' H'`` with ``V'[(c, y), r]`` and
``H'[r, (x, o)]``: a rank-r factorisation of ``M``, so the truncated SVD
``M ~ U_r S_r Vt_r`` is the best one in the Frobenius norm (Eckart-Young), split as
``V' = U_r sqrt(S_r)``, ``H' = sqrt(S_r) Vt_r``; at full rank ``min(Cin*KH, KW*Cout)`` it is
exact. The KHx1 conv takes the vertical padding and stride, the 1xKW conv the horizontal
ones: a column the 1xKW conv pads with zeros is one the original padded, so the pair
equals the original exactly (up to the truncation).

Dense: ``W (out, in) ~ (U_r sqrt(S_r)) (sqrt(S_r) Vt_r)``, a linear in -> r then r -> out.

The first layer of a pair (``<name>_v``; a dense layer's ``<name>_a``) has no bias and no
ReLU (its output is signed); the second (``<name>_h`` / ``<name>_b``) has the original
bias and ReLU, and later layers read it. A layer is decomposed only where the pair has
fewer weights than the original (a 1-input-channel 3x3 conv never does). The rank is an
integer (capped at the full rank) or the smallest that keeps a fraction ``energy`` of
``sum S**2``. Retraining afterwards is INQ's (:func:`hwgen.quant.inq.retrain_free`, nothing
frozen), distilled to the original model. The result is an ordinary FloatNet.

On digits (float 98.06%, 25,600 MACs; seeds 0-2, 4 epochs) splitting conv2 alone at rank
2 / 4 / 8 gives 97.2% / 97.8% / 97.7% float (0.37x / 0.46x / 0.64x the MACs); splitting
the 256 -> 10 classifier too hurts (rank 4: 72-77%, rank 6: 89-90%), so name the conv
layers (``layers``) on small classifiers.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from rich.progress import Progress

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FAdd, FConv2d, FLayer, FLinear, FloatNet
from hwgen.quant.inq import LR_RESIDUAL, FloatModule, InqOptions, retrain_free, with_weights
from hwgen.quant.prune import _data
from hwgen.reproducible import one_thread

LR_LOWRANK = 3e-3


def conv_matrix(w: np.ndarray) -> np.ndarray:
    """``M[(c, y), (x, o)] = W[o, c, y, x]`` of shape (Cin*KH, KW*Cout)."""
    cout, cin, kh, kw = w.shape
    return np.transpose(w, (1, 2, 3, 0)).reshape(cin * kh, kw * cout)


def choose_rank(s: np.ndarray, rank: int | None, energy: float | None) -> int:
    """The rank for singular values ``s`` (decreasing): ``rank`` capped at ``len(s)``, or the
    smallest keeping ``energy`` of ``sum s**2`` (at least 1)."""
    if (rank is None) == (energy is None):
        raise HwgenError("lowrank: give either a rank or an energy")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise HwgenError(f"lowrank rank must be a positive integer, not {rank!r}")
        return min(rank, len(s))
    assert energy is not None
    if not 0.0 < energy <= 1.0:
        raise HwgenError(f"lowrank energy must be in (0, 1], not {energy}")
    total = np.cumsum(np.square(s))
    # a relative tolerance: energy 1.0 must not ask for the rounding noise of the last terms
    return int(min(len(s), np.searchsorted(total, energy * total[-1] * (1 - 1e-12)) + 1))


def split_conv(
    w: np.ndarray, rank: int | None = None, energy: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``W`` (Cout, Cin, KH, KW) as ``V`` (r, Cin, KH, 1) and ``H`` (Cout, r, 1, KW)."""
    w = np.asarray(w, np.float64)
    cout, cin, kh, kw = w.shape
    u, s, vt = np.linalg.svd(conv_matrix(w), full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = np.sqrt(s[:r])
    v = (u[:, :r] * root).reshape(cin, kh, r).transpose(2, 0, 1)[..., None]
    h = (root[:, None] * vt[:r]).reshape(r, kw, cout).transpose(2, 0, 1)[:, :, None, :]
    return np.ascontiguousarray(v), np.ascontiguousarray(h)


def split_linear(
    w: np.ndarray, rank: int | None = None, energy: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``W`` (out, in) as ``A`` (r, in) and ``B`` (out, r), ``W ~ B @ A``."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = np.sqrt(s[:r])
    return root[:, None] * vt[:r], u[:, :r] * root


def _split(
    fl: FConv2d | FLinear, rank: int | None, energy: float | None
) -> tuple[FConv2d, FConv2d] | tuple[FLinear, FLinear] | None:
    """The pair replacing ``fl``, or None when it would not have fewer weights."""
    w = np.asarray(fl.weight, np.float64)
    if isinstance(fl, FConv2d):
        v, h = split_conv(w, rank, energy)
        if v.size + h.size >= w.size:
            return None
        first = FConv2d(
            f"{fl.name}_v", v, np.zeros(v.shape[0]), (fl.stride[0], 1), (fl.padding[0], 0),
            inputs=fl.inputs,
        )  # fmt: skip
        second = FConv2d(
            f"{fl.name}_h", h, np.asarray(fl.bias, np.float64), (1, fl.stride[1]),
            (0, fl.padding[1]), relu=fl.relu, inputs=(first.name,),
        )  # fmt: skip
        return first, second
    a, b = split_linear(w, rank, energy)
    if a.size + b.size >= w.size:
        return None
    fa = FLinear(f"{fl.name}_a", a, np.zeros(a.shape[0]), inputs=fl.inputs)
    fb = FLinear(f"{fl.name}_b", b, np.asarray(fl.bias, np.float64), fl.relu, (fa.name,))
    return fa, fb


def decompose(
    fnet: FloatNet,
    rank: int | None = None,
    energy: float | None = None,
    layers: tuple[str, ...] | None = None,
) -> FloatNet:
    """``fnet`` with its conv/linear layers (or those named) split where that saves weights."""
    macs = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    unknown = sorted(set(layers or ()) - set(macs))
    if unknown:
        raise HwgenError(f"lowrank: no conv/linear layer named {unknown[0]!r}")
    chosen = set(macs if layers is None else layers)
    renamed: dict[str, str] = {}
    out: list[FLayer] = []
    for fl in fnet.layers:
        fl = replace(fl, inputs=tuple(renamed.get(i, i) for i in fl.inputs))
        mac = isinstance(fl, (FConv2d, FLinear)) and fl.name in chosen
        pair = _split(fl, rank, energy) if mac else None
        if pair is None:
            out.append(fl)
        else:
            out.extend(pair)
            renamed[fl.name] = pair[1].name
    return replace(fnet, layers=tuple(out))


def lowrank(
    fnet: FloatNet,
    train: tuple[np.ndarray, np.ndarray],
    rank: int | None = None,
    energy: float | None = None,
    layers: tuple[str, ...] | None = None,
    options: InqOptions | None = None,
    *,
    progress: bool = True,
) -> FloatNet:
    """:func:`decompose`, then retrain every weight and bias for ``options.epochs`` epochs
    (INQ's settings; ``portions`` and ``partition`` unused; learning rate None:
    ``LR_LOWRANK`` on a chain) with distillation to ``fnet``.
    Deterministic for a given ``options.seed``."""
    if options is None or options.lr is None:
        # SGD at INQ's 0.01 diverges on digits split at rank 2; 3e-3 is the best of 1e-3..1e-2
        residual = any(isinstance(fl, FAdd) for fl in fnet.layers)
        options = replace(options or InqOptions(), lr=LR_RESIDUAL if residual else LR_LOWRANK)
    xt, yt = _data(train)
    split = decompose(fnet, rank, energy, layers)
    torch.manual_seed(options.seed)
    teacher = FloatModule(fnet).double().eval()
    module = FloatModule(split).double()
    macs = {n: module.macs[i] for n, i in module.index.items()}
    frozen = {n: np.zeros(m.weight.shape, bool) for n, m in macs.items()}
    gen = torch.Generator().manual_seed(options.seed)
    with one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("low-rank retraining", total=options.epochs)
        retrain_free(
            module, macs, frozen, (xt, yt, teacher), options, gen, lambda: bar.advance(task)
        )
    params = {
        n: (m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
        for n, m in macs.items()
    }
    return with_weights(split, params)


def mac_count(fnet: FloatNet) -> dict[str, int]:
    """Multiply-accumulates per inference of each conv/linear layer (output size x fan-in)."""
    outs = fnet.forward(torch.zeros((1, *fnet.input_shape), dtype=torch.float64))
    counts = {}
    for fl, y in zip(fnet.layers, outs, strict=True):
        if isinstance(fl, (FConv2d, FLinear)):
            counts[fl.name] = int(y[0].numel()) * int(np.prod(np.shape(fl.weight)[1:]))
    return counts
