"""Test accuracy of the digits example under every quantisation scheme.

Schemes: the float model; fixed point 8-bit weights / 8-bit activations and 4w/8a; INQ at
5, 4 and 3 bits; ternary and binary INQ; post-training powers of two at 3 bits (no
retraining). Accuracy is the integer golden model's on the 360-image test split (float:
the float model's); weight ROM bits are Σ weight count × weight bits (float: 32 bits).

It then checks the targets: INQ 5-bit >= float - 0.5 points, INQ 4-bit >= float - 1 point,
fixed 8/8 >= float - 0.3 points, INQ 3-bit > post-training pow2 3-bit; exit 1 if one fails.

The learned schemes of issue #11 (hwgen quantize --scheme bc|twn|lab|lat|dqc|ttq|amq) on
digits and digits-res, each at its bit counts next to INQ at the same bits (1: binary INQ,
2: ternary INQ, 3-5: INQ), 8-bit activations, the mean over ``--seeds`` retraining seeds
(0, 1, ...; INQ with the same seeds). Two ROM counts:

- ``code ROM bits``: what the scheme stores — code (index, plane) bits × weights plus its
  side storage: the per-channel scales of bc/twn/lab/lat (Cout × 8 bits per layer), DQC's
  and TTQ's codebook (entries × their signed width per layer), amq's M planes × weights
  plus M × Cout 8-bit scales, INQ nothing more;
- ``IR ROM bits``: weights × the IR weight format's bits, what the engine's weight ROM
  stores (amq: the M sign bits of its Planes format; the scales are constants of the MAC
  unit).

Then the papers' comparisons, as measured: "X vs Y: a% vs b% (holds|does not hold on
<model>)", holding when X's mean accuracy is strictly higher. These are not targets.

    python bench/accuracy.py [--epochs N] [--retrain-epochs N] [--seeds N]
                             [--models digits,digits-res] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hwgen.examples import load_example
from hwgen.examples.digits import digits_float_net
from hwgen.frontend.graph import FConv2d, FLinear
from hwgen.fsutil import atomic_write_bytes
from hwgen.ir import Codebook, Conv2d, Linear, Network, signed_bits
from hwgen.quant import quantize
from hwgen.quant.binarize import RetrainOptions
from hwgen.quant.codebook import CodebookOptions
from hwgen.quant.fakequant import accuracy
from hwgen.quant.inq import InqOptions
from hwgen.quant.precision import LayerPrecision, Precision

# name: (scheme, weight bits, activation bits)
SCHEMES = {
    "fixed8": ("fixed", 8, 8),
    "fixed4w8a": ("fixed", 4, 8),
    "inq5": ("inq", 5, 8),
    "inq4": ("inq", 4, 8),
    "inq3": ("inq", 3, 8),
    "ternary": ("ternary", 2, 8),
    "binary": ("binary", 1, 8),
    "pow2_ptq3": ("pow2", 3, 8),
}


# name: (scheme, bits) of the learned schemes, and INQ's rows at 1..5 bits
LEARNED = {
    "bc1": ("bc", 1),
    "lab1": ("lab", 1),
    "twn2": ("twn", 2),
    "lat2": ("lat", 2),
    "ttq2": ("ttq", 2),
    "amq2": ("amq", 2),
    "amq3": ("amq", 3),
    "amq4": ("amq", 4),
    "dqc3": ("dqc", 3),
    "dqc4": ("dqc", 4),
    "dqc5": ("dqc", 5),
}
INQ_AT = {1: ("inq_binary", "binary"), 2: ("inq_ternary", "ternary")} | {
    b: (f"inq{b}", "inq") for b in (3, 4, 5)
}
# (X, Y, what): the papers' claim is that X is more accurate than Y
COMPARISONS = (
    ("lab1", "bc1", "LAB vs BinaryConnect (1 bit)"),
    ("lat2", "twn2", "LAT vs TWN (2 bits)"),
    ("ttq2", "twn2", "TTQ vs TWN (2 bits)"),
    ("dqc3", "inq3", "DQC vs INQ (3 bits)"),
    ("dqc5", "inq5", "DQC vs INQ (5 bits)"),
    ("amq2", "twn2", "alternating 2-bit vs ternary (TWN)"),
)
SCALE_BITS = 8  # binarize.DEFAULT_SCALE_BITS: per-channel and per-plane scales


def code_rom_bits(net: Network, scheme: str, bits: int) -> int:
    """What ``scheme`` stores (module docstring): code bits x weights plus side storage."""
    total = 0
    for layer in net.layers:
        if not isinstance(layer, (Conv2d, Linear)):
            continue
        n, cout, fmt = layer.weight.size, layer.weight.shape[0], layer.weight_format
        if scheme == "amq":  # M planes of one bit, M scales per output channel
            total += bits * n + bits * cout * SCALE_BITS
        elif isinstance(fmt, Codebook):
            total += fmt.bits * n + len(fmt.entries) * signed_bits(fmt.lo, fmt.hi)
        else:
            total += fmt.bits * n
            if layer.scale_format is not None:
                total += cout * layer.scale_format.bits
    return total


def ir_rom_bits(net: Network) -> int:
    return sum(
        layer.weight.size * layer.weight_format.bits
        for layer in net.layers
        if isinstance(layer, (Conv2d, Linear))
    )


def run_learned(
    model: str, seeds: int, inq_epochs: int | None, retrain_epochs: int | None
) -> dict[str, dict[str, Any]]:
    """Every learned scheme and INQ at 1..5 bits on ``model``: mean accuracy over the seeds,
    each seed's accuracy, and both ROM counts (the first seed's network)."""
    fnet, data = load_example(model)
    assert data is not None
    macs = [fl for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    train = (data.x_train, data.y_train)
    rows = dict(LEARNED) | {name: (scheme, b) for b, (name, scheme) in INQ_AT.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, (scheme, bits) in rows.items():
        layers = {fl.name: LayerPrecision(weight_bits=bits, act_bits=8) for fl in macs}
        accs, nets = [], []
        t = time.perf_counter()
        for seed in range(seeds):
            inq = InqOptions(seed=seed, **({} if inq_epochs is None else {"epochs": inq_epochs}))
            kw = {} if retrain_epochs is None else {"epochs": retrain_epochs}
            r = quantize(
                fnet, Precision(scheme, layers), data.x_train, train, progress=False,
                inq_options=inq, retrain_options=RetrainOptions(seed=seed, **kw),
                codebook_options=CodebookOptions(seed=seed, **kw),
            )  # fmt: skip
            accs.append(accuracy(r.net, data.x_test, data.y_test))
            nets.append(r.net)
        out[name] = {
            "scheme": scheme,
            "bits": bits,
            "accuracy": float(np.mean(accs)),
            "seeds": accs,
            "code_rom_bits": code_rom_bits(nets[0], scheme, bits),
            "ir_rom_bits": ir_rom_bits(nets[0]),
        }
        print(
            f"{model} {name}: {100 * np.mean(accs):.2f}% in {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
        )
    return out


def comparisons(model: str, res: dict[str, dict[str, Any]]) -> list[str]:
    """The papers' comparisons as measured, one line each."""
    lines = []
    for x, y, what in COMPARISONS:
        a, b = res[x]["accuracy"], res[y]["accuracy"]
        verdict = "holds" if a > b else "does not hold"
        lines.append(f"{what}: {100 * a:.2f}% vs {100 * b:.2f}% ({verdict} on {model})")
    return lines


