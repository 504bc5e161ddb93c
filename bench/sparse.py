"""Zero-block skipping on digits: block-pruned INQ against the dense INQ build, same folding.

Quantizes the bundled digits CNN twice with ``hwgen quantize``: INQ 5-bit (dense), and INQ
5-bit after block pruning in blocks of 4 input channels of one output channel, retrained
(``--precision`` with ``block = 4`` and each layer's ``prune``: ``--prune`` for conv2 and fc,
``--first`` for conv1; ``--first 0`` is ``hwgen quantize --prune P --block 4``). Both are
built with ``hwgen build`` at the same folding (``FOLDING``: conv2 and fc at PE = 1 and SIMD
= the block, so each fold's schedule is exactly its channel's nonzero blocks; conv1 at PE =
8 so that it is not the slowest engine) with the 360 test images as vectors, and
simulated whole (``hwgen sim DIR --network``: cocotb + Verilator). Cycles per inference are
the steady state, ``(cycles(N images) - cycles(2 images)) / (N - 2)`` without stalls (the
fill latency cancels), against the ideal of the slowest engine: output pixels times the sum
over neuron folds of max(1, scheduled beats) (``hwgen.hw.sparse``; MACs / (PE*SIMD) for the
dense build). ROM bits are the weight ROMs' depth x width, summed over the layers. The
schedule's cost: conv2's sliding window alone through Yosys synth_ecp5, with its schedule
table and dense.

The last lines printed are ``sparse digits accuracy: X (float Y)``, ``sparse block
sparsity: ...``, ``sparse RTL == golden: K/N``, ``sparse cycles/ideal: X``, ``sparse
speed-up vs dense: X`` and ``sparse ROM bits: N (dense M)``.

    python bench/sparse.py [-o DIR] [--prune 0.8] [--first 0.25] [--stalls 0.3]

Digits, seed 0 (float 98.06%, INQ 5-bit dense 97.50%): ``--prune 0.75 --first 0`` 98.33%
at 69.7% of the network's blocks zero (conv2 and fc 75%); ``--prune 0.8 --first 0.25``
97.50% at 76.0%; ``--prune 0.82 --first 0`` 95.83%; ``--prune 0.75 --first 0.75`` 96.39%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from amaranth.back import verilog

from hwgen import golden, hwq
from hwgen.cli import main as hwgen
from hwgen.examples.digits import digits_float_net
from hwgen.hw.requant import act_shape
from hwgen.hw.sparse import fold_schedule
from hwgen.hw.window import SlidingWindow
from hwgen.ir import Conv2d, Linear, Network
from hwgen.quant.prune import block_view, nonzero_blocks
from hwgen.quant.tune import float_accuracy
from hwgen.simulate import simulate_layer
from hwgen.synth import Resources, synthesize

BLOCK = 4
FOLDING = {"conv1": (8, 1), "pool1": (8, 8), "conv2": (1, BLOCK), "fc": (1, BLOCK)}


def quantize(out: Path, prune: dict[str, float] | None) -> Path:
    """``hwgen quantize digits``, INQ 5-bit, with each layer's ``prune`` target if given."""
    path = out / ("sparse.hwq" if prune else "dense.hwq")
    args = ["quantize", "digits", "--scheme", "inq", "--bits", "5", "-o", str(path)]
    if prune:
        tables = "".join(
            f"\n[layers.{n}]\nweight_bits = 5\n" + (f"prune = {p}\n" if p else "")
            for n, p in prune.items()
        )
        precision = out / "precision.toml"
        precision.write_text(f'scheme = "inq"\nblock = {BLOCK}\n{tables}')
        args = ["quantize", "digits", "--precision", str(precision), "-o", str(path)]
    if hwgen(args) != 0:
        raise SystemExit(f"hwgen {' '.join(args)} failed")
    return path


def build(out: Path, model: Path, images: int) -> Path:
    folding = out / "folding.toml"
    folding.write_text(
        "".join(f"[layers.{n}]\npe = {pe}\nsimd = {simd}\n" for n, (pe, simd) in FOLDING.items())
    )
    target = out / model.stem
    args = ["build", str(model), "-o", str(target), "--folding", str(folding)]
    if hwgen([*args, "--vectors", str(images)]) != 0:
        raise SystemExit(f"hwgen {' '.join(args)} failed")
    return target


def steady_cycles(build_dir: Path, total: int) -> float:
    """Cycles per image without stalls, the difference of a long and a 2-image run."""
    few = simulate_layer(build_dir, "network", 0.0, vectors=2).cycles
    many = simulate_layer(build_dir, "network", 0.0, vectors=total).cycles
    return (many - few) / (total - 2)


