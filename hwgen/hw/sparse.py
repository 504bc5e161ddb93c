"""Zero-block skipping: the static schedule of a folded engine's window beats.

A *block* is the SIMD weights one PE takes in one beat: input channel group ``g`` at kernel
position ``(kh, kw)`` of one output channel. Neuron fold ``nf`` (output channels
``nf*PE .. nf*PE + PE - 1``) takes one window beat ``(kh, kw, g)`` for each of its beats
where any of its PEs has a nonzero block; the others are skipped, so a block that is zero
in every PE of the fold costs neither a cycle nor a ROM word. A fold whose weights are all
zero keeps its first beat (a zero word), so that its bias-only result is still produced::

    cycles per output pixel = sum over neuron folds nf of max(1, |schedule[nf]|)

A dense layer (no beat skipped) has the full window, ``Cout/PE * KH*KW*Cin/SIMD`` beats.
The schedule is the union over a fold's PEs, so a fold is as slow as its PEs' union of
nonzero blocks. The PEs are balanced by the folding: a sparse layer folded at PE = 1 takes
exactly its nonzero blocks (``hwgen.quant.prune.nonzero_blocks`` at ``block`` = SIMD);
blocks pruned as SIMD inputs x PE outputs would do the same at PE > 1 (``hwgen quantize``
prunes SIMD x 1 blocks only).

The sliding-window unit (hwgen.hw.window) walks the schedule from a constant table, and the
weight ROM (hwgen.hw.rom.rom_words) holds the scheduled words only, in the same order.
"""

from __future__ import annotations

import numpy as np

from hwgen.ir import Conv2d, Linear

Schedule = tuple[tuple[int, ...], ...]  # per neuron fold, its beats' indices in the window


def window_beats(layer: Conv2d | Linear, simd: int) -> int:
    """Beats of one full window: ``KH * KW * Cin / SIMD``."""
    cin = layer.weight.shape[1]
    kk = layer.kernel[0] * layer.kernel[1] if isinstance(layer, Conv2d) else 1
    return kk * cin // simd


def fold_schedule(layer: Conv2d | Linear, pe: int, simd: int) -> Schedule:
    """Per neuron fold, the window beats it takes (``(kh * KW + kw) * Cin/SIMD + g``,
    ascending): those where a PE of the fold has a nonzero block, or beat 0 if none has."""
    w = np.asarray(layer.weight)
    cout, cin = w.shape[:2]
    # (Cout, KH*KW, Cin): the window's (kh, kw, channel) order per output channel.
    blocks = np.moveaxis(w.reshape(cout, cin, -1), 1, -1)
    nonzero = np.any(blocks.reshape(cout // pe, pe, -1, simd) != 0, axis=(1, 3))
    return tuple(tuple(int(b) for b in np.flatnonzero(row)) or (0,) for row in nonzero)


def is_dense(schedule: Schedule, beats: int) -> bool:
    """Whether every fold takes the whole window (nothing to skip)."""
    return all(len(s) == beats for s in schedule)


def pixel_beats(schedule: Schedule) -> int:
    """Cycles per output pixel: the beats of every fold's schedule."""
    return sum(len(s) for s in schedule)


def rom_addresses(schedule: Schedule, beats: int) -> np.ndarray:
    """The dense ROM addresses (``nf * beats + beat``) of the scheduled words, in order."""
    return np.array([nf * beats + b for nf, s in enumerate(schedule) for b in s], np.int64)
