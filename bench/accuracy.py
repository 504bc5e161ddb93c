"""Test accuracy of the digits example under every quantisation scheme.

Schemes: the float model; fixed point 8-bit weights / 8-bit activations and 4w/8a; INQ at
5, 4 and 3 bits; ternary and binary INQ; post-training powers of two at 3 bits (no
retraining). Accuracy is the integer golden model's on the 360-image test split (float:
the float model's); weight ROM bits are Σ weight count × weight bits (float: 32 bits).

It then checks the targets: INQ 5-bit >= float - 0.5 points, INQ 4-bit >= float - 1 point,
fixed 8/8 >= float - 0.3 points, INQ 3-bit > post-training pow2 3-bit; exit 1 if one fails.

    python bench/accuracy.py [--epochs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hwgen.examples.digits import digits_float_net
from hwgen.frontend.graph import FConv2d, FLinear
from hwgen.fsutil import atomic_write_bytes
from hwgen.ir import Conv2d, Linear
from hwgen.quant import quantize
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
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()
    res = run(args.epochs)
    table = Table(title="digits test accuracy (integer golden model, 360 images)")
    for col in ("scheme", "accuracy", "weight ROM bits"):
        table.add_column(col, justify="right" if col != "scheme" else "left")
    for name, r in res.items():
        table.add_row(name, f"{100 * float(r['accuracy']):.2f}%", str(r["rom_bits"]))
    console = Console()
    console.print(table)
    ok = True
    for what, holds in checks(res):
        console.print(f"{'PASS' if holds else 'FAIL'}  {what}")
        ok &= holds
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(res, indent=2) + "\n").encode())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
