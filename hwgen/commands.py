"""What the CLI subcommands do, as plain functions (the CLI only parses arguments)."""

from __future__ import annotations

import contextlib
import sys
import time
import zipfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hwgen import golden as gm
from hwgen import hwq
from hwgen.errors import HwgenError
from hwgen.fsutil import atomic_write_bytes, check_output, existing_mode, npz_bytes
from hwgen.ir import Network

if TYPE_CHECKING:
    from hwgen.emit import BuildOptions
    from hwgen.frontend.graph import FloatNet
    from hwgen.quant.precision import Precision
    from hwgen.quant.tune import CostFn, TuneResult

# Output to a file or a pipe: wide enough that no table or line is wrapped at 80 columns.
LOG_WIDTH = 250


def make_console() -> Console:
    """rich output: as rich likes on a terminal; unwrapped plain lines in a log."""
    term = Console()
    return term if term.is_terminal else Console(width=LOG_WIDTH)


def titled(title: str) -> Table:
    """A table at least as wide as its title (rich wraps a longer title)."""
    return Table(title=title, min_width=len(title))


class Phases:
    """Long steps shown while they run (:data:`hwgen.synth.Phase`), each ending with a line
    that gives its time. On a terminal a spinner with the elapsed time; in a log one plain
    line when the step starts and one when it ends, nothing redrawn."""

    def __init__(self, out: Console) -> None:
        self.out = out

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.out.is_terminal:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            with Progress(*columns, console=self.out, transient=True) as bar:
                bar.add_task(what, total=None)
                yield
        else:
            self.out.print(f"{what} ...", highlight=False, soft_wrap=True)
            yield
        self.out.print(f"{what}: {time.perf_counter() - t0:.1f} s", highlight=False, soft_wrap=True)


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
    check_output(output, "file")
    net = hwq.load(model)
    x = load_npy(input_path)
    if x.dtype.kind == "f":
        x = gm.quantize_input(x, net.input_format)
    outs = gm.forward(net, x)
    arrays = {"input": gm.check_input(x, net)}
    arrays |= {layer.name: out for layer, out in zip(net.layers, outs, strict=False)}
    try:
        atomic_write_bytes(output, npz_bytes(arrays))
    except OSError as e:  # e.g. the output is a directory, or its parent is a file
        raise HwgenError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"wrote {output}: input + {len(outs)} layer outputs for {x.shape[0]} images")


