"""Speed of the greedy fraction-length search on a ResNet-20-shaped network (CIFAR shapes).

The model, built directly as a FloatNet with He-initialised random weights (fixed seed):
conv3x3 3->16, then 3 stages x 6 conv3x3 at 16/32/64 channels (stride 2 at the first conv
of stages 2 and 3), ReLU after every conv, 8x8 global average pool (area 64, a power of
two), flatten, linear 64->10. No residual connections: hwgen networks are sequential.

It is quantised with scheme ``fixed`` at 8 bits (weights and activations) on 256 random
calibration images, the way ``hwgen tune`` runs each trial: the float reference
activations once (hwgen.quant.tune.reference_activations), then every weight fraction
length by least squared error and every activation fraction length greedily, layer by
layer (hwgen.quant.quantize). The time of both is the result; the last line printed is
``tune seconds: X``. ``--profile`` also prints where the time goes (cProfile);
BLAS runs on one thread by default (``--threads 0``: the library default): on a shared
2-core machine OpenBLAS's worker threads spin against other processes and the golden
model's im2col matrix products get several times slower; on an idle machine one thread
costs only a few seconds here.

    python bench/tune_speed.py [--images 256] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np
from threadpoolctl import threadpool_limits

from hwgen.frontend.graph import FAvgPool2d, FConv2d, FFlatten, FLayer, FLinear, FloatNet
from hwgen.quant import quantize
from hwgen.quant.precision import InputPrecision, LayerPrecision, Precision
from hwgen.quant.tune import reference_activations

SEED = 0


def resnet20_shaped(rng: np.random.Generator) -> FloatNet:
    """The sequential ResNet-20-shaped FloatNet of the module docstring."""

    def conv(name: str, cin: int, cout: int, stride: int) -> FConv2d:
        std = np.sqrt(2.0 / (cin * 9))  # He init for ReLU
        w = rng.normal(0.0, std, (cout, cin, 3, 3))
        b = rng.normal(0.0, 0.01, cout)
        return FConv2d(name, w, b, stride=(stride, stride), padding=(1, 1), relu=True)

    layers: list[FLayer] = [conv("conv0", 3, 16, 1)]
    cin = 16
    for s, width in enumerate((16, 32, 64)):
        for i in range(6):
            layers.append(conv(f"s{s + 1}c{i + 1}", cin, width, 2 if s and i == 0 else 1))
            cin = width
    w = rng.normal(0.0, np.sqrt(1.0 / 64), (10, 64))
    layers += [
        FAvgPool2d("gap", (8, 8), (8, 8)),
        FFlatten("flatten"),
        FLinear("fc", w, np.zeros(10)),
    ]
    return FloatNet((3, 32, 32), tuple(layers), "resnet20_seq")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="calibration images")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (0: the library default)")
    ap.add_argument("--profile", action="store_true", help="print the top functions by time")
    args = ap.parse_args()
    rng = np.random.default_rng(SEED)
    fnet = resnet20_shaped(rng)
    calib = rng.random((args.images, 3, 32, 32)).astype(np.float32)
    names = [lyr.name for lyr in fnet.layers if isinstance(lyr, (FConv2d, FLinear))]
    precision = Precision(
        "fixed",
        {n: LayerPrecision(weight_bits=8, act_bits=8) for n in names},
        InputPrecision(act_bits=8),
    )
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    with threadpool_limits(limits=args.threads or None, user_api="blas"):
        t_ref = time.perf_counter()
        acts = reference_activations(fnet, calib)
        t_ref = time.perf_counter() - t_ref
        result = quantize(fnet, precision, calib, progress=False, float_acts=acts)
    if prof:
        prof.disable()
    seconds = time.perf_counter() - t0
    weights = sum(lyr.weight.size for lyr in fnet.layers if isinstance(lyr, (FConv2d, FLinear)))
    print(f"model: {fnet.name}, {len(names)} conv/linear layers, {weights} weights")
    print(f"calibration: {args.images} images 3x32x32")
    print(f"float reference activations: {t_ref:.2f} s; quantize: {seconds - t_ref:.2f} s")
    print(f"input format {result.net.input_format}; output format {result.net.output_format}")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())
    print(f"tune seconds: {seconds:.2f}")


if __name__ == "__main__":
    main()
