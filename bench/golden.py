"""Golden-model convolution speed against PyTorch, on the same integer tensors.

The layer: batch 16, 64 -> 64 channels, 3x3, 32x32, padding 1; 8-bit signed activations,
4-bit Pow2 weights, requantised to 8 bits. hwgen's ``conv2d_acc`` + ``requantize`` is timed
against ``torch.nn.functional.conv2d`` in float64 (the exact oracle of DESIGN §2) and, for
information, in float32. Both libraries get the same number of threads (``--threads``;
NumPy's BLAS through threadpoolctl). Each timing is the best of ``--repeat`` runs.

Before timing, the results are checked: the golden accumulators equal torch's float64 ones,
and the golden output equals an independent requantisation of them (floor division).
The last line printed is ``golden/torch time ratio: X`` with the float64 ratio.

    python bench/golden.py [--threads 1] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from hwgen.golden import conv2d_acc, requantize
from hwgen.ir import ActFormat, Conv2d, Pow2, acc_frac

BATCH, CIN, COUT, K, HW, PAD = 16, 64, 64, 3, 32, 1


def make_layer(rng: np.random.Generator) -> tuple[Conv2d, ActFormat]:
    """The benchmarked layer with random on-grid Pow2 weights, and its input format."""
    wfmt = Pow2(4, emax=-1)
    mag = 1 << rng.integers(0, wfmt.max_shift + 1, size=(COUT, CIN, K, K))
    weight = mag * rng.choice([-1, 0, 1], size=mag.shape)
    bias = rng.integers(-1000, 1001, size=COUT)
    layer = Conv2d("conv", CIN, COUT, K, wfmt, ActFormat(8, 1), weight, bias, padding=PAD)
    return layer, ActFormat(8, 5)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall-clock time of ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def independent_requantize(acc: np.ndarray, s: int, fmt: ActFormat) -> np.ndarray:
    """rhu(acc / 2**s) by floor division (not the golden model's shift), then saturate."""
    return np.clip((acc + 2 ** (s - 1)) // 2**s, fmt.lo, fmt.hi)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for both torch and NumPy")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs; the best one counts")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    layer, in_fmt = make_layer(rng)
    x = rng.integers(in_fmt.lo, in_fmt.hi + 1, size=(BATCH, CIN, HW, HW))
    s = acc_frac(layer, in_fmt) - layer.out_format.frac
    assert s > 0, "the benchmark exercises the rounding right shift"

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        xt64, wt64 = (
            torch.from_numpy(x.astype(np.float64)),
            torch.from_numpy(layer.weight.astype(np.float64)),
        )
        xt32, wt32 = xt64.float(), wt64.float()

        def golden() -> np.ndarray:
            return requantize(conv2d_acc(x, layer, in_fmt), s, layer.out_format)

        def torch64() -> torch.Tensor:
            return F.conv2d(xt64, wt64, padding=PAD)

        def torch32() -> torch.Tensor:
            return F.conv2d(xt32, wt32, padding=PAD)

        acc = conv2d_acc(x, layer, in_fmt)
        ref = torch64().numpy().astype(np.int64) + layer.bias[None, :, None, None]
        if not np.array_equal(acc, ref):
            print("FAIL: golden accumulators differ from torch float64", file=sys.stderr)
            return 1
        if not np.array_equal(golden(), independent_requantize(ref, s, layer.out_format)):
            print("FAIL: golden output differs from the requantised torch result", file=sys.stderr)
            return 1

        t_golden = best_time(golden, args.repeat)
        t_torch64 = best_time(torch64, args.repeat)
        t_torch32 = best_time(torch32, args.repeat)

    print(
        f"conv {BATCH}x{CIN}x{HW}x{HW} -> {COUT}, {K}x{K}, padding {PAD}; "
        f"{in_fmt} x {layer.weight_format} -> {layer.out_format}; "
        f"{args.threads} thread(s) each for torch and NumPy BLAS; best of {args.repeat}"
    )
    print("exact: accumulators and requantised outputs equal torch float64 + floor division")
    print(f"golden (conv2d_acc + requantize): {t_golden * 1e3:8.2f} ms")
    print(f"torch conv2d float64:             {t_torch64 * 1e3:8.2f} ms")
    print(f"torch conv2d float32:             {t_torch32 * 1e3:8.2f} ms")
    print(f"golden/torch-float32 time ratio: {t_golden / t_torch32:.3f} (for information)")
    print(f"golden/torch time ratio: {t_golden / t_torch64:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
