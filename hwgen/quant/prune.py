"""Magnitude pruning with retraining (Han et al., NIPS 2015), unstructured or in blocks.

A *block* is ``block`` consecutive input channels of one output channel at one kernel
position (kh, kw): the unit the folded engine consumes in one cycle with SIMD = ``block``.
For a dense layer the inputs are the flattened (H, W, C) vector (DESIGN §2; ``ir.Linear``),
so a block is ``block`` consecutive entries of it, i.e. consecutive channels of one pixel
after a Flatten. A last block of a row holds the ``Cin mod block`` channels left over.
``block`` None (or 1) is unstructured pruning: a block is one weight.

Blocks are ranked by their L2 norm (|w| for one weight: the paper's rule), smallest pruned
first. Pruning is gradual: with ``steps`` n the sparsity goes through the fractions
``1/2, 3/4, ..., 1 - 2**-(n-1), 1`` of each layer's target (INQ's portions; 45% -> 67.5% ->
90% for 90% in 3 steps), retraining after each step; a pruned block stays pruned (masks
only grow) and stays exactly 0.0, biases are free. Retraining is INQ's
(:func:`hwgen.quant.inq.retrain_free`): float64 on one thread, snapped to the reproducible grid,
distillation to the unpruned model.

Every layer gets the same target by default; ``first`` sets the first conv/linear layer's
(Han et al. prune it least: it has the fewest weights and sees the raw image) and
``sparsity`` may give each layer its own (0 keeps it dense). It matters on digits: conv1
(1 input channel, 72 weights, blocks of one weight) pruned too at 75% in blocks of 4 and 3
steps gave 96.1-96.4% float (seeds 0-2, float 98.06%), kept dense 97.2-98.3%; at 90%
59-78% against 87-93%. More steps help (digits, block 4, conv1 dense, seeds 0-2, then
:func:`masked_inq` 5-bit): at 75% 3 steps 96.85% mean, 4 steps 97.50%, 5 steps 97.78%
(97.22-98.33), 6 steps 97.87%; 5 is the default. More epochs per step did not help (8:
96.85%), nor a learning rate below INQ's 0.01.

Composition with a weight scheme: the schemes that round the given weights (``fixed``,
``pow2``, ``auto``) map 0.0 to 0. Every retrained scheme (``inq``, ``ternary`` and the
learned ones) updates the pruned weights like the others and so refills them (digits, 75%
in blocks of 4: ``quantize`` with scheme ``inq`` leaves conv2 23-25% and fc 25% of its
blocks zero) unless given the masks; binary codes (bits 1, bc, lab, amq) have no zero at
all. :func:`masked_inq` is INQ with the pruned weights frozen at 0 (its zero level) from
the start; the learned schemes with a zero code take the masks too (twn, lat:
:func:`hwgen.quant.binarize.binarize`; ttq, dqc with its zero entry:
:mod:`hwgen.quant.codebook`), through :func:`kept_masks`.

The hardware side (:mod:`hwgen.hw.sparse`): the folded engine skips a beat whose blocks
are zero in every PE of its neuron fold, so folded at PE = 1 and SIMD = ``block`` it spends,
per output pixel, one cycle per nonzero block (at least one per output channel)::

    cycles per output pixel = sum over output channels c of max(1, nonzero_blocks[c])

At PE > 1 a fold's PEs share their beats: it takes the union of their nonzero blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from rich.progress import Progress

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FAdd, FConv2d, FLinear, FloatNet
from hwgen.ir import Pow2
from hwgen.quant.inq import (
    LR_CHAIN,
    LR_RESIDUAL,
    FloatModule,
    InqOptions,
    retrain_free,
    select_to_freeze,
    with_weights,
)
from hwgen.quant.weights import dequantize, quantize_pow2
from hwgen.reproducible import one_thread


def _check_block(block: int | None) -> int:
    b = 1 if block is None else block
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise HwgenError(f"prune block must be a positive integer, not {block!r}")
    return b


def kept_masks(
    fnet: FloatNet, masks: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray | None]:
    """Each conv/linear layer's weight mask (True: kept; None: nothing pruned), checked
    against its weight's shape: :func:`prune`'s masks as a masked retraining takes them."""
    shapes = {fl.name: np.shape(fl.weight) for fl in fnet.layers
              if isinstance(fl, (FConv2d, FLinear))}  # fmt: skip
    masks = masks or {}
    unknown = sorted(set(masks) - set(shapes))
    if unknown:
        raise HwgenError(f"prune mask: no conv/linear layer named {unknown[0]!r}")
    out: dict[str, np.ndarray | None] = {}
    for n, shape in shapes.items():
        m = np.asarray(masks[n], bool) if n in masks else None
        if m is not None and m.shape != shape:
            raise HwgenError(f"layer {n}: prune mask of shape {m.shape}, not {shape}")
        out[n] = None if m is None or m.all() else m
    return out


def block_view(weight: np.ndarray, block: int | None) -> np.ndarray:
    """``weight`` (Cout, Cin, KH, KW) or (out, in) as blocks: (Cout, KH, KW, G, block) or
    (out, G, block), ``G = ceil(Cin / block)``, the last block zero-padded."""
    b = _check_block(block)
    w = np.asarray(weight)
    if w.ndim not in (2, 4):
        raise HwgenError(f"prune: weights must be (out, in) or (Cout, Cin, KH, KW), not {w.shape}")
    w = np.moveaxis(w, 1, -1)  # the input channels last
    cin = w.shape[-1]
    groups = -(-cin // b)
    pad = [(0, 0)] * (w.ndim - 1) + [(0, groups * b - cin)]
    return np.pad(w, pad).reshape(*w.shape[:-1], groups, b)


def _unit_to_weights(units: np.ndarray, shape: tuple[int, ...], block: int) -> np.ndarray:
    """A boolean per block (block_view's shape without the last axis) as a weight mask."""
    full = np.repeat(units, block, axis=-1)[..., : shape[1]]
    return np.moveaxis(full, -1, 1)


def nonzero_blocks(weight: np.ndarray, block: int | None) -> np.ndarray:
    """Per output channel, the number of blocks with a nonzero weight (int64, (Cout,)):
    its cycles per output pixel (at least one) in a folded engine at PE = 1 and SIMD =
    ``block``, which skips zero blocks (:mod:`hwgen.hw.sparse`)."""
    v = block_view(weight, block)
    nz = np.any(v != 0, axis=-1)
    return nz.reshape(nz.shape[0], -1).sum(axis=1).astype(np.int64)


def block_sparsity(weight: np.ndarray, block: int | None) -> float:
    """The fraction of blocks (of ``block_view``) that are all zero."""
    v = block_view(weight, block)
    total = int(np.prod(v.shape[:-1]))
    return 1.0 - float(nonzero_blocks(weight, block).sum()) / total


def block_norms(weight: np.ndarray, block: int | None) -> np.ndarray:
    """Each block's L2 norm (block_view's shape without the last axis)."""
    return np.sqrt(np.sum(np.square(block_view(np.asarray(weight, np.float64), block)), -1))


def grow_mask(
    weight: np.ndarray, kept: np.ndarray, sparsity: float, block: int | None
) -> np.ndarray:
    """The mask (True: kept) with ``round(sparsity * blocks)`` blocks pruned: those pruned in
    ``kept`` (a weight mask) stay pruned, the smallest-norm kept blocks follow (ties in
    flat block order)."""
    b = _check_block(block)
    norms = block_norms(weight, b)
    pruned = ~np.any(block_view(kept, b), axis=-1)
    target = round(sparsity * norms.size)
    if target < int(pruned.sum()):
        raise HwgenError(f"prune: sparsity {sparsity} is below the {pruned.mean():.4f} pruned")
    key = np.where(pruned, -1.0, norms).ravel()
    order = np.argsort(key, kind="stable")
    units = np.ones(norms.size, bool)
    units[order[:target]] = False
    return _unit_to_weights(units.reshape(norms.shape), np.shape(weight), b)


def schedule(sparsity: float, steps: int) -> list[float]:
    """The gradual targets: ``sparsity`` times 1/2, 3/4, ..., 1 - 2**-(steps-1), then 1."""
    return [sparsity * (1.0 - 0.5**i) for i in range(1, steps)] + [sparsity]


def _targets(fnet: FloatNet, sparsity: float | Mapping[str, float]) -> dict[str, float]:
    names = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - set(names))
        if unknown:
            raise HwgenError(f"prune: no conv/linear layer named {unknown[0]!r}")
        targets = {n: float(sparsity.get(n, 0.0)) for n in names}
    else:
        targets = dict.fromkeys(names, float(sparsity))
    for n, s in targets.items():
        if not 0.0 <= s < 1.0:
            raise HwgenError(f"prune: layer {n} sparsity must be in [0, 1), not {s}")
    return targets


