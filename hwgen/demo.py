"""``hwgen demo``: the whole flow on the built-in digits example, end to end.

train → tune INQ (its first trial is INQ 5-bit; then greedy per-layer bits, every trial
retrained, within 0.5 points; report) → build the tuned network → whole-network RTL
simulation of every test image → synthesis, then a summary with the time of each step.
Every artifact stays in the output folder: ``digits.hwq``, ``tune/`` (the tuning report
set), ``build/`` (Verilog, vectors, ``reports/synth.*``). Training and INQ are
machine-independent (:mod:`hwgen.reproducible`), so the accuracies are the same everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from hwgen import golden, hwq
from hwgen.emit import BuildOptions, build
from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.quant.tune import float_accuracy, tune
from hwgen.report import write_synth_report, write_tuning_report
from hwgen.simulate import simulate_layer
from hwgen.synth import synth_build

# Lanes per layer: enough to keep the digits network fast in simulation and small on chip.
DEMO_MAX_PE, DEMO_MAX_SIMD = 4, 4
# fc at 4 lanes (640 cycles, under conv1's 1152) instead of 8: the same inferences per
# second for fewer LUTs (at 92e48d0: 2,944 against 2,998 LUT4; 162.4 against 161.2 MHz).
DEMO_FOLDING = {"fc": (1, 4)}


def run(out: Path, console: Console | None = None) -> dict[str, float | int | str]:
    """Run the demo into ``out``; returns the summary figures."""
    console = console or Console()
    out = Path(out)
    if out.exists() and not (out / "digits.hwq").exists() and any(out.iterdir()):
        raise HwgenError(f"{out} exists and is not a hwgen demo folder: choose another -o")
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    @contextmanager
    def step(key: str, text: str) -> Iterator[None]:
        console.print(f"[bold]▸ {text}[/bold]  [dim]({time.perf_counter() - t0:.0f} s)[/dim]")
        start = time.perf_counter()
        yield
        times[key] = time.perf_counter() - start

    with step("train", "train the digits CNN (scikit-learn's bundled 8x8 digits, fixed split)"):
        fnet, data = digits_float_net()
    float_acc = float_accuracy(fnet, data.x_test, data.y_test)

    with step("tune", "tune: INQ 5-bit, then per-layer bits within 0.5 points (report, plots)"):
        train = (data.x_train, data.y_train)
        tuned = tune(fnet, "inq", data.x_train, data.x_test, data.y_test, 0.5, train)
        write_tuning_report(out / "tune", tuned)
    start = tuned.trials[0]  # INQ at the scheme's default: 5-bit weights, 8-bit activations
    assert start.phase == "start"
    net = tuned.net
    hwq.save(net, out / "digits.hwq", meta=tuned.quant.meta | {"source": "digits"})

    images = len(data.x_test)
    with step("build", "build: Verilog engines, ROMs, manifest, vectors for every test image"):
        build(
            net,
            out / "build",
            BuildOptions(DEMO_MAX_PE, DEMO_MAX_SIMD, DEMO_FOLDING, vectors=images),
            {"source": "digits"},
        )

    sim_text = f"simulate: the whole network in Verilator (cocotb), {images} test images"
    with step("simulate", sim_text):
        sim = simulate_layer(out / "build", "network", vectors=images)
    rtl = np.load(sim.rtl_output).reshape(images, -1)
    gold = golden.forward(net, golden.quantize_input(data.x_test, net.input_format))[-1]
    if not sim.ok:
        console.print(f"[red]MISMATCH {sim.first_mismatch} (waveform: {sim.waves})[/red]")
    rtl_acc = float((rtl.argmax(1) == data.y_test).mean())
    same = int(sum(np.array_equal(a, b) for a, b in zip(rtl, gold, strict=True)))

    with step("synthesise", "synthesise: Yosys + nextpnr (ECP5-85F, target 150 MHz)"):
        doc = synth_build(out / "build", "ecp5-85f", 150.0)
        write_synth_report(out / "build", doc)

    summary = {
        "float accuracy": f"{100 * float_acc:.2f}%",
        "INQ 5-bit accuracy (golden model)": f"{100 * start.accuracy:.2f}%, "
        f"{start.rom_bits} weight ROM bits",
        "tuned INQ accuracy (golden model)": f"{100 * tuned.accuracy:.2f}%, "
        f"{tuned.rom_bits} weight ROM bits",
        "RTL accuracy": f"{100 * rtl_acc:.2f}%",
        "RTL == golden": f"{same}/{images} images",
        "LUT4 / FF / BRAM / DSP": f"{doc['luts']} / {doc['ffs']} / {doc['brams']} / {doc['dsps']}",
        "Fmax (ECP5-85F)": f"{doc['fmax_mhz']:.1f} MHz",
        "cycles per inference": f"{doc['cycles_per_inference']:g}",
        "inferences per second": f"{doc['inferences_per_second']:,.0f}",
        **{f"time: {k}": f"{v:.0f} s" for k, v in times.items()},
        "time: total": f"{time.perf_counter() - t0:.0f} s",
    }
    table = Table(title="hwgen demo: digits", show_header=False)
    for k, v in summary.items():
        table.add_row(k, v)
    console.print(table)
    console.print(
        f"artifacts: {out}/digits.hwq, {out}/tune/report.html, "
        f"{out}/build/ (files.f, reports/synth.html)"
    )
    if same != images:
        raise HwgenError(f"RTL differs from the golden model on {images - same} images")
    return summary
