"""Learned codebook weights whose entries are shift-add constants: DQC and TTQ.

A layer's codebook is a sorted tuple of distinct integer ``entries`` at a fraction length
``frac`` (entry ``e`` is the real value ``e * 2**-frac``) and one ``uint8`` index per weight.
The hardware multiplies by an entry without a multiplier, so every entry is 0, ``±2**k`` (a
shift) or ``±2**j ± 2**k`` (two shifts and an add): its canonical signed-digit form has at
most two nonzero digits. ``kmax`` bounds the magnitude, ``|e| <= 2**kmax``, so every shift
is at most ``kmax``; the default 6 keeps entries in 8-bit two's complement.

- **DQC** (dynamic quantization coding): ``2**bits`` entries per layer, with or without a
  pinned zero, from an importance-weighted Lloyd fit; before every retraining epoch each
  entry moves to the weighted mean of the weights assigned to it, projected to the nearest
  shift-add value, and the weights are re-assigned to their nearest entry.
- **TTQ** (trained ternary quantization, Zhu et al., ICLR 2017): ``{-Wn, 0, +Wp}`` with
  learned ``Wp, Wn`` and threshold ``t * max|w|``; at export both are projected to the
  nearest shift-add values at one frac.

Retraining is INQ's (:mod:`hwgen.quant.inq`): float64 on one thread, parameters snapped
after every step, cross-entropy plus distillation on shifted images; the forward pass
always uses the quantised weights (straight-through to the float "latent" weights).

Pruned weights (issue #12; ``masks`` of :func:`hwgen.quant.prune.prune`, True: kept) stay
exactly at the zero entry (DQC's pinned 0, TTQ's 0) in every forward pass and in the
codebook indices; their latent weights are held at 0 (the forward pass multiplies them by
the mask, so their gradient is 0 and Adam never moves them), and DQC fits its codebook to
the kept weights only. DQC without a zero entry refuses masks.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.func import functional_call

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FConv2d, FLinear, FloatNet
from hwgen.hw.cmvm import csd
from hwgen.ir import WEIGHT_FRAC_RANGE
from hwgen.quant.inq import FloatModule, InqOptions, batch, retrain_loss, with_weights
from hwgen.quant.prune import kept_masks
from hwgen.reproducible import one_thread, snap_

KMAX = 6  # |entry| <= 64: 8-bit two's complement
KMAX_LIMIT = 30  # entries and their sums stay far inside int64 and exact in float64
DQC_BITS = (1, 8)  # 2**bits entries, indices in uint8
LLOYD_ITERS = 50
TTQ_THRESHOLD = 0.05  # the paper's t


# ---------------------------------------------------------------- the entry constraint


def shift_add_terms(e: int) -> list[tuple[int, int]]:
    """``e`` as its non-adjacent form (minimal canonical signed digits): ``[(sign, k), ...]``
    with ``e == Σ sign * 2**k``, highest ``k`` first; ``[]`` for 0.

    The non-adjacent form has the fewest nonzero digits of any signed-binary form, so an
    entry with more than two is no ``±2**j ± 2**k`` and is refused.
    """
    e = int(e)
    terms = [(-1 if negative else 1, k) for k, negative in csd(e)]
    if len(terms) > 2:
        raise HwgenError(
            f"codebook entry {e} is not 0, ±2^k or ±2^j ± 2^k (it needs {len(terms)} "
            "signed powers of two)"
        )
    return terms[::-1]


@functools.cache
def feasible(kmax: int) -> np.ndarray:
    """Every shift-add integer ``e`` with ``|e| <= 2**kmax``, sorted (int64)."""
    if not 0 <= kmax <= KMAX_LIMIT:
        raise HwgenError(f"codebook kmax must be in [0, {KMAX_LIMIT}], not {kmax}")
    p = np.array([0] + [s << k for k in range(kmax + 1) for s in (1, -1)], np.int64)
    sums = np.unique((p[:, None] + p[None, :]).ravel())  # includes 0 + p: single terms
    out = sums[np.abs(sums) <= 1 << kmax]
    out.setflags(write=False)
    return out


def _nearest_index(grid: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Index into sorted ints ``grid`` of the value nearest each float ``xs``, exactly.

    Ties go to the smaller magnitude (between ``±a``: to ``+a``). ``2 * xs`` and the sum of
    two grid neighbours are exact in float64, so the midpoint test has no rounding.
    """
    xs = np.asarray(xs, np.float64)
    if len(grid) == 1:
        return np.zeros(xs.shape, np.int64)
    hi = np.clip(np.searchsorted(grid, xs), 1, len(grid) - 1)
    lo = hi - 1
    a, b = grid[lo].astype(np.float64), grid[hi].astype(np.float64)
    twice, mid = 2.0 * xs, a + b
    to_lo = (twice < mid) | ((twice == mid) & (np.abs(a) < np.abs(b)))
    return np.where(to_lo, lo, hi)