def run(epochs: int | None) -> dict[str, dict[str, float | int]]:
    """Accuracy and weight ROM bits of every scheme."""
    fnet, data = digits_float_net()
    macs = [fl for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    with torch.no_grad():
        logits = fnet.forward(torch.as_tensor(data.x_test, dtype=torch.float64))[-1]
    float_acc = float(np.mean(logits.numpy().argmax(1) == data.y_test))
    results: dict[str, dict[str, float | int]] = {
        "float": {"accuracy": float_acc, "rom_bits": 32 * sum(fl.weight.size for fl in macs)}
    }
    options = InqOptions() if epochs is None else InqOptions(epochs=epochs)
    for name, (scheme, wbits, abits) in SCHEMES.items():
        layers = {fl.name: LayerPrecision(weight_bits=wbits, act_bits=abits) for fl in macs}
        t = time.perf_counter()
        r = quantize(
            fnet,
            Precision(scheme, layers),
            data.x_train,
            (data.x_train, data.y_train),
            inq_options=options,
        )
        rom = sum(
            layer.weight.size * layer.weight_format.bits
            for layer in r.net.layers
            if isinstance(layer, (Conv2d, Linear))
        )
        acc = accuracy(r.net, data.x_test, data.y_test)
        results[name] = {"accuracy": acc, "rom_bits": rom}
        print(f"{name}: {100 * acc:.2f}% in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return results


def checks(res: dict[str, dict[str, float | int]]) -> list[tuple[str, bool]]:
    """The targets of issue #3, each with whether it holds."""
    acc = {k: float(v["accuracy"]) for k, v in res.items()}
    f = acc["float"]
    return [
        ("INQ 5-bit >= float - 0.5 points", acc["inq5"] >= f - 0.005),
        ("INQ 4-bit >= float - 1 point", acc["inq4"] >= f - 0.01),
        ("fixed 8w/8a >= float - 0.3 points", acc["fixed8"] >= f - 0.003),
        ("INQ 3-bit > post-training pow2 3-bit", acc["inq3"] > acc["pow2_ptq3"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, help="INQ epochs per step (default: InqOptions)")
    ap.add_argument(
        "--retrain-epochs",
        type=int,
        help="learned schemes' retraining epochs (default: RetrainOptions, CodebookOptions)",
    )
    ap.add_argument("--seeds", type=int, default=1, help="retraining seeds per learned row")
    ap.add_argument(
        "--models",
        default="digits,digits-res",
        help="models of the learned-scheme table (comma-separated; empty: none)",
    )
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()
    res = run(args.epochs)
    table = Table(title="digits test accuracy (integer golden model, 360 images)")
    for col in ("scheme", "accuracy", "weight ROM bits"):
        table.add_column(col, justify="right" if col != "scheme" else "left")
    for name, r in res.items():
        table.add_row(name, f"{100 * float(r['accuracy']):.2f}%", str(r["rom_bits"]))
    console = Console(width=120)  # a log keeps every column whole
    console.print(table)
    ok = True
    for what, holds in checks(res):
        console.print(f"{'PASS' if holds else 'FAIL'}  {what}")
        ok &= holds
    doc: dict[str, object] = dict(res)
    models = [m for m in args.models.split(",") if m]
    for model in models:
        learned = run_learned(model, args.seeds, args.epochs, args.retrain_epochs)
        seeds = f"mean of {args.seeds} seeds" if args.seeds > 1 else "seed 0"
        table = Table(title=f"{model}: learned schemes and INQ (golden model, 360 images, {seeds})")
        cols = (
            "row",
            "scheme",
            "bits",
            "accuracy",
            "seeds min-max",
            "code ROM bits",
            "IR ROM bits",
        )
        for col in cols:
            table.add_column(col, justify="left" if col in ("row", "scheme") else "right")
        by_bits = sorted(learned.items(), key=lambda kv: (kv[1]["bits"], kv[1]["scheme"] == "inq"))
        for name, r in by_bits:
            lo, hi = min(r["seeds"]), max(r["seeds"])
            table.add_row(
                name, str(r["scheme"]), str(r["bits"]), f"{100 * r['accuracy']:.2f}%",
                f"{100 * lo:.2f}-{100 * hi:.2f}", str(r["code_rom_bits"]), str(r["ir_rom_bits"]),
            )  # fmt: skip
        console.print(table)
        lines = comparisons(model, learned)
        for line in lines:
            console.print(line)
        doc[f"learned_{model}"] = {"rows": learned, "comparisons": lines}
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(doc, indent=2) + "\n").encode())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