def _tune_data(
    path: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``--data`` for tune: calibration ``x``, evaluation (``x_test``, ``y_test``) or (``x``,
    ``y``), and training (``x_train``, ``y_train``) or (``x``, ``y``) for retrained schemes."""
    arrays = _load_data(path, need_train=False)  # read and checked alike
    ex, ey = (arrays.get("x_test"), arrays.get("y_test"))
    if ex is None or ey is None:
        ex, ey = arrays["x"], arrays.get("y")
    if ey is None:
        raise HwgenError(f"data {path}: tune needs labels: 'y' (or 'x_test' and 'y_test')")
    train = None
    if "x_train" in arrays and "y_train" in arrays:
        train = (arrays["x_train"], arrays["y_train"])
    elif "y" in arrays:
        train = (arrays["x"], arrays["y"])
    return arrays["x"], ex, ey, train


def tune(
    model: str,
    scheme: str,
    max_drop: float,
    data: Path | None,
    epochs: int | None,
    output: Path,
    compression: dict[str, Any] | None = None,
) -> None:
    """``hwgen tune``: per-layer bit-width search; writes the report set and precision.toml.

    ``compression``: the sparsity search and sweep options (:func:`tune_compression`)."""
    from hwgen.frontend import load_model
    from hwgen.ir import Add
    from hwgen.quant.tune import RETRAINED, format_layers, layer_rom_bits
    from hwgen.quant.tune import tune as run_tune
    from hwgen.report import check_output_dir, write_tuning_report

    if not np.isfinite(max_drop) or max_drop < 0:
        raise HwgenError(f"--max-drop must be a non-negative number of points, not {max_drop}")
    if epochs is not None and (epochs < 1 or scheme not in RETRAINED):
        raise HwgenError(
            f"--epochs {epochs}: needs a retrained scheme ({', '.join(RETRAINED)}) "
            "and at least 1 epoch"
        )
    check_output(output, "folder")  # before the search, which takes minutes
    check_output_dir(output)
    kept = existing_mode(output)
    given = _tune_data(data) if data is not None else None  # before the model: fail fast
    fnet, dataset = load_model(model, train=given[3] if given is not None else None)
    if given is not None:
        calib, ex, ey, train = given
    elif dataset is not None:
        calib, ex, ey = dataset.x_train, dataset.x_test, dataset.y_test
        train = (dataset.x_train, dataset.y_train)
    else:
        raise HwgenError(f"model {model}: no bundled data; pass --data with 'x' and labels 'y'")
    options = retrain_options(scheme, epochs)
    options |= tune_compression(fnet, **(compression or {}))
    result = run_tune(fnet, scheme, calib, ex, ey, max_drop, train, **options)
    out = write_tuning_report(output, result)
    if kept is not None:  # the report folder is replaced as a whole: keep its permissions
        out.chmod(kept)
    table = titled(f"hwgen tune {fnet.name} ({scheme}, max drop {max_drop:g} points)")
    for col in ("layer", "weights", "activations", "ROM bits"):
        table.add_column(col, justify="right" if col == "ROM bits" else "left")
    table.add_row("input", "", str(result.net.input_format), "")
    for layer in format_layers(result.net):
        if isinstance(layer, Add):  # no weights
            table.add_row(layer.name, "", str(layer.out_format), "0")
            continue
        bits = layer_rom_bits(layer, block=result.block)
        table.add_row(layer.name, str(layer.weight_format), str(layer.out_format), str(bits))
    console = make_console()
    console.print(table)
    verdict = "within budget" if result.within_budget else "OVER BUDGET"
    console.print(
        f"accuracy {100 * result.accuracy:.2f}% (float {100 * result.float_accuracy:.2f}%, "
        f"drop {result.drop_points:.2f} points, {verdict}); weight ROM {result.rom_bits} bits "
        f"= {result.rom_bits / result.rom_bits_8bit:.1%} of 8-bit"
    )
    if result.block is not None:
        pruned = ", ".join(f"{n} {f:g}" for n, f in result.precision.pruned.items())
        console.print(f"pruned in blocks of {result.block}: {pruned or 'none'}")
    if result.sweep:
        console.print(sweep_table(result))
    if result.sweep_diverged:
        console.print(f"left out (retraining diverged): {', '.join(result.sweep_diverged)}")
    console.print(f"report: {out / 'report.html'} (also report.md, report.json, precision.toml)")


def tune_compression(
    fnet: FloatNet,
    max_sparsity: float | None = None,
    block: int = 4,
    sweep: bool = False,
    max_pe: int | None = None,
    max_simd: int | None = None,
    folding: Path | None = None,
) -> dict[str, Any]:
    """``hwgen tune``'s ``--max-sparsity``, ``--block`` and ``--compression-sweep`` (its cost
    at ``--pe``/``--simd``/``--folding``, as ``hwgen build``) as keywords of the search."""
    from hwgen import emit

    if block < 1:
        raise HwgenError(f"--block {block}: must be a positive integer")
    if max_sparsity is not None and not 0.0 < max_sparsity < 1.0:
        raise HwgenError(f"--max-sparsity {max_sparsity}: must be in (0, 1)")
    for flag, v in (("--pe", max_pe), ("--simd", max_simd)):
        if v is not None and v < 1:
            raise HwgenError(f"{flag} must be a positive integer, not {v}")
    given = (max_pe, max_simd, folding) != (None, None, None)
    if given and not sweep:
        raise HwgenError(
            "--pe, --simd and --folding set the sweep's folding: add --compression-sweep"
        )
    opts = emit.BuildOptions(max_pe, max_simd, emit.load_folding(folding) if folding else None)
    names = {fl.name for fl in fnet.layers}
    unknown = sorted(set(opts.folding or {}) - names)
    if unknown:
        raise HwgenError(f"folding {folding}: the model has no layer {unknown[0]!r}")
    kw: dict[str, Any] = {"max_sparsity": max_sparsity, "block": block}
    return kw | ({"sweep": engine_cost(opts)} if sweep else {})


def engine_cost(opts: BuildOptions) -> CostFn:
    """The sweep's cost function: a network as ``hwgen build`` with ``opts``
    (``emit.BuildOptions``) would fold it, from each engine's ``engine_info``: the weight
    ROMs' bits (scheduled words x width), the slowest engine's ideal cycles (the manifest's
    network ``ideal_cycles``) and the MACs. A folded layer the network lacks (a layer split
    by low rank) takes the limits instead."""
    from dataclasses import replace

    from hwgen import emit
    from hwgen.hw.engine import engine_info
    from hwgen.ir import Flatten
    from hwgen.quant.tune import Cost

    def cost(net: Network) -> Cost:
        folding = {n: f for n, f in (opts.folding or {}).items() if n in net.names}
        foldings, unrolled = emit.choose_build(net, replace(opts, folding=folding))
        infos = [
            engine_info(net, i, *foldings[lyr.name], unrolled.get(lyr.name, "folded"))
            for i, lyr in enumerate(net.layers)
            if not isinstance(lyr, Flatten)
        ]
        return Cost(
            sum(i.rom_depth * i.rom_width for i in infos),
            max(i.ideal_cycles for i in infos),
            sum(i.macs for i in infos),
        )

    return cost


def sweep_table(result: TuneResult) -> Table:
    """The compression sweep's rows, as ``hwgen tune`` prints them."""
    table = titled("compression sweep (at the bits found; cost at the build's folding)")
    for col in ("point", "zero blocks", "accuracy", "ROM bits", "cycles", "MACs"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for p in result.sweep:
        table.add_row(
            p.label,
            f"{p.sparsity:.1%}",
            f"{100 * p.accuracy:.2f}%",
            str(p.cost.rom_bits),
            str(p.cost.cycles),
            str(p.cost.macs),
        )
    return table


def _load_data(path: Path, need_train: bool) -> dict[str, np.ndarray]:
    """``--data`` for quantize and tune: ``x`` (float NCHW calibration images; default
    ``x_train``), optional
    ``y``, ``x_train``/``y_train`` (or ``x``/``y``) for the retrained schemes and
    ``x_test``/``y_test``; every image array finite floats, every label array matching; no
    unpickling."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise HwgenError(f"data {path}: no such file") from None
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise HwgenError(f"data {path}: not a readable .npz of arrays ({e})") from None
    if "x" not in arrays and "x_train" in arrays:
        arrays["x"] = arrays["x_train"]  # a dataset (CIFAR-10) calibrates on its train set
    if "x" not in arrays:
        raise HwgenError(
            f"data {path}: needs an array 'x' or 'x_train' (has: {', '.join(arrays) or 'none'})"
        )
    for xk, yk in (("x", "y"), ("x_train", "y_train"), ("x_test", "y_test")):
        x, y = arrays.get(xk), arrays.get(yk)
        if x is not None and (x.dtype.kind != "f" or x.ndim < 2 or not np.all(np.isfinite(x))):
            raise HwgenError(
                f"data {path}: {xk} must be finite float images (N, ...), "
                f"not {x.dtype} of shape {x.shape}"
            )
        if y is not None and (x is None or y.dtype.kind not in "iu" or y.shape != (len(x),)):
            n = "no" if x is None else len(x)
            raise HwgenError(
                f"data {path}: {yk} must be {n} integer labels, not {y.dtype} of shape {y.shape}"
            )
    if need_train and not ("y_train" in arrays or "y" in arrays):
        raise HwgenError(f"data {path}: retraining needs labels: 'y' (or 'x_train' and 'y_train')")
    return arrays


def _train_arrays(arrays: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``--data``'s training images and labels: ``x_train``/``y_train``, else ``x``/``y``."""
    if arrays is not None and "y_train" in arrays:
        return arrays["x_train"], arrays["y_train"]
    if arrays is not None and "y" in arrays:
        return arrays["x"], arrays["y"]
    return None


def check_hwq_output(path: Path) -> None:
    """An output ``.hwq`` is written only where it replaces nothing but an earlier model."""
    check_output(path, "file")
    if path.exists() and not _is_hwq_archive(path):
        raise HwgenError(f"output {path} exists and is not a .hwq model: not overwriting it")


def _is_hwq_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return hwq.MODEL_JSON in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def retrain_options(scheme: str, epochs: int | None, zero: bool = True) -> dict[str, Any]:
    """``--epochs`` (and ``--no-zero``) as the options of ``scheme``'s retraining (keyword
    arguments of :func:`hwgen.quant.quantize`): INQ's are per step, the learned schemes' in
    all; INQ's options also set the low-rank and pruning retraining."""
    from hwgen.quant.binarize import RetrainOptions
    from hwgen.quant.codebook import CodebookOptions
    from hwgen.quant.inq import InqOptions

    if not zero and scheme != "dqc":
        raise HwgenError(f"--no-zero: only dqc learns a codebook with or without 0, not {scheme}")
    given = {} if epochs is None else {"epochs": epochs}
    options: dict[str, Any] = {}
    if given:
        options["inq_options"] = InqOptions(**given)
    if scheme in ("dqc", "ttq") and (given or not zero):
        options["codebook_options"] = CodebookOptions(**given, zero=zero)
    if scheme in ("bc", "twn", "lab", "lat", "amq") and given:
        options["retrain_options"] = RetrainOptions(**given)
    return options


def _compression(
    p: Precision,
    prune: float | None,
    block: int | None,
    lowrank: int | None,
    lowrank_energy: float | None,
    lowrank_layers: str | None,
) -> Precision:
    """The precision ``p`` with the compression options of ``hwgen quantize`` (checked, one
    line each) in place of the file's; ``--prune`` is applied later, per layer."""
    from dataclasses import replace

    if prune is not None and not 0.0 <= prune < 1.0:
        raise HwgenError(f"--prune {prune}: the pruned fraction must be in [0, 1)")
    for flag, value in (("--block", block), ("--lowrank", lowrank)):
        if value is not None and value < 1:
            raise HwgenError(f"{flag} {value}: must be a positive integer")
    if lowrank_energy is not None and not 0.0 < lowrank_energy <= 1.0:
        raise HwgenError(f"--lowrank-energy {lowrank_energy}: must be in (0, 1]")
    if block is not None:
        p = replace(p, block=block)
    if lowrank is not None or lowrank_energy is not None:
        p = replace(p, lowrank=lowrank, lowrank_energy=lowrank_energy)
    if lowrank_layers is not None:
        if p.lowrank is None and p.lowrank_energy is None:
            raise HwgenError("--lowrank-layers: give --lowrank or --lowrank-energy too")
        p = replace(p, lowrank_layers=tuple(n.strip() for n in lowrank_layers.split(",")))
    return p


def quantize(
    model: str,
    output: Path,
    scheme: str | None = None,
    bits: int | None = None,
    act_bits: int | None = None,
    precision_path: Path | None = None,
    data: Path | None = None,
    epochs: int | None = None,
    prune: float | None = None,
    block: int | None = None,
    lowrank: int | None = None,
    lowrank_energy: float | None = None,
    lowrank_layers: str | None = None,
    zero: bool = True,
) -> None:
    """``hwgen quantize``: quantise a float model to a ``.hwq`` and print its formats (and,
    pruned, each layer's zero blocks; split, the MACs per inference). ``zero`` False: dqc's
    codebooks without a pinned 0 entry."""
    from dataclasses import replace

    from hwgen.frontend import load_model
    from hwgen.frontend.graph import FAdd, FConv2d, FLinear
    from hwgen.ir import Add, Conv2d, Linear, acc_bits
    from hwgen.quant import precision as prec
    from hwgen.quant import quantize as run_quantize
    from hwgen.quant.fakequant import fake_quant_predict
    from hwgen.quant.lowrank import mac_count
    from hwgen.quant.prune import block_sparsity
    from hwgen.quant.quantize import RETRAINED, split_net

    compress = (prune, block, lowrank, lowrank_energy, lowrank_layers)
    if scheme in (None, "auto") and precision_path is None and all(c is None for c in compress):
        from hwgen.frontend import load_quantized

        imported = load_quantized(model)  # a QONNX/QCDQ export keeps its own formats
        if imported is not None:
            if bits is not None or act_bits is not None or epochs is not None:
                raise HwgenError(
                    f"model {model}: is quantized already (QONNX/QCDQ); --bits, --act-bits "
                    "and --epochs do not apply"
                )
            check_hwq_output(output)
            hwq.save(imported, output, meta={"scheme": "imported", "source": Path(model).name})
            for layer in imported.layers:
                if isinstance(layer, (Conv2d, Linear, Add)):
                    wf = getattr(layer, "weight_format", None)
                    print(f"{layer.name}: {f'weights {wf}, ' if wf else ''}out {layer.out_format}")
            print(f"imported {imported.name} (input {imported.input_format}); wrote {output}")
            return
    if scheme is None and precision_path is None:
        raise HwgenError("hwgen quantize: give --scheme or --precision")
    p = prec.load(precision_path) if precision_path is not None else prec.Precision(str(scheme))
    p = _compression(p, *compress)
    effective = scheme or p.scheme
    prec.check_bits(effective, "--bits/--act-bits", bits, act_bits)
    lowranked = p.lowrank is not None or p.lowrank_energy is not None
    compressing = prune is not None or bool(p.pruned) or lowranked
    if epochs is not None and (epochs < 0 or not (effective in RETRAINED or compressing)):
        raise HwgenError(
            f"--epochs {epochs}: needs a retrained scheme ({', '.join(RETRAINED)}), --prune or "
            "--lowrank, epochs >= 0"
        )
    check_hwq_output(output)
    need_train = effective in RETRAINED or compressing
    arrays = _load_data(data, need_train) if data is not None else None
    fnet, dataset = load_model(model, train=_train_arrays(arrays))
    split = split_net(fnet, p)  # the precision names the layers after the low-rank split
    names = [fl.name for fl in split.layers if isinstance(fl, (FConv2d, FLinear))]
    adds = [fl.name for fl in split.layers if isinstance(fl, FAdd)]
    p = prec.for_layers(p, names, adds).override(scheme, bits, act_bits)
    if prune is not None:  # the first layer keeps the file's target (default: dense)
        layers = {n: replace(lp, prune=prune) if n in names[1:] else lp
                  for n, lp in p.layers.items()}  # fmt: skip
        p = replace(p, layers=layers)
    if act_bits is not None:
        p = replace(p, input=replace(p.input, act_bits=act_bits))
    test = None
    if arrays is not None:
        calib = arrays["x"]
        train = _train_arrays(arrays)
        if "y_test" in arrays:
            test = (arrays["x_test"], arrays["y_test"])
        elif "y" in arrays:
            test = (arrays["x"], arrays["y"])
    elif dataset is not None:
        calib, train = dataset.x_train, (dataset.x_train, dataset.y_train)
        test = (dataset.x_test, dataset.y_test)
    else:
        need = "labelled x_train/y_train (retraining)" if need_train else "calibration images 'x'"
        raise HwgenError(f"model {model}: no bundled data; pass --data with {need}")
    options = retrain_options(effective, epochs, zero)
    result = run_quantize(fnet, p, calib, train, **options)
    net = result.net

    table = titled(f"{net.name}: {p.scheme}, input {net.input_format}")
    block = result.precision.block or 1
    pruned = bool(result.precision.pruned)
    cols = ["layer", "op", "weights", "weight format", "output", "acc bits"]
    for col in cols + ([f"zero blocks of {block}"] if pruned else []):
        table.add_column(col)
    for layer in net.layers:
        if isinstance(layer, (Conv2d, Linear)):
            zeros = [f"{block_sparsity(layer.weight, block):.1%}"] if pruned else []
            table.add_row(
                layer.name,
                type(layer).__name__ + (" + ReLU" if layer.relu else ""),
                str(layer.weight.size),
                str(layer.weight_format)
                + (f" x scale {layer.scale_format}" if layer.scale_format else ""),
                str(layer.out_format),
                str(acc_bits(layer, net.in_format(layer))),
                *zeros,
            )
        elif isinstance(layer, Add):
            op = "Add" + (" + ReLU" if layer.relu else "")
            blank = [""] if pruned else []
            table.add_row(layer.name, op, "", "", str(layer.out_format), "", *blank)
    console = make_console()
    console.print(table)
    meta = result.meta | {"source": Path(model).name, "precision": prec.dumps(result.precision)}
    if not zero:
        meta["codebook_zero"] = False
    if lowranked and result.float_net is not None:
        before, after = sum(mac_count(fnet).values()), sum(mac_count(result.float_net).values())
        meta["lowrank"] |= {"macs": after, "macs_before": before}
        console.print(f"MACs per inference: {after} ({after / before:.2f}x the {before} unsplit)")
    if test is not None:
        acc = float(np.mean(fake_quant_predict(net, test[0]) == test[1]))
        meta["test_accuracy"] = acc
        console.print(f"fake-quantised test accuracy: {100 * acc:.2f}% ({len(test[1])} images)")
    hwq.save(net, output, meta=meta)
    console.print(f"wrote {output}")


def clamp_warnings(
    net: Network, max_pe: int | None, max_simd: int | None, fixed: Collection[str] = ()
) -> list[str]:
    """One line per layer whose ``--pe``/``--simd`` limit was lowered to a divisor of its
    channels (Cout 6 with ``--pe 4`` gives PE 3); not when the layer is simply narrower than
    the limit, and not for layers whose folding is ``fixed`` (``--folding``)."""
    from hwgen.emit import DEFAULT_MAX_PE, DEFAULT_MAX_SIMD
    from hwgen.hw.engine import choose_folding
    from hwgen.ir import Conv2d, Flatten, Linear

    lines = []
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Flatten) or layer.name in fixed:
            continue
        got = choose_folding(net, i, max_pe or DEFAULT_MAX_PE, max_simd or DEFAULT_MAX_SIMD)
        full = choose_folding(net, i, sys.maxsize, sys.maxsize)  # every channel in parallel
        mac = isinstance(layer, (Conv2d, Linear))
        checks = [("--pe", "PE", max_pe, got[0], full[0], "output " if mac else "")]
        if mac:  # SIMD is meaningless without MACs (always equal to PE)
            checks.append(("--simd", "SIMD", max_simd, got[1], full[1], "input "))
        for flag, what, asked, chosen, channels, kind in checks:
            if asked is not None and chosen < min(asked, channels):
                lines.append(
                    f"layer {layer.name}: {flag} {asked} gives {what} {chosen}, the largest "
                    f"divisor of its {channels} {kind}channels up to {asked}"
                )
    return lines


