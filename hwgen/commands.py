"""What the CLI subcommands do, as plain functions (the CLI only parses arguments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hwgen import golden as gm
from hwgen import hwq
from hwgen.errors import HwgenError
from hwgen.fsutil import atomic_write_bytes, npz_bytes


def load_npy(path: Path, what: str = "input") -> np.ndarray:
    """Read a ``.npy`` without unpickling; one-line errors."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise HwgenError(f"{what} {path}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise HwgenError(f"{what} {path}: not a readable .npy array ({e})") from None


def golden(model: Path, input_path: Path, output: Path) -> None:
    """``hwgen golden``: every layer's output of the golden model, written to an ``.npz``."""
    net = hwq.load(model)
    x = load_npy(input_path)
    if x.dtype.kind == "f":
        x = gm.quantize_input(x, net.input_format)
    outs = gm.forward(net, x)
    arrays = {"input": gm.check_input(x, net)}
    arrays |= {layer.name: out for layer, out in zip(net.layers, outs, strict=False)}
    atomic_write_bytes(output, npz_bytes(arrays))
    print(f"wrote {output}: input + {len(outs)} layer outputs for {x.shape[0]} images")