def _options(fnet: FloatNet, options: InqOptions | None) -> InqOptions:
    options = options or InqOptions()
    if options.lr is None:
        residual = any(isinstance(fl, FAdd) for fl in fnet.layers)
        options = replace(options, lr=LR_RESIDUAL if residual else LR_CHAIN)
    return options


def _data(train: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (np.asarray(a) for a in train)
    if x.ndim < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise HwgenError(f"prune training data: {x.shape[0]} images but labels of shape {y.shape}")
    return torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.int64)


def prune(
    fnet: FloatNet,
    train: tuple[np.ndarray, np.ndarray],
    sparsity: float | Mapping[str, float],
    block: int | None = None,
    steps: int = 5,
    options: InqOptions | None = None,
    *,
    first: float | None = None,
    progress: bool = True,
) -> tuple[FloatNet, dict[str, np.ndarray]]:
    """Prune every conv/linear layer to its ``sparsity`` in blocks, retraining after each of
    ``steps`` steps for ``options.epochs`` epochs (INQ's retraining settings; ``portions``
    and ``partition`` unused). A mapping gives per-layer targets (missing layers: 0);
    ``first`` overrides the first conv/linear layer's (Han et al. prune it least).

    Returns the retrained net (pruned weights exactly 0.0) and each layer's mask (True:
    kept, the weight's shape). Deterministic for a given ``options.seed``.
    """
    b = _check_block(block)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HwgenError(f"prune steps must be a positive integer, not {steps!r}")
    targets = _targets(fnet, sparsity)
    if first is not None:
        name = next(iter(targets))
        targets[name] = _targets(fnet, {name: first})[name]
    options = _options(fnet, options)
    xt, yt = _data(train)
    torch.manual_seed(options.seed)
    module = FloatModule(fnet).double()
    teacher = copy.deepcopy(module).eval()
    macs = {n: module.macs[i] for n, i in module.index.items()}
    masks = {n: np.ones(m.weight.shape, bool) for n, m in macs.items()}
    gen = torch.Generator().manual_seed(options.seed)
    with one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("pruning", total=steps * options.epochs)
        for step in range(steps):
            for n, m in macs.items():
                if targets[n] == 0.0:
                    continue
                w = m.weight.detach().numpy()
                masks[n] = grow_mask(w, masks[n], schedule(targets[n], steps)[step], b)
                with torch.no_grad():
                    m.weight.copy_(torch.as_tensor(np.where(masks[n], w, 0.0)))
            frozen = {n: ~masks[n] for n in macs}
            retrain_free(
                module, macs, frozen, (xt, yt, teacher), options, gen, lambda: bar.advance(task)
            )
    params = {
        n: (np.where(masks[n], m.weight.detach().numpy(), 0.0), m.bias.detach().numpy().copy())
        for n, m in macs.items()
    }
    return with_weights(fnet, params), masks