def build(
    model: Path,
    output: Path,
    max_pe: int | None,
    max_simd: int | None,
    folding: Path | None,
    rom_style: str,
    vectors: int,
    board: str | None = None,
    clock_mhz: float | None = None,
    baud: int = 115200,
    target_fps: float | None = None,
    device: str | None = None,
    engine: str = "folded",
    pnr_seed: int | None = None,
) -> None:
    """``hwgen build``: Verilog, ROM hex, manifest, vectors and folding.toml for a ``.hwq``."""
    from hwgen import emit
    from hwgen.hw.folding import build_target, plan

    for what, v in (("--pe", max_pe), ("--simd", max_simd), ("--vectors", vectors)):
        if v is not None and v < 1:
            raise HwgenError(f"{what} must be a positive integer, not {v}")
    check_output(output, "folder")
    opts = emit.BuildOptions(
        max_pe,
        max_simd,
        emit.load_folding(folding) if folding else None,
        rom_style,
        vectors,
        board=board,
        board_mhz=clock_mhz,
        baud=baud,
        pnr_seed=pnr_seed,
        target_fps=target_fps,
        device=device,
        engine=engine,
        engines=emit.load_engines(folding) if folding else None,
    )
    net = hwq.load(model)
    console = make_console()
    manifest = emit.build(net, output, opts, hwq.load_meta(model), phase=Phases(console))
    if target_fps is None and device is None:  # with a target the limits only cap a search
        # After the build: a refused build stays one error line, with no warning before it.
        fixed = [*(opts.folding or {}), *manifest["engines"]]
        for line in clamp_warnings(net, max_pe, max_simd, fixed):
            print(f"hwgen: warning: {line}", file=sys.stderr)
    dev, clock = build_target(device, board, clock_mhz)
    total = plan(net, manifest["foldings"], dev, clock, manifest["engines"])
    est = {p.name: p for p in total.layers}
    table = titled(f"hwgen build {manifest['model']} -> {output}")
    for col in ("layer", "engine", "PE x SIMD", "in", "out", "acc bits", "ROM", "cycles"):
        table.add_column(col)
    for col in ("LUT4 est.", "BRAM est."):
        table.add_column(col, justify="right")
    for e in manifest["layers"]:
        p = est[e["name"]]
        rom = f"{e['rom_depth']}x{e['rom_width']} {p.rom_storage}" if e["rom_depth"] else ""
        table.add_row(
            e["name"],
            f"{e['kind']} unrolled" if e["name"] in manifest["engines"] else e["kind"],
            f"{e['pe']} x {e['simd']}",
            e["in_format"],
            e["out_format"],
            str(e["acc_bits"] or ""),
            rom,
            str(p.cycles),
            str(p.luts),
            str(p.brams),
        )
    console.print(table)
    # Below the table, not its caption: a caption is wrapped to the table's width.
    console.print(
        f"{dev} at {clock:g} MHz: {total.cycles} cycles per image -> {total.fps:,.0f} "
        f"inferences/s; ~{total.luts} LUT4, ~{total.brams} block RAMs "
        f"(skip FIFOs {total.fifo_blocks}); folding in {output / 'folding.toml'}",
        highlight=False,
    )
    print(f"wrote {output}: top {manifest['top']['axi_module']} ({output / 'files.f'})")
    if "board" in manifest:
        b = manifest["board"]
        print(
            f"bitstream: {output / b['bitstream']} ({b['name']}, network at "
            f"{b['clock_mhz']:g} MHz, UART {b['baud']} baud)"
        )


