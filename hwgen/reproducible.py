"""Training that gives the same weights on every machine.

One CPU thread is not enough: PyTorch picks its convolution and matrix kernels by the CPU's
instruction set (``ATEN_CPU_CAPABILITY``, oneDNN's ISA), and each sums in its own order, so
float32 training on an AVX2 and an AVX-512 machine drifts apart from the first step and ends
in different weights (on ``digits``: 97.78% vs 98.06% float accuracy).

So hwgen trains in float64 and, after every optimizer step, snaps every parameter to a
multiple of ``GRID``: kernels that differ in the last float64 bits give the same multiple,
unless a value falls within that distance of a rounding boundary, and the trajectories
never start to diverge. Measured on ``digits`` (ATen's scalar kernels against AVX-512 and
oneDNN's SSE4.1 path): updates differ by 3e-18 on average (at most 3e-14), so a whole
training crosses a boundary once in about 14,000 runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# far below the step sizes of training (SGD at lr 3e-4 still moves), far above float64
# rounding noise; a multiple of it below 1 in magnitude is exact in float32
GRID = 2.0**-24


@contextmanager
def one_thread() -> Iterator[None]:
    """Run on one CPU thread, restored afterwards: small batches train faster so (syncing
    costs more than it gains), and the thread count cannot change a sum's order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def float64_init() -> Iterator[None]:
    """Make new modules in float64 (the default dtype, restored afterwards): their random
    initialisation, drawn in float32, already differs in the last bit between instruction
    sets, which is too close to the grid's rounding boundaries."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


@torch.no_grad()
def snap_(module: nn.Module) -> None:
    """Round every parameter of ``module`` in place to the nearest multiple of ``GRID``."""
    for p in module.parameters():
        p.copy_(torch.round(p / GRID) * GRID)