def block_sparsity(net: Network) -> tuple[float, dict[str, float]]:
    """Zero blocks of BLOCK input channels (of one output channel, at one kernel position):
    the network's fraction and each conv/linear layer's."""
    per, zero, total = {}, 0, 0
    for layer in net.layers:
        if isinstance(layer, (Conv2d, Linear)):
            blocks = int(np.prod(block_view(layer.weight, BLOCK).shape[:-1]))
            nonzero = int(nonzero_blocks(layer.weight, BLOCK).sum())
            per[layer.name] = 1 - nonzero / blocks
            zero, total = zero + blocks - nonzero, total + blocks
    return zero / total, per


def window_cost(net: Network, name: str, pe: int, simd: int, sparse: bool) -> Resources:
    """Yosys synth_ecp5 of layer ``name``'s sliding window, with its schedule or dense."""
    layer = net.layer(name)
    c, h, w = net.in_shape(layer)
    window = SlidingWindow(
        channels=c, height=h, width=w, kernel=layer.kernel, stride=layer.stride,
        padding=layer.padding, lanes=simd, shape=act_shape(net.in_format(layer)),
        repeats=layer.out_channels // pe,
        schedule=fold_schedule(layer, pe, simd) if sparse else None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hwgen-sparse-") as tmp:
        src = Path(tmp) / "window.v"
        src.write_text(verilog.convert(window, name="window", emit_src=False))
        return synthesize([src], "window", place_route=False).resources


def rom_bits(manifest: dict) -> int:
    return sum(e["rom_depth"] * e["rom_width"] for e in manifest["layers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path("sparse-bench"))
    ap.add_argument("--prune", type=float, default=0.8, help="conv2's and fc's target")
    ap.add_argument("--first", type=float, default=0.25, help="conv1's target")
    ap.add_argument("--stalls", type=float, default=0.3, help="in the RTL == golden run")
    args = ap.parse_args()
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fnet, data = digits_float_net()
    images = len(data.x_test)
    builds = {}
    targets = {"conv1": args.first, "conv2": args.prune, "fc": args.prune}
    for name, prune in (("dense", None), ("sparse", targets)):
        model = quantize(out, prune)
        builds[name] = (hwq.load(model), build(out, model, images))
    print(f"quantised and built in {time.perf_counter() - t0:.0f} s")

    net, sparse_dir = builds["sparse"]
    x = golden.quantize_input(data.x_test, net.input_format)
    gold = golden.forward(net, x)[-1].reshape(images, -1)
    accuracy = float(np.mean(gold.argmax(1) == data.y_test))
    fl = float_accuracy(fnet, data.x_test, data.y_test)
    overall, per = block_sparsity(net)

    t0 = time.perf_counter()
    r = simulate_layer(sparse_dir, "network", args.stalls, vectors=images)
    rtl = np.load(r.rtl_output).reshape(images, -1)
    equal = int(sum(np.array_equal(a, b) for a, b in zip(rtl, gold, strict=True)))
    total = json.loads((sparse_dir / "manifest.json").read_text())["top"]["vector_images"]
    manifests, cycles = {}, {}
    for name, (_, d) in builds.items():
        manifests[name] = json.loads((d / "manifest.json").read_text())
        cycles[name] = steady_cycles(d, total)
    print(f"simulated in {time.perf_counter() - t0:.0f} s")
    for name, m in manifests.items():
        layers = ", ".join(f"{e['name']} {e['ideal_cycles']}" for e in m["layers"])
        print(f"{name}: ideal cycles per engine: {layers}; measured {cycles[name]:.1f}")
    ideal = manifests["sparse"]["top"]["ideal_cycles"]
    pe, simd = FOLDING["conv2"]
    windows = {kind: window_cost(net, "conv2", pe, simd, kind == "sparse") for kind in builds}
    for kind, res in windows.items():
        print(f"conv2 window, {kind}: {res.luts} LUT4, {res.ffs} FF (Yosys synth_ecp5)")

    layers = ", ".join(f"{n} {100 * s:.1f}%" for n, s in per.items())
    print(f"sparse digits accuracy: {100 * accuracy:.2f}% (float {100 * fl:.2f}%)")
    print(f"sparse block sparsity: {100 * overall:.1f}% of blocks of {BLOCK} ({layers})")
    print(f"sparse RTL == golden: {equal}/{images} (stalls {args.stalls}, {r.mismatches} errors)")
    print(f"sparse cycles/ideal: {cycles['sparse'] / ideal:.3f} ({cycles['sparse']:.1f} / {ideal})")
    print(f"sparse speed-up vs dense: {cycles['dense'] / cycles['sparse']:.2f}")
    print(
        f"sparse ROM bits: {rom_bits(manifests['sparse'])} (dense {rom_bits(manifests['dense'])})"
    )


if __name__ == "__main__":
    main()