def sim(
    build_dir: Path,
    targets: list[str] | None,
    simulator: str,
    images: int | None,
    stalls: float,
    waves: bool,
    seed: int,
) -> bool:
    """``hwgen sim``: each target's engine against its golden vectors; True if all match."""
    from hwgen.simulate import load_manifest, simulate_layer

    manifest = load_manifest(build_dir)
    names = targets or [e["name"] for e in manifest["layers"]]
    table = titled(f"hwgen sim {build_dir} ({simulator}, stalls {stalls})")
    for col in ("layer", "outputs checked", "mismatches", "cycles", "ideal cycles"):
        table.add_column(col)
    failures, summary = [], []
    console = make_console()
    phases = Phases(console)
    for k, name in enumerate(names, 1):
        with phases(f"simulate {name} ({k}/{len(names)})"):
            r = simulate_layer(
                build_dir, name, stalls, seed, vectors=images, simulator=simulator, waves=waves
            )
        table.add_row(
            name, str(r.outputs_checked), str(r.mismatches), str(r.cycles), str(r.ideal_cycles)
        )
        if not r.ok:
            failures.append(f"{r.first_mismatch} (waveform: {r.waves})")
        if name == "network":
            summary.append(
                f"RTL == golden: {r.images_equal}/{r.images} images; "
                f"{r.cycles / r.images:.0f} cycles per inference (pipelined)"
            )
    console.print(table)
    for line in summary:
        console.print(line, highlight=False)
    for f in failures:
        print(f"MISMATCH {f}", file=sys.stderr)
    return not failures