def masked_inq(
    fnet: FloatNet,
    masks: Mapping[str, np.ndarray],
    formats: Mapping[str, Pow2],
    train: tuple[np.ndarray, np.ndarray],
    options: InqOptions | None = None,
    *,
    progress: bool = True,
) -> FloatNet:
    """INQ (:func:`hwgen.quant.inq.inq`) that keeps the pruned weights (``masks`` False) at
    its zero level: they are frozen at 0 from the start, and the portions count the kept
    weights only. Returns the net with every weight on its power-of-two grid."""
    missing = [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))
               and fl.name not in formats]  # fmt: skip
    if missing:
        raise HwgenError(f"masked INQ: no power-of-two format for layer {missing[0]}")
    for n, fmt in formats.items():
        if not fmt.has_zero:
            raise HwgenError(f"layer {n}: {fmt} has no zero level for pruned weights")
    options = _options(fnet, options)
    xt, yt = _data(train)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    module = FloatModule(fnet).double()
    teacher = copy.deepcopy(module).eval()
    macs = {n: module.macs[i] for n, i in module.index.items()}
    pruned = {n: ~np.asarray(masks[n], bool) if n in masks else np.zeros(m.weight.shape, bool)
              for n, m in macs.items()}  # fmt: skip
    frozen = {n: p.copy() for n, p in pruned.items()}
    gen = torch.Generator().manual_seed(options.seed)
    with one_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("INQ retraining", total=len(options.portions) * options.epochs)
        for portion in options.portions:
            for n, m in macs.items():
                w = np.where(pruned[n], 0.0, m.weight.detach().numpy())
                kept = int((~pruned[n]).sum())
                count = int(pruned[n].sum()) + round(portion * kept) - int(frozen[n].sum())
                frozen[n].flat[select_to_freeze(w, frozen[n], count, options.partition, rng)] = True
                q = dequantize(quantize_pow2(w, formats[n]), formats[n])
                with torch.no_grad():
                    m.weight.copy_(torch.as_tensor(np.where(frozen[n], q, w)))
            retrain_free(
                module, macs, frozen, (xt, yt, teacher), options, gen, lambda: bar.advance(task)
            )
    params = {}
    for n, m in macs.items():
        w = m.weight.detach().numpy()
        params[n] = (
            dequantize(quantize_pow2(w, formats[n]), formats[n]),
            m.bias.detach().numpy().copy(),
        )
    return with_weights(fnet, params)