def nearest_shift_add(x: np.ndarray | float, frac: int, kmax: int = KMAX) -> np.ndarray:
    """The shift-add integers ``e`` (``|e| <= 2**kmax``) whose ``e * 2**-frac`` is nearest
    each real ``x``; ties go to the smaller magnitude (between ``±a``: ``+a``)."""
    grid = feasible(kmax)
    return grid[_nearest_index(grid, np.asarray(x, np.float64) * 2.0**frac)]


def entry_frac(m: float, kmax: int = KMAX) -> int:
    """The frac whose top entry ``2**kmax`` is the smallest power of two ``>= m``: the
    largest magnitude ``m`` then uses all ``kmax + 1`` magnitude bits without saturating."""
    if not np.isfinite(m) or m < 0:
        raise HwgenError(f"codebook scale must be a finite magnitude, not {m}")
    if m == 0:
        return kmax
    mant, k = np.frexp(m)
    f = kmax - (int(k) - 1 if mant == 0.5 else int(k))
    if not WEIGHT_FRAC_RANGE[0] <= f <= WEIGHT_FRAC_RANGE[1]:
        raise HwgenError(
            f"codebook frac {f} for magnitude {m} is outside {list(WEIGHT_FRAC_RANGE)}"
        )
    return f


# ---------------------------------------------------------------- a layer's codebook


@dataclass(frozen=True, eq=False)
class Codebook:
    """One layer's codebook: integer weights ``entries[indices]``, real ``· 2**-frac``."""

    entries: tuple[int, ...]
    frac: int
    indices: np.ndarray = field(repr=False)  # uint8, the weight's shape

    def __post_init__(self) -> None:
        e = self.entries
        if not e or len(e) > 256 or any(b <= a for a, b in pairwise(e)):
            raise HwgenError(f"codebook entries must be 1 to 256 increasing ints, not {list(e)}")
        for v in e:
            shift_add_terms(v)
        if not WEIGHT_FRAC_RANGE[0] <= self.frac <= WEIGHT_FRAC_RANGE[1]:
            raise HwgenError(f"codebook frac {self.frac} is outside {list(WEIGHT_FRAC_RANGE)}")
        idx = self.indices
        if idx.dtype != np.uint8 or (idx.size and int(idx.max()) >= len(e)):
            raise HwgenError(f"codebook indices must be uint8 below {len(e)}")

    @property
    def integers(self) -> np.ndarray:
        """The integer weights ``entries[indices]`` (int64)."""
        return np.asarray(self.entries, np.int64)[self.indices]

    @property
    def weights(self) -> np.ndarray:
        """The real weights ``entries[indices] * 2**-frac`` (float64, exact)."""
        return self.integers * 2.0**-self.frac


def assign(w: np.ndarray, entries: tuple[int, ...], frac: int) -> np.ndarray:
    """Each weight's nearest entry, as ``uint8`` indices (ties as :func:`nearest_shift_add`)."""
    grid = np.asarray(entries, np.int64)
    return _nearest_index(grid, np.asarray(w, np.float64) * 2.0**frac).astype(np.uint8)