def synth(build_dir: Path, device: str | None, target_mhz: float) -> None:
    """``hwgen synth``: resources per layer and Fmax of the whole design, as a report."""
    from hwgen.report import write_synth_report
    from hwgen.simulate import load_manifest
    from hwgen.synth import synth_build

    manifest = load_manifest(build_dir)
    # Before minutes of Yosys and nextpnr.
    check_output(build_dir / "reports", "folder", replaced=False)
    device = device or (manifest.get("board") or {}).get("device") or "ecp5-85f"
    console = make_console()
    doc = synth_build(build_dir, device, target_mhz, phase=Phases(console))
    out = write_synth_report(build_dir, doc)
    table = titled(f"hwgen synth {build_dir} ({device}, target {target_mhz:g} MHz)")
    for col in ("layer", "LUT4", "FF", "BRAM", "DSP"):
        table.add_column(col)
    for name, d in doc["layers"].items():
        table.add_row(name, str(d["luts"]), str(d["ffs"]), str(d["brams"]), str(d["dsps"]))
    table.add_row(
        "network",
        str(doc["luts"]),
        str(doc["ffs"]),
        str(doc["brams"]),
        str(doc["dsps"]),
        style="bold",
    )
    console.print(table)
    console.print(
        f"Fmax {doc['fmax_mhz']:.1f} MHz, {doc['cycles_per_inference']:g} cycles "
        f"per inference -> {doc['inferences_per_second']:,.0f} inferences/s",
        highlight=False,
    )
    path = doc["critical_path"]
    if path:
        console.print(
            f"critical path {path['delay_ns']:.2f} ns: {path['cells'][0]} -> {path['cells'][-1]}",
            highlight=False,
        )
    print(f"report: {out / 'synth.html'} (also synth.md, synth.json)")


