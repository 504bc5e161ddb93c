"""Incremental Network Quantization (Zhou et al., ICLR 2017) on a FloatNet.

Per layer, the weights are partitioned by magnitude (largest first, or at random); at each
accumulated portion (default 50%, 75%, 87.5%, 100%) the newly chosen part is quantised to
its power of two and frozen, and the rest is retrained. The formats (n1 = emax) are fixed
per layer once, from the pretrained weights. Retraining runs in float64 on one thread with
the free parameters snapped to a grid after every step (:mod:`hwgen.reproducible`), so
every machine gets the same weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from hwgen.errors import HwgenError, RetrainDiverged
from hwgen.frontend.graph import FAdd, FConv2d, FLinear, FloatNet
from hwgen.ir import Pow2
from hwgen.quant.weights import dequantize, quantize_pow2
from hwgen.reproducible import one_thread, snap_

LR_CHAIN = 0.01
LR_RESIDUAL = 3e-4


@dataclass(frozen=True)
class InqOptions:
    """Retraining settings; the defaults are tuned on the digits examples (bench/accuracy.py).

    ``lr`` None is 0.01 on a chain and 3e-4 on a network with add layers: on ``digits-res``
    (folded BatchNorm in both branches, logits up to about 17) SGD at 0.01 diverges and 1e-3
    loses half the accuracy at 3 bits; 3e-4 keeps INQ 5-bit and 4-bit within 0.5 points of
    float for seeds 0-2.

    The retraining loss is cross-entropy plus ``distill`` × the mean squared distance to the
    pretrained model's logits, on training images shifted at random by up to ``shift``
    pixels: a model that already fits its training set gives the labels alone almost no
    gradient, while the pretrained logits on new views still say what to restore.
    """

    portions: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)
    epochs: int = 4
    lr: float | None = None  # None: LR_CHAIN or LR_RESIDUAL
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adam
    batch_size: int = 32
    seed: int = 0
    partition: str = "magnitude"  # magnitude | random
    distill: float = 1.0  # weight of the logit-matching term (0: labels only)
    shift: int = 1  # random translation of training images by up to this many pixels

    def __post_init__(self) -> None:
        p = self.portions
        if not p or p[0] <= 0 or p[-1] != 1.0 or any(b <= a for a, b in pairwise(p)):
            raise HwgenError(f"INQ portions must increase and end at 1.0, not {list(p)}")
        if self.lr is not None and not self.lr > 0:
            raise HwgenError(f"INQ learning rate must be positive, not {self.lr}")
        if self.epochs < 0:
            raise HwgenError(f"INQ epochs must be >= 0, not {self.epochs}")
        if self.optimizer not in ("sgd", "adam"):
            raise HwgenError(f"INQ optimizer must be sgd or adam, not {self.optimizer!r}")
        if self.partition not in ("magnitude", "random"):
            raise HwgenError(f"INQ partition must be magnitude or random, not {self.partition!r}")


class FloatModule(nn.Module):
    """A float network as a trainable module: the conv/linear layers are ``nn.Conv2d`` /
    ``nn.Linear`` modules (in layer order), every other layer runs as in the float graph
    (``FloatNet.layer_forward``: adds, pools, subsample-pad, Flatten in H, W, C order).
    ``forward`` walks the DAG and returns the last layer's output."""

    def __init__(self, fnet: FloatNet) -> None:
        super().__init__()
        self.fnet = fnet
        self.macs = nn.ModuleList()
        self.index: dict[str, int] = {}  # layer name -> position in ``macs``
        for fl in fnet.layers:
            if isinstance(fl, (FConv2d, FLinear)):
                if isinstance(fl, FConv2d):
                    cout, cin, kh, kw = fl.weight.shape
                    m: nn.Conv2d | nn.Linear = nn.Conv2d(cin, cout, (kh, kw), fl.stride, fl.padding)
                else:
                    m = nn.Linear(fl.weight.shape[1], fl.weight.shape[0])
                with torch.no_grad():
                    m.weight.copy_(torch.as_tensor(fl.weight))
                    m.bias.copy_(torch.as_tensor(fl.bias))
                self.index[fl.name] = len(self.macs)
                self.macs.append(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = {"input": x}
        for fl in self.fnet.layers:
            xs = [acts[i] for i in fl.inputs]
            if isinstance(fl, (FConv2d, FLinear)):
                y = self.macs[self.index[fl.name]](xs[0])
                acts[fl.name] = torch.relu(y) if fl.relu else y
            else:
                acts[fl.name] = self.fnet.layer_forward(fl, *xs)
        return acts[self.fnet.layers[-1].name]


def with_weights(fnet: FloatNet, params: dict[str, tuple[np.ndarray, np.ndarray]]) -> FloatNet:
    """``fnet`` with new (weight, bias) arrays for the named conv/linear layers."""
    layers = tuple(
        replace(fl, weight=params[fl.name][0], bias=params[fl.name][1]) if fl.name in params else fl
        for fl in fnet.layers
    )
    return replace(fnet, layers=layers)


def select_to_freeze(
    w: np.ndarray, frozen: np.ndarray, count: int, partition: str, rng: np.random.Generator
) -> np.ndarray:
    """Flat indices of ``count`` more weights to freeze among those not frozen yet."""
    free = np.flatnonzero(~frozen)
    if partition == "random":
        return rng.permutation(free)[:count]
    order = np.argsort(-np.abs(w.ravel()[free]), kind="stable")  # largest first
    return free[order[:count]]


def inq(
    fnet: FloatNet,
    formats: dict[str, Pow2],
    train: tuple[np.ndarray, np.ndarray],
    options: InqOptions = InqOptions(),
    *,
    progress: bool = True,
) -> tuple[FloatNet, dict[str, np.ndarray]]:
    """Run INQ; returns the net with every conv/linear weight on its power-of-two grid.

    Also returns each layer's float weights just before the last quantisation step (the
    retrained ones, for histograms). Deterministic for a given ``options.seed``.
    """
    x, y = (np.asarray(a) for a in train)
    if x.ndim < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise HwgenError(f"INQ training data: {x.shape[0]} images but labels of shape {y.shape}")
    if options.lr is None:
        residual = any(isinstance(fl, FAdd) for fl in fnet.layers)
        options = replace(options, lr=LR_RESIDUAL if residual else LR_CHAIN)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    module = FloatModule(fnet).double()
    macs = {n: module.macs[i] for n, i in module.index.items()}
    frozen = {n: np.zeros(m.weight.shape, bool) for n, m in macs.items()}
    xt = torch.as_tensor(x, dtype=torch.float64)
    teacher = copy.deepcopy(module).eval()  # the pretrained model: the target of distillation
    yt = torch.as_tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(options.seed)
    last_float: dict[str, np.ndarray] = {}
    with one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("INQ retraining", total=len(options.portions) * options.epochs)
        for portion in options.portions:
            for n, m in macs.items():
                w = m.weight.detach().double().numpy()
                if portion == 1.0:
                    last_float[n] = w.copy()
                target = round(portion * w.size)
                new = select_to_freeze(
                    w, frozen[n], target - int(frozen[n].sum()), options.partition, rng
                )
                frozen[n].flat[new] = True
                q = dequantize(quantize_pow2(w, formats[n]), formats[n])
                w = np.where(frozen[n], q, w)
                with torch.no_grad():
                    m.weight.copy_(torch.as_tensor(w))
            # after the last step only the biases are free: they still adapt
            retrain_free(
                    module, macs, frozen, (xt, yt, teacher), options, gen,
                    lambda: bar.advance(task),
                )  # fmt: skip
    params = {}
    for n, m in macs.items():
        w = m.weight.detach().double().numpy()
        wq = dequantize(quantize_pow2(w, formats[n]), formats[n])
        params[n] = (wq, m.bias.detach().double().numpy())
    return with_weights(fnet, params), last_float


def shifted(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by a random (dy, dx) in [-k, k]**2, zeros shifted in (one gather)."""
    n, c, h, w = x.shape
    pad = F.pad(x, (k, k, k, k))
    d = torch.randint(0, 2 * k + 1, (n, 2), generator=gen)
    rows = (d[:, 0, None] + torch.arange(h))[:, None, :, None]
    cols = (d[:, 1, None] + torch.arange(w))[:, None, None, :]
    return pad[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


def batch(x: torch.Tensor, idx: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """The training images ``x[idx]``, images moved by up to ``shift`` pixels (:func:`shifted`)."""
    xb = x[idx]
    return shifted(xb, shift, gen) if shift and xb.ndim == 4 else xb


def retrain_loss(
    out: torch.Tensor,
    labels: torch.Tensor,
    teacher: nn.Module,
    xb: torch.Tensor,
    distill: float,
    what: str,
    lr: float | None,
) -> torch.Tensor:
    """Cross-entropy plus ``distill`` x the squared distance to the pretrained model's logits
    on the batch ``xb``; one line naming ``what`` if the loss diverged."""
    loss = F.cross_entropy(out, labels)
    if distill:
        with torch.no_grad():
            target = teacher(xb)
        loss = loss + distill * F.mse_loss(out, target)
    if not torch.isfinite(loss):
        raise RetrainDiverged(
            f"{what} diverged (loss {loss.item()}) at learning rate {lr}; use a smaller one"
        )
    return loss


def retrain_free(
    module: FloatModule,
    macs: dict[str, nn.Conv2d | nn.Linear],
    frozen: dict[str, np.ndarray],
    data: tuple[torch.Tensor, torch.Tensor, nn.Module],
    options: InqOptions,
    gen: torch.Generator,
    tick: Callable[[], None],
) -> None:
    """Train the free weights (and biases) while the frozen ones keep their values (INQ's
    powers of two; pruning's and low rank's zeros and factors reuse it)."""
    x, y, teacher = data
    masks = {n: torch.as_tensor(~frozen[n], dtype=torch.float64) for n in macs}
    fixed = {n: m.weight.detach().clone() for n, m in macs.items()}
    params = list(module.parameters())
    if options.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=options.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=options.lr)
    module.train()
    for _ in range(options.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], options.batch_size):
            idx = order[i : i + options.batch_size]
            opt.zero_grad()
            xb = batch(x, idx, options.shift, gen)
            out = module(xb)
            loss = retrain_loss(
                out, y[idx], teacher, xb, options.distill, "INQ retraining", options.lr
            )
            loss.backward()
            for n, m in macs.items():
                m.weight.grad.mul_(masks[n])
            opt.step()
            snap_(module)
            with torch.no_grad():  # momentum must not move a frozen weight either
                for n, m in macs.items():
                    m.weight.copy_(torch.where(masks[n].bool(), m.weight, fixed[n]))
        tick()
    module.eval()