def importance(w: np.ndarray, power: float) -> np.ndarray:
    """DQC's per-weight importance ``|w|**power``."""
    return np.abs(np.asarray(w, np.float64)) ** power


def weighted_error(w: np.ndarray, entries: tuple[int, ...], frac: int, power: float) -> float:
    """``Σ |w|**power * (w - q)**2`` with ``q`` each weight's nearest entry."""
    w = np.asarray(w, np.float64)
    q = np.asarray(entries, np.int64)[assign(w, entries, frac)] * 2.0**-frac
    return float(np.sum(importance(w, power) * (w - q) ** 2))


# ---------------------------------------------------------------- DQC's codebook fit


def _grid(kmax: int, zero: bool, count: int) -> np.ndarray:
    """The values a codebook of ``count`` entries may take (no 0 unless pinned)."""
    grid = feasible(kmax) if zero else feasible(kmax)[feasible(kmax) != 0]
    if len(grid) < count:
        raise HwgenError(f"kmax {kmax} has {len(grid)} shift-add values, fewer than {count}")
    return grid


def _refill(
    w: np.ndarray, omega: np.ndarray, entries: set[int], count: int, grid: np.ndarray, frac: int
) -> set[int]:
    """Add feasible values until there are ``count`` entries, each time the one that most
    reduces the importance-weighted error (first in ``grid`` order on a tie)."""
    new = omega * (w[None, :] - grid[:, None] * 2.0**-frac) ** 2  # candidate x weight
    while len(entries) < count:
        cur = np.asarray(sorted(entries), np.int64)
        if cur.size:
            err = omega * (w - cur[assign(w, tuple(cur), frac)] * 2.0**-frac) ** 2
            gain = np.sum(np.maximum(err - new, 0.0), axis=1)
        else:  # the first entry: the one with the least error on its own
            gain = -np.sum(new, axis=1)
        gain[np.isin(grid, cur)] = -np.inf
        entries.add(int(grid[int(np.argmax(gain))]))
    return entries


def refit(
    w: np.ndarray,
    entries: tuple[int, ...],
    frac: int,
    *,
    zero: bool,
    kmax: int = KMAX,
    power: float = 1.0,
) -> tuple[int, ...]:
    """One DQC codebook update (a Lloyd step on the shift-add grid).

    Each entry (but a pinned 0 when ``zero``) moves to the ``|w|**power``-weighted mean of
    the weights nearest it, projected to the nearest feasible value: for a fixed assignment
    that is the best feasible value of its cluster (the weighted error is the within-cluster
    part plus ``Σω · (e - mean)**2``), so the weighted error never grows. Entries that
    collapse onto one value are merged, entries left without weight are dropped, and the
    codebook is refilled to its size greedily (:func:`_refill`).
    """
    if (0 in entries) != zero:
        raise HwgenError(f"DQC codebook {list(entries)} must {'' if zero else 'not '}hold 0")
    w = np.asarray(w, np.float64).ravel()
    grid = _grid(kmax, zero, len(entries))
    omega = importance(w, power)
    idx = assign(w, entries, frac)
    sums = np.bincount(idx, omega, len(entries))
    means = np.bincount(idx, omega * w, len(entries)) / np.where(sums > 0, sums, 1.0)
    keep = {0} if zero else set()
    for j, e in enumerate(entries):
        if sums[j] > 0 and not (zero and e == 0):
            keep.add(int(grid[_nearest_index(grid, means[j] * 2.0**frac)]))
    return tuple(sorted(_refill(w, omega, keep, len(entries), grid, frac)))