def run(port: str, build_dir: Path, images_path: Path, baud: int | None) -> None:
    """``hwgen run``: send images to a board built with ``--board``; print the classes."""
    from hwgen.host import Wire, open_port, run_images
    from hwgen.ir import ActFormat
    from hwgen.simulate import load_manifest

    manifest = load_manifest(build_dir)
    board = manifest.get("board")
    if board is None:
        raise HwgenError(f"{build_dir} was built without --board: there is no board to talk to")
    if "input" not in manifest:
        raise HwgenError(f"{build_dir} was built by an older hwgen: build it again")
    fmt = ActFormat(**manifest["input"])
    x = load_npy(images_path, "images")
    if x.dtype.kind == "f":
        x = gm.quantize_input(x, fmt)
    shape = tuple(manifest["input_shape"])
    if x.ndim != 1 + len(shape) or x.shape[1:] != shape:
        raise HwgenError(f"images have shape {x.shape}, expected (N, {', '.join(map(str, shape))})")
    if x.size and (x.min() < fmt.lo or x.max() > fmt.hi):
        raise HwgenError(f"image values must be in the input format {fmt} [{fmt.lo}, {fmt.hi}]")
    wire = Wire(fmt.bits, fmt.signed, manifest["outputs"], manifest["output_signed"])
    conn = open_port(port, baud or board["baud"])
    for k, (cls, logits) in enumerate(run_images(conn, x, wire)):
        print(f"image {k}: class {cls}  logits {' '.join(map(str, logits.tolist()))}")
