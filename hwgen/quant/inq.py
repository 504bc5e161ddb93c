"""Incremental Network Quantization (Zhou et al., ICLR 2017) on a FloatNet.

Per layer, the weights are partitioned by magnitude (largest first, or at random); at each
accumulated portion (default 50%, 75%, 87.5%, 100%) the newly chosen part is quantised to
its power of two and frozen, and the rest is retrained. The formats (n1 = emax) are fixed
per layer once, from the pretrained weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from hwgen.errors import HwgenError
from hwgen.frontend.graph import (
    FAvgPool2d,
    FConv2d,
    FFlatten,
    FLinear,
    FloatNet,
    FMaxPool2d,
    FReLU,
)
from hwgen.ir import Pow2
from hwgen.quant.weights import dequantize, quantize_pow2


@dataclass(frozen=True)
class InqOptions:
    """Retraining settings; the defaults are tuned on the digits example (bench/accuracy.py).

    The retraining loss is cross-entropy plus ``distill`` × the mean squared distance to the
    pretrained model's logits, on training images shifted at random by up to ``shift``
    pixels: a model that already fits its training set gives the labels alone almost no
    gradient, while the pretrained logits on new views still say what to restore.
    """

    portions: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)
    epochs: int = 4
    lr: float = 0.01
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
        if self.epochs < 0:
            raise HwgenError(f"INQ epochs must be >= 0, not {self.epochs}")
        if self.optimizer not in ("sgd", "adam"):
            raise HwgenError(f"INQ optimizer must be sgd or adam, not {self.optimizer!r}")
        if self.partition not in ("magnitude", "random"):
            raise HwgenError(f"INQ partition must be magnitude or random, not {self.partition!r}")


class _HwcFlatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) if x.ndim == 4 else x


def to_torch(fnet: FloatNet) -> nn.Sequential:
    """A trainable float32 module with the layers of ``fnet`` (Flatten in H, W, C order)."""
    mods: list[nn.Module] = []
    for fl in fnet.layers:
        if isinstance(fl, (FConv2d, FLinear)):
            if isinstance(fl, FConv2d):
                cout, cin, kh, kw = fl.weight.shape
                m: nn.Module = nn.Conv2d(cin, cout, (kh, kw), fl.stride, fl.padding)
            else:
                m = nn.Linear(fl.weight.shape[1], fl.weight.shape[0])
            with torch.no_grad():
                m.weight.copy_(torch.as_tensor(fl.weight))
                m.bias.copy_(torch.as_tensor(fl.bias))
            mods.append(m)
            if fl.relu:
                mods.append(nn.ReLU())
        elif isinstance(fl, FReLU):
            mods.append(nn.ReLU())
        elif isinstance(fl, FMaxPool2d):
            mods.append(nn.MaxPool2d(fl.kernel, fl.stride))
        elif isinstance(fl, FAvgPool2d):
            mods.append(nn.AvgPool2d(fl.kernel, fl.stride))
        elif isinstance(fl, FFlatten):
            mods.append(_HwcFlatten())
    return nn.Sequential(*mods)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small batches train faster on one thread: syncing costs more than it gains (25x on 2
    busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mac_modules(module: nn.Sequential) -> list[nn.Conv2d | nn.Linear]:
    return [m for m in module if isinstance(m, (nn.Conv2d, nn.Linear))]


def with_weights(fnet: FloatNet, params: dict[str, tuple[np.ndarray, np.ndarray]]) -> FloatNet:
    """``fnet`` with new (weight, bias) arrays for the named conv/linear layers."""
    layers = tuple(
        replace(fl, weight=params[fl.name][0], bias=params[fl.name][1]) if fl.name in params else fl
        for fl in fnet.layers
    )
    return replace(fnet, layers=layers)


def _select(
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
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    module = to_torch(fnet)
    names = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    macs = dict(zip(names, _mac_modules(module), strict=True))
    frozen = {n: np.zeros(m.weight.shape, bool) for n, m in macs.items()}
    xt = torch.as_tensor(x, dtype=torch.float32)
    teacher = copy.deepcopy(module).eval()  # the pretrained model: the target of distillation
    yt = torch.as_tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(options.seed)
    last_float: dict[str, np.ndarray] = {}
    with _one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("INQ retraining", total=len(options.portions) * options.epochs)
        for portion in options.portions:
            for n, m in macs.items():
                w = m.weight.detach().double().numpy()
                if portion == 1.0:
                    last_float[n] = w.copy()
                target = round(portion * w.size)
                new = _select(w, frozen[n], target - int(frozen[n].sum()), options.partition, rng)
                frozen[n].flat[new] = True
                q = dequantize(quantize_pow2(w, formats[n]), formats[n])
                w = np.where(frozen[n], q, w)
                with torch.no_grad():
                    m.weight.copy_(torch.as_tensor(w))
            # after the last step only the biases are free: they still adapt
            _retrain(
                    module, macs, frozen, (xt, yt, teacher), options, gen,
                    lambda: bar.advance(task),
                )  # fmt: skip
    params = {}
    for n, m in macs.items():
        w = m.weight.detach().double().numpy()
        wq = dequantize(quantize_pow2(w, formats[n]), formats[n])
        params[n] = (wq, m.bias.detach().double().numpy())
    return with_weights(fnet, params), last_float


def _shift(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by a random (dy, dx) in [-k, k]**2, zeros shifted in."""
    n, _, h, w = x.shape
    pad = F.pad(x, (k, k, k, k))
    d = torch.randint(0, 2 * k + 1, (n, 2), generator=gen)
    return torch.stack([pad[i, :, d[i, 0] : d[i, 0] + h, d[i, 1] : d[i, 1] + w] for i in range(n)])


def _retrain(
    module: nn.Sequential,
    macs: dict[str, nn.Conv2d | nn.Linear],
    frozen: dict[str, np.ndarray],
    data: tuple[torch.Tensor, torch.Tensor, nn.Module],
    options: InqOptions,
    gen: torch.Generator,
    tick: Callable[[], None],
) -> None:
    """Train the free weights (and biases) while the frozen ones keep their powers of two."""
    x, y, teacher = data
    masks = {n: torch.as_tensor(~frozen[n], dtype=torch.float32) for n in macs}
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
            xb = x[idx]
            if options.shift and xb.ndim == 4:
                xb = _shift(xb, options.shift, gen)
            out = module(xb)
            loss = F.cross_entropy(out, y[idx])
            if options.distill:
                with torch.no_grad():
                    target = teacher(xb)
                loss = loss + options.distill * F.mse_loss(out, target)
            loss.backward()
            for n, m in macs.items():
                m.weight.grad.mul_(masks[n])
            opt.step()
            with torch.no_grad():  # momentum must not move a frozen weight either
                for n, m in macs.items():
                    m.weight.copy_(torch.where(masks[n].bool(), m.weight, fixed[n]))
        tick()
    module.eval()