def init_codebook(
    w: np.ndarray, bits: int, frac: int, *, zero: bool, kmax: int = KMAX, power: float = 1.0
) -> tuple[int, ...]:
    """DQC's initial ``2**bits`` entries: the free ones (all, or all but a pinned 0) at
    evenly spaced quantiles of the ``|w|**power``-weighted distribution of ``w``, then
    :func:`refit` until the codebook stops changing (at most ``LLOYD_ITERS`` times)."""
    if not DQC_BITS[0] <= bits <= DQC_BITS[1]:
        raise HwgenError(f"DQC bits must be in {list(DQC_BITS)}, not {bits}")
    w = np.asarray(w, np.float64).ravel()
    count = 1 << bits
    grid = _grid(kmax, zero, count)
    omega = importance(w, power)
    order = np.argsort(w, kind="stable")
    cdf = np.cumsum(omega[order])
    free = count - 1 if zero else count
    entries = {0} if zero else set()
    if cdf[-1] > 0:
        at = np.searchsorted(cdf, (np.arange(free) + 0.5) / free * cdf[-1])
        qs = w[order][np.minimum(at, w.size - 1)]
        entries |= {int(v) for v in grid[_nearest_index(grid, qs * 2.0**frac)]}
    cb = tuple(sorted(_refill(w, omega, entries, count, grid, frac)))
    for _ in range(LLOYD_ITERS):
        new = refit(w, cb, frac, zero=zero, kmax=kmax, power=power)
        if new == cb:
            break
        cb = new
    return cb


# ---------------------------------------------------------------- retraining


