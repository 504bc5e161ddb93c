"""Binary and ternary weights with a real scale per output channel, and their retraining.

Each conv/linear weight tensor ``W`` (out, ...) becomes integer codes times a scale ``α_c``
per output channel ``c`` (or one per layer, repeated over the channels):

- ``bc``: BinaryConnect (Courbariaux et al. 2015) with the BWN/XNOR-Net scale:
  ``B = sign(W)``, ``α_c = mean|W_c|``.
- ``twn``: Ternary Weight Networks (Li & Liu 2016): ``Δ = 0.7·mean|W_c|``,
  ``T = sign(W)·[|W| > Δ]``, ``α_c`` the mean of ``|W_c|`` over ``|W_c| > Δ``.
- ``lab``: loss-aware binarization (Hou, Yao & Kwok, ICLR 2017), the proximal Newton step
  with the diagonal Hessian ``D = sqrt(v̂) + ε`` from Adam's second moment:
  ``B = sign(W)``, ``α_c = ||D_c ⊙ W_c||_1 / ||D_c||_1``.
- ``lat``: loss-aware ternarization (Hou & Kwok, ICLR 2018), the same step onto
  ``{-α, 0, +α}``: minimise ``Σ D (W - α T)²`` per channel by alternating ``α`` (the
  D-weighted mean of ``|W|`` on the support) and the support ``|W| > α/2`` until it stops
  changing, started from TWN's threshold.

Retraining (:func:`retrain`) follows LAB's Algorithm 1 for all four: the full-precision
weights are kept and updated by Adam with the gradient taken at the quantised weights
(straight-through), the quantised weights being recomputed before every forward from the
current weights and Adam's current ``v``. As INQ (:mod:`hwgen.quant.inq`): float64 on one
thread, parameters snapped after every step (:mod:`hwgen.reproducible`), cross-entropy plus
distillation to the pretrained logits on randomly shifted images.

Pruned weights (issue #12; ``masks`` of :func:`hwgen.quant.prune.prune`, True: kept) stay
exactly 0 in ``twn`` and ``lat``: their code is 0 in every forward pass and in the result,
the threshold and scale statistics are those of the kept weights only (a pruned channel's
zeros would lower TWN's threshold until it hardly prunes more), and the latent float
weights stay 0 (their gradient is masked, so Adam never moves them). ``bc`` and ``lab``
have no zero code and refuse masks.

In the IR (:func:`scaled_mac_layer`) the codes are ``Pow2(1, 0)`` / ``Pow2(2, 0)`` weights
and ``α_c`` the layer's per-channel integer scale ``m_c`` (docs/hwq-format.md §3).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FConv2d, FLinear, FloatNet
from hwgen.ir import ActFormat, Conv2d, Fixed, Linear, Pow2
from hwgen.quant.inq import FloatModule, batch, retrain_loss, with_weights
from hwgen.quant.prune import kept_masks
from hwgen.quant.weights import fixed_fit_frac, quantize_fixed
from hwgen.reproducible import GRID, one_thread, snap_

SCHEMES = ("bc", "twn", "lab", "lat")
BINARY = Pow2(1, 0)  # integer weights ±1
TERNARY = Pow2(2, 0)  # integer weights -1, 0, 1
DEFAULT_SCALE_BITS = 8

# A quantiser: (weights, Hessian diagonal or None before Adam has one) -> codes and scales.
Quantizer = Callable[[np.ndarray, np.ndarray | None], "ScaledCodes"]


@dataclass(frozen=True, eq=False)
class ScaledCodes:
    """A layer's weights as integer codes times real scales per output channel.

    ``codes``: int64 of W's shape (±1 binary, -1/0/1 ternary), or ``(M, *W.shape)`` planes
    of ±1 for multi-bit codes. ``alpha``: float64 ``(out,)``, or ``(M, out)`` for planes.
    """

    codes: np.ndarray
    alpha: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        """The real weights ``Σ α·codes`` (W's shape)."""
        planes = self.codes if self.alpha.ndim == 2 else self.codes[None]
        alpha = self.alpha if self.alpha.ndim == 2 else self.alpha[None]
        shape = alpha.shape + (1,) * (planes.ndim - 2)
        return np.sum(alpha.reshape(shape) * planes, axis=0)


def channel_rows(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """``w`` as float64 rows that share a scale: (out, fan_in), or one row per layer."""
    w = np.asarray(w, np.float64)
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def channel_alpha(alpha: np.ndarray, out: int) -> np.ndarray:
    """Scales of shape (rows,) or (M, rows) as one per output channel (a layer's repeated)."""
    return np.broadcast_to(alpha, (*alpha.shape[:-1], out)).copy()


def _sign(w: np.ndarray) -> np.ndarray:
    """±1 by sign; a zero weight gets +1 (binary has no zero, as ``quantize_pow2``)."""
    return np.where(w < 0, -1, 1).astype(np.int64)


def _weighted_mean(a: np.ndarray, d: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, ``Σ d·a / Σ d`` over ``mask`` (0 on an empty row)."""
    num = np.sum(d * a * mask, axis=1)
    den = np.sum(d * mask, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _kept_rows(w: np.ndarray, kept: np.ndarray | None, per_channel: bool) -> np.ndarray:
    """The kept mask (True: not pruned; None: all) as ``channel_rows`` of ``w``."""
    rows = channel_rows(w, per_channel)
    if kept is None:
        return np.ones(rows.shape, bool)
    kept = np.asarray(kept, bool)
    if kept.shape != np.shape(w):
        raise HwgenError(f"the kept mask must be of the weights' shape {np.shape(w)}")
    return kept.reshape(rows.shape)


def _hessian(w: np.ndarray, d: np.ndarray | None, per_channel: bool) -> np.ndarray:
    if d is None:
        return np.ones_like(channel_rows(w, per_channel))
    d = np.asarray(d, np.float64)
    if d.shape != np.shape(w) or not np.all(d > 0):
        raise HwgenError(f"the Hessian diagonal must be positive and of shape {np.shape(w)}")
    return channel_rows(d, per_channel)


def binary_connect(w: np.ndarray, per_channel: bool = True) -> ScaledCodes:
    """BinaryConnect with the mean-|w| scale: ``sign(W)``, ``α_c = mean|W_c|``."""
    w = np.asarray(w, np.float64)
    alpha = np.abs(channel_rows(w, per_channel)).mean(axis=1)
    return ScaledCodes(_sign(w), channel_alpha(alpha, w.shape[0]))


def twn(w: np.ndarray, per_channel: bool = True, kept: np.ndarray | None = None) -> ScaledCodes:
    """TWN: threshold ``0.7·mean|W_c|``, ``α_c`` the mean magnitude above it; with ``kept``
    (True: not pruned) both over the kept weights, the others coded 0."""
    w = np.asarray(w, np.float64)
    a = np.abs(channel_rows(w, per_channel))
    k = _kept_rows(w, kept, per_channel)
    mask = k & (a > 0.7 * _weighted_mean(a, np.ones_like(a), k)[:, None])
    alpha = _weighted_mean(a, np.ones_like(a), mask)
    return ScaledCodes(_ternary_codes(w, mask), channel_alpha(alpha, w.shape[0]))


def _ternary_codes(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (np.sign(w) * mask.reshape(w.shape)).astype(np.int64)


def lab(w: np.ndarray, d: np.ndarray | None, per_channel: bool = True) -> ScaledCodes:
    """LAB's proximal Newton step: ``sign(W)``, ``α_c = ||D_c ⊙ W_c||_1 / ||D_c||_1``.

    ``d`` is the positive Hessian diagonal (W's shape); None is a constant one (BC's scale).
    """
    w = np.asarray(w, np.float64)
    a = np.abs(channel_rows(w, per_channel))
    alpha = _weighted_mean(a, _hessian(w, d, per_channel), np.ones(a.shape, bool))
    return ScaledCodes(_sign(w), channel_alpha(alpha, w.shape[0]))


def lat(
    w: np.ndarray, d: np.ndarray | None, per_channel: bool = True, kept: np.ndarray | None = None
) -> ScaledCodes:
    """LAT's proximal Newton step onto ``{-α, 0, α}``: minimises ``Σ D (W - α T)²`` per row
    (over the ``kept`` weights only, True: not pruned; the others are coded 0).

    Alternates ``α`` (D-weighted mean of ``|W|`` on the support) and the support
    ``|W| > α/2`` from TWN's threshold until the support stops changing. Each half-step is
    optimal given the other, so the weighted error never increases; the supports are
    top-k sets, so a row settles within ``fan_in + 1`` changes.
    """
    w = np.asarray(w, np.float64)
    a = np.abs(channel_rows(w, per_channel))
    dr = _hessian(w, d, per_channel)
    k = _kept_rows(w, kept, per_channel)
    mask = k & (a > 0.7 * _weighted_mean(a, np.ones_like(a), k)[:, None])
    alpha = _weighted_mean(a, dr, mask)
    for _ in range(a.shape[1] + 1):
        new = k & (a > alpha[:, None] / 2)
        if np.array_equal(new, mask):
            break
        mask = new
        alpha = _weighted_mean(a, dr, mask)
    return ScaledCodes(_ternary_codes(w, mask), channel_alpha(alpha, w.shape[0]))


def quantizer(scheme: str, per_channel: bool = True, kept: np.ndarray | None = None) -> Quantizer:
    """The quantiser of ``scheme`` (one of ``SCHEMES``) as ``(w, d) -> ScaledCodes``; with
    ``kept`` (True: not pruned) the others are coded 0 (twn, lat: the ternary ones)."""
    if kept is not None and scheme in ("bc", "lab"):
        raise HwgenError(f"scheme {scheme} has binary codes ±1: no zero code for pruned weights")
    if scheme == "bc":
        return lambda w, d: binary_connect(w, per_channel)
    if scheme == "twn":
        return lambda w, d: twn(w, per_channel, kept)
    if scheme == "lab":
        return lambda w, d: lab(w, d, per_channel)
    if scheme == "lat":
        return lambda w, d: lat(w, d, per_channel, kept)
    raise HwgenError(f"binarization scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")


# ---------------------------------------------------------------- retraining


@dataclass(frozen=True)
class RetrainOptions:
    """Straight-through retraining with Adam (LAB's estimate of D needs Adam's ``v``).

    The learning rate falls from ``lr`` to 0 on a cosine over all steps: on digits (seeds
    0-2, 16 epochs) a constant 1e-3 left the final accuracies up to 2.2 points apart, the
    cosine within 1.1. 16 epochs is INQ's default budget (4 portions x 4 epochs).
    ``epochs`` 0 only quantises the pretrained weights (D constant: LAB is BC's scale).
    ``distill`` and ``shift`` as in :class:`hwgen.quant.inq.InqOptions`.
    """

    epochs: int = 16
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    distill: float = 1.0
    shift: int = 1
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise HwgenError(f"retraining epochs must be >= 0, not {self.epochs}")
        if not self.lr > 0:
            raise HwgenError(f"retraining learning rate must be positive, not {self.lr}")
        if self.batch_size < 1:
            raise HwgenError(f"retraining batch size must be >= 1, not {self.batch_size}")


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantised weights; backward: the gradient passes to the float weights."""

    @staticmethod
    def forward(ctx: object, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _QuantizedMac(nn.Module):
    """A conv/linear module whose forward uses its quantised weights (straight-through)."""

    def __init__(self, mac: nn.Conv2d | nn.Linear, quantize: Quantizer) -> None:
        super().__init__()
        self.mac = mac
        self.quantize = quantize
        self.hessian: np.ndarray | None = None  # D, from Adam's v after the first step

    def codes(self) -> ScaledCodes:
        sc = self.quantize(self.mac.weight.detach().numpy(), self.hessian)
        # machine-independent scales (D comes from unsnapped optimizer state)
        return replace(sc, alpha=np.round(sc.alpha / GRID) * GRID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(self.codes().weights)
        w = _StraightThrough.apply(self.mac.weight, q)
        if isinstance(self.mac, nn.Conv2d):
            return F.conv2d(x, w, self.mac.bias, self.mac.stride, self.mac.padding)
        return F.linear(x, w, self.mac.bias)


def _adam_hessian(opt: torch.optim.Adam, p: torch.Tensor) -> np.ndarray | None:
    """LAB's ``D = sqrt(v̂) + ε`` from Adam's bias-corrected second moment of ``p``."""
    state = opt.state.get(p)
    if not state:
        return None
    group = opt.param_groups[0]
    step = float(state["step"])
    v_hat = state["exp_avg_sq"] / (1.0 - group["betas"][1] ** step)
    return (torch.sqrt(v_hat) + group["eps"]).numpy().copy()


def retrain(
    fnet: FloatNet,
    quantizers: dict[str, Quantizer],
    train: tuple[np.ndarray, np.ndarray],
    options: RetrainOptions = RetrainOptions(),
    *,
    label: str = "retraining",
    progress: bool = True,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[FloatNet, dict[str, ScaledCodes]]:
    """Retrain ``fnet`` with every named conv/linear layer quantised by its quantiser.

    ``masks`` (layer -> weight mask, True: kept) hold the pruned latent weights at 0: set
    to 0 here, their gradient masked (the quantisers must code them 0 too: :func:`binarize`).
    Returns the net with those layers' weights exactly ``α·codes`` (and retrained biases),
    and each layer's codes and scales. Deterministic for a given ``options.seed``.
    """
    x, y = (np.asarray(a) for a in train)
    if x.ndim < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise HwgenError(f"training data: {x.shape[0]} images but labels of shape {y.shape}")
    torch.manual_seed(options.seed)
    module = FloatModule(fnet).double()
    teacher = copy.deepcopy(module).eval()  # the pretrained model: the target of distillation
    unknown = sorted(set(quantizers) - set(module.index))
    if unknown:
        raise HwgenError(f"no conv/linear layer named {unknown[0]!r} to quantise")
    for name, kept in kept_masks(fnet, masks).items():
        if kept is not None:
            keep = torch.as_tensor(kept, dtype=torch.float64)
            weight = module.macs[module.index[name]].weight
            with torch.no_grad():
                weight.mul_(keep)
            weight.register_hook(lambda g, keep=keep: g * keep)
    wrapped: dict[str, _QuantizedMac] = {}
    for name, quantize in quantizers.items():
        i = module.index[name]
        wrapped[name] = _QuantizedMac(module.macs[i], quantize)
        module.macs[i] = wrapped[name]
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(options.seed)
    opt = torch.optim.Adam(module.parameters(), lr=options.lr)
    steps = max(1, options.epochs * -(-xt.shape[0] // options.batch_size))
    cosine = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 + 0.5 * math.cos(math.pi * k / steps)
    )
    with one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=options.epochs)
        module.train()
        for _ in range(options.epochs):
            order = torch.randperm(xt.shape[0], generator=gen)
            for i in range(0, xt.shape[0], options.batch_size):
                idx = order[i : i + options.batch_size]
                xb = batch(xt, idx, options.shift, gen)
                opt.zero_grad()
                out = module(xb)
                loss = retrain_loss(out, yt[idx], teacher, xb, options.distill, label, options.lr)
                loss.backward()
                opt.step()
                cosine.step()
                snap_(module)
                for q in wrapped.values():
                    q.hessian = _adam_hessian(opt, q.mac.weight)
            bar.advance(task)
        module.eval()
    codes = {name: q.codes() for name, q in wrapped.items()}
    params = {
        name: (codes[name].weights, q.mac.bias.detach().double().numpy().copy())
        for name, q in wrapped.items()
    }
    return with_weights(fnet, params), codes


def binarize(
    fnet: FloatNet,
    scheme: str,
    train: tuple[np.ndarray, np.ndarray],
    options: RetrainOptions = RetrainOptions(),
    *,
    progress: bool = True,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[FloatNet, dict[str, ScaledCodes]]:
    """Every conv/linear layer of ``fnet`` quantised by ``scheme``, retrained (:func:`retrain`).

    ``masks`` (layer -> weight mask, True: kept; twn and lat only) keep the pruned weights
    exactly 0: coded 0 and their latent weights held at 0 (module docstring)."""
    kept = kept_masks(fnet, masks)
    quantizers = {n: quantizer(scheme, options.per_channel, k) for n, k in kept.items()}
    return retrain(
        fnet, quantizers, train, options, label=f"{scheme} retraining", progress=progress,
        masks=masks,
    )  # fmt: skip


# ---------------------------------------------------------------- to integers


def quantize_scales(alpha: np.ndarray, bits: int = DEFAULT_SCALE_BITS) -> tuple[np.ndarray, Fixed]:
    """Scales as integers ``m`` of ``Fixed(bits, frac)``, the frac the largest |α| fills."""
    alpha = np.asarray(alpha, np.float64)
    fmt = Fixed(bits, fixed_fit_frac(float(np.abs(alpha).max(initial=0.0)), (1 << (bits - 1)) - 1))
    return quantize_fixed(alpha, fmt), fmt


def scaled_mac_layer(
    fl: FConv2d | FLinear,
    sc: ScaledCodes,
    in_format: ActFormat,
    out_format: ActFormat,
    scale_bits: int = DEFAULT_SCALE_BITS,
) -> Conv2d | Linear:
    """The IR layer of binary/ternary codes with their scales as the per-channel ``m_c``.

    Weights ``Pow2(1, 0)`` (±1) or ``Pow2(2, 0)`` (-1, 0, 1, when a code is 0), ``m_c`` from
    :func:`quantize_scales`. The bias is added before the multiply by ``m_c``, so the real
    bias ``b_c`` is stored as ``rhu(b_c · 2**(frac_a + frac_m) / m_c)``. A channel whose
    scale rounds to ``m_c = 0`` (α_c under half a step) but has a bias gets ``m_c = 1``
    instead: its weights are then off by at most one step, and the bias is kept.
    """
    if sc.alpha.ndim != 1:
        raise HwgenError(
            f"layer {fl.name}: {sc.alpha.shape[0]} binary planes have no IR weight format yet"
        )
    if sc.codes.shape != fl.weight.shape or np.any(np.abs(sc.codes) > 1):
        raise HwgenError(f"layer {fl.name}: codes must be -1, 0 or 1 of shape {fl.weight.shape}")
    wfmt = TERNARY if np.any(sc.codes == 0) else BINARY
    m, sfmt = quantize_scales(sc.alpha, scale_bits)
    bias = np.asarray(fl.bias, np.float64)
    m = np.where((m == 0) & (bias != 0), 1, m)
    frac = in_format.frac + wfmt.frac + sfmt.frac  # of acc · m, where the real value is y
    b = np.floor(bias * 2.0**frac / np.where(m == 0, 1, m) + 0.5)
    if not np.all(np.abs(b) < 2.0**61):
        raise HwgenError(f"layer {fl.name}: bias too large for its scales at frac {frac}")
    codes = sc.codes.astype(np.int64)
    if isinstance(fl, FConv2d):
        cout, cin, kh, kw = fl.weight.shape
        return Conv2d(
            fl.name, cin, cout, (kh, kw), wfmt, out_format, codes, b.astype(np.int64),
            stride=fl.stride, padding=fl.padding, relu=fl.relu, inputs=fl.inputs,
            scale=m, scale_format=sfmt,
        )  # fmt: skip
    out_f, in_f = fl.weight.shape
    return Linear(
        fl.name, in_f, out_f, wfmt, out_format, codes, b.astype(np.int64), relu=fl.relu,
        inputs=fl.inputs, scale=m, scale_format=sfmt,
    )  # fmt: skip