@dataclass(frozen=True)
class CodebookOptions:
    """Retraining settings for DQC and TTQ.

    ``epochs`` defaults to INQ's whole budget (its epochs per step × its steps), the batch,
    distillation and shifts to INQ's (:class:`hwgen.quant.inq.InqOptions`). Unlike INQ,
    every weight is quantised from the first step, and INQ's SGD at 0.01 diverges on digits
    (DQC 3-bit: biases past 100 by epoch 2; TTQ: ``Wp`` negative, as its gradient sums over
    a whole layer). Adam at 1e-3 is stable for both; on digits 3e-4 and 1e-4 were no better
    for 3-bit DQC or TTQ, and 3e-3 was within a few test images. The rate falls to 0 on a
    cosine over all steps, as the binary/ternary retraining does (:mod:`hwgen.quant.binarize`);
    golden-model means over seeds 0-2, constant -> cosine: digits DQC 3-bit 97.78 -> 97.59,
    5-bit 98.15 -> 98.24, TTQ 95.28 -> 96.57; digits-res DQC 3-bit 96.94 -> 97.87, 5-bit
    98.24 -> 98.24, TTQ 88.52 -> 81.94 (TTQ's ternary conv1 of 72 weights flips a few
    weights per epoch; its training accuracy swung between 0.71 and 0.92 in the last 8).

    ``power``: DQC's importance ``|w|**power``; 1 pulls each entry toward its cluster's
    larger weights without letting a single outlier own it (2 would weigh the largest weight
    of a 3-bit cluster several times its neighbours). Measured on digits (3 bits with zero,
    seeds 0-2, golden model): retrained means 97.59% (power 0), 97.78% (1), 97.78% (2), less
    than one test image apart.

    ``threshold``: TTQ's ``t``. ``zero``: DQC's codebook has a pinned 0 entry (else all
    ``2**bits`` entries are learned, none of them 0 unless training puts one there).
    """

    epochs: int = InqOptions().epochs * len(InqOptions().portions)
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    batch_size: int = 32
    seed: int = 0
    distill: float = 1.0
    shift: int = 1
    kmax: int = KMAX
    power: float = 1.0
    threshold: float = TTQ_THRESHOLD
    zero: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise HwgenError(f"codebook epochs must be >= 0, not {self.epochs}")
        if not self.lr > 0:
            raise HwgenError(f"codebook learning rate must be positive, not {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise HwgenError(f"codebook optimizer must be sgd or adam, not {self.optimizer!r}")
        if self.batch_size < 1:
            raise HwgenError(f"codebook batch size must be >= 1, not {self.batch_size}")
        if not 0 <= self.kmax <= KMAX_LIMIT:
            raise HwgenError(f"codebook kmax must be in [0, {KMAX_LIMIT}], not {self.kmax}")
        if not 0 <= self.power <= 4:
            raise HwgenError(f"DQC importance power must be in [0, 4], not {self.power}")
        if not 0 < self.threshold < 1:
            raise HwgenError(f"TTQ threshold must be in (0, 1), not {self.threshold}")


class _Ste(torch.autograd.Function):
    """Forward the quantised weights, pass the gradient to the latent ones unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return q

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


class TtqFn(torch.autograd.Function):
    """TTQ's ternary weights ``Wp·[w > Δ] - Wn·[w < -Δ]`` with the paper's gradients.

    ``∂L/∂Wp = Σ_{w>Δ} g``, ``∂L/∂Wn = -Σ_{w<-Δ} g`` (eq. 7; the minus is the chain rule of
    ``-Wn``, which the paper's eq. 7 leaves out) and the scaled straight-through gradient of
    eq. 8: ``∂L/∂w = Wp·g`` above Δ, ``g`` within, ``Wn·g`` below ``-Δ``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        return wp * pos - wn * neg

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        pos, neg, wp, wn = ctx.saved_tensors
        gw = torch.where(pos, wp * g, torch.where(neg, wn * g, g))
        return gw, (g * pos).sum(), -(g * neg).sum(), None


def _train(
    module: FloatModule,
    effective: Callable[[str, torch.Tensor], torch.Tensor],
    extra: nn.Module | None,
    data: tuple[torch.Tensor, torch.Tensor, nn.Module],
    options: CodebookOptions,
    before_epoch: Callable[[], None],
    tick: Callable[[], None],
) -> None:
    """INQ's retraining loop with ``effective(layer, latent)`` as each conv/linear weight."""
    x, y, teacher = data
    gen = torch.Generator().manual_seed(options.seed)
    params = list(module.parameters()) + (list(extra.parameters()) if extra else [])
    lr = options.lr
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=lr, momentum=0.9)
        if options.optimizer == "sgd"
        else torch.optim.Adam(params, lr=lr)
    )
    steps = max(1, options.epochs * -(-x.shape[0] // options.batch_size))
    cosine = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 + 0.5 * math.cos(math.pi * k / steps)
    )
    names = {n: f"macs.{i}.weight" for n, i in module.index.items()}
    module.train()
    for _ in range(options.epochs):
        before_epoch()
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], options.batch_size):
            idx = order[i : i + options.batch_size]
            opt.zero_grad()
            xb = batch(x, idx, options.shift, gen)
            weights = {p: effective(n, module.get_parameter(p)) for n, p in names.items()}
            out = functional_call(module, weights, (xb,))
            loss = retrain_loss(
                out, y[idx], teacher, xb, options.distill, "codebook retraining", lr
            )
            loss.backward()
            opt.step()
            cosine.step()
            snap_(module)
            if extra is not None:
                snap_(extra)
        tick()
    module.eval()


def _setup(
    fnet: FloatNet,
    train: tuple[np.ndarray, np.ndarray],
    options: CodebookOptions,
    kept: Mapping[str, np.ndarray | None],
) -> tuple[FloatModule, tuple[torch.Tensor, torch.Tensor, nn.Module]]:
    x, y = (np.asarray(a) for a in train)
    if x.ndim < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise HwgenError(
            f"codebook training data: {x.shape[0]} images but labels of shape {y.shape}"
        )
    torch.manual_seed(options.seed)
    module = FloatModule(fnet).double()
    teacher = copy.deepcopy(module).eval()  # the pretrained model: the target of distillation
    with torch.no_grad():
        for n, k in kept.items():
            if k is not None:
                module.macs[module.index[n]].weight.mul_(torch.as_tensor(k))
    xt = torch.as_tensor(x, dtype=torch.float64)
    return module, (xt, torch.as_tensor(y, dtype=torch.int64), teacher)


def _mac_names(fnet: FloatNet) -> list[str]:
    return [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]


def _masked(w: torch.Tensor, kept: np.ndarray | None) -> torch.Tensor:
    """The latent weights with the pruned ones 0, their gradient 0 (``kept`` None: all)."""
    return w if kept is None else w * torch.as_tensor(kept, dtype=w.dtype)


def _export(
    fnet: FloatNet, module: FloatModule, books: dict[str, Codebook]
) -> tuple[FloatNet, dict[str, Codebook]]:
    params = {
        n: (cb.weights, module.macs[module.index[n]].bias.detach().double().numpy().copy())
        for n, cb in books.items()
    }
    return with_weights(fnet, params), books


def dqc(
    fnet: FloatNet,
    bits: int | Mapping[str, int],
    train: tuple[np.ndarray, np.ndarray],
    *,
    zero: bool = True,
    options: CodebookOptions = CodebookOptions(),
    progress: bool = True,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[FloatNet, dict[str, Codebook]]:
    """Retrain ``fnet`` with a ``2**bits``-entry shift-add codebook per conv/linear layer.

    ``bits``: one count for every layer, or one per layer name. ``zero``: one entry is a
    pinned 0. Each layer's frac is fixed from its pretrained weights (:func:`entry_frac`).
    Before every epoch the codebook is refitted (:func:`init_codebook` first, then one
    :func:`refit` step) to the latent weights; the epoch then trains all latent weights and
    biases straight through (no freezing: the codebook, not the assignment, is what DQC
    settles). Returns the net with its weights exactly ``entries[indices] * 2**-frac`` and
    the codebooks (indices from the final latent weights, as in the last forward pass).
    ``masks`` (layer -> weight mask, True: kept; with ``zero`` only) keep the pruned
    weights at the zero entry (module docstring).
    """
    names = _mac_names(fnet)
    per = {n: bits for n in names} if isinstance(bits, int) else dict(bits)
    if sorted(per) != sorted(names):
        raise HwgenError(f"DQC bits name layers {sorted(per)}, the model has {sorted(names)}")
    kept = kept_masks(fnet, masks)
    if not zero and any(k is not None for k in kept.values()):
        raise HwgenError("DQC without a zero entry has no code for pruned weights: keep the 0")
    module, data = _setup(fnet, train, options, kept)
    latent = {n: module.macs[module.index[n]].weight for n in names}
    fracs = {n: entry_frac(float(latent[n].detach().abs().max()), options.kmax) for n in names}
    books: dict[str, tuple[int, ...]] = {}

    def update() -> None:
        for n in names:
            w = latent[n].detach().numpy()
            w = w if kept[n] is None else w[kept[n]]  # the pruned weights stay at 0
            kw = {"zero": zero, "kmax": options.kmax, "power": options.power}
            books[n] = (
                refit(w, books[n], fracs[n], **kw)
                if n in books
                else init_codebook(w, per[n], fracs[n], **kw)
            )

    def effective(n: str, w: torch.Tensor) -> torch.Tensor:
        w = _masked(w, kept[n])  # a pruned weight is 0: the zero entry
        grid = torch.as_tensor(np.asarray(books[n], np.float64) * 2.0 ** -fracs[n])
        q = grid[torch.as_tensor(assign(w.detach().numpy(), books[n], fracs[n]), dtype=torch.long)]
        return _Ste.apply(w, q)

    with one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("DQC retraining", total=options.epochs)
        if options.epochs == 0:
            update()
        _train(module, effective, None, data, options, update, lambda: bar.advance(task))
    out = {}
    for n in names:
        idx = assign(latent[n].detach().numpy(), books[n], fracs[n])
        if kept[n] is not None:
            idx = np.where(kept[n], idx, books[n].index(0)).astype(np.uint8)
        out[n] = Codebook(books[n], fracs[n], idx)
    return _export(fnet, module, out)


def ttq(
    fnet: FloatNet,
    train: tuple[np.ndarray, np.ndarray],
    *,
    options: CodebookOptions = CodebookOptions(),
    progress: bool = True,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[FloatNet, dict[str, Codebook]]:
    """Retrain ``fnet`` with TTQ ternary weights ``{-Wn, 0, +Wp}`` per conv/linear layer.

    As the paper: the latent weights ``w̃`` are the pretrained ones divided by their layer's
    ``m = max|w|``, and the threshold is ``Δ = t·max|w̃|`` of the current latent weights
    (t = ``options.threshold``). ``Wp`` / ``Wn`` are learned in the same normalised units
    (the layer uses ``m·Wp``, ``m·Wn``): they start as the mean of ``|w̃|`` above / below
    ``±Δ`` (the least-squares scales of that assignment) and train with the weights
    (:class:`TtqFn`). In real units Adam's steps of about ``lr`` are large against the scales
    of layers with small weights: on digits-res TTQ then ended at 77% test accuracy, 90%
    normalised (seed 0). At export ``m·Wp`` and ``m·Wn`` go to their nearest shift-add
    integers at the frac that gives the larger one the ``2**kmax`` range (:func:`entry_frac`);
    one that rounds to 0 merges with the zero entry. ``masks`` (layer -> weight mask, True:
    kept) keep the pruned weights at 0 (module docstring).
    """
    names = _mac_names(fnet)
    kept = kept_masks(fnet, masks)
    module, data = _setup(fnet, train, options, kept)
    latent = {n: module.macs[module.index[n]].weight for n in names}
    scales = nn.ParameterDict()
    norm: dict[str, float] = {}
    t = options.threshold
    with torch.no_grad():
        for n in names:
            w = latent[n]
            norm[n] = float(w.abs().max())
            if norm[n] == 0:
                raise HwgenError(f"layer {n}: all weights are 0, TTQ has no scale to learn")
            w.div_(norm[n])
            pos, neg = w > t, w < -t
            wp = w[pos].mean() if pos.any() else torch.ones((), dtype=w.dtype)
            wn = -w[neg].mean() if neg.any() else torch.ones((), dtype=w.dtype)
            scales[n] = nn.Parameter(torch.stack([wp, wn]))
        snap_(module)
        snap_(scales)

    def delta(w: torch.Tensor) -> torch.Tensor:
        return t * w.detach().abs().max()

    def effective(n: str, w: torch.Tensor) -> torch.Tensor:
        # a pruned weight is 0, within ±Δ (Δ > 0: the layer has a nonzero weight): code 0
        return norm[n] * TtqFn.apply(_masked(w, kept[n]), scales[n][0], scales[n][1], delta(w))

    with one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("TTQ retraining", total=options.epochs)
        _train(module, effective, scales, data, options, lambda: None, lambda: bar.advance(task))
    out = {}
    for n in names:
        wp, wn = (norm[n] * float(v) for v in scales[n].detach())
        if not (wp > 0 and wn > 0):
            raise HwgenError(
                f"layer {n}: TTQ scales Wp={wp:.4g}, Wn={wn:.4g} are not positive (training "
                f"diverged at learning rate {options.lr}; use a smaller one or adam)"
            )
        f = entry_frac(max(wp, wn), options.kmax)
        ep, en = (int(v) for v in nearest_shift_add(np.array([wp, wn]), f, options.kmax))
        entries = tuple(sorted({-en, 0, ep}))
        w = latent[n].detach()
        d = float(delta(w))
        code = np.where(w.numpy() > d, ep, np.where(w.numpy() < -d, -en, 0))
        code = code if kept[n] is None else np.where(kept[n], code, 0)
        indices = np.searchsorted(entries, code).astype(np.uint8)
        out[n] = Codebook(entries, f, indices)
    return _export(fnet, module, out)
