"""Reports a user reads to choose the next bit widths: markdown, html, json and PNG plots.

A report is a list of :class:`Section`\\ s, each a title, content blocks (paragraphs,
tables, figures) and a JSON payload under its own key. The tuning sections come from
:func:`tuning_sections`; other stages (synthesis) add their own sections to the same
writer. :func:`write_report` renders every format into a temporary folder and renames it
into place, so a failed run leaves nothing half-written. The content is deterministic:
no timestamps, no absolute paths, PNGs without version metadata.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure as MplFigure

from hwgen import hwq
from hwgen.errors import HwgenError
from hwgen.fsutil import atomic_write_bytes
from hwgen.ir import ActFormat, Add, Codebook, Conv2d, Fixed, Linear, Planes, Pow2, WeightFormat
from hwgen.quant.precision import dumps
from hwgen.quant.tune import SweepPoint, TuneResult, format_layers, layer_rom_bits

REPORT_FILES = ("report.md", "report.html", "report.json", "precision.toml")
_MAX_LEVEL_LINES = 128  # beyond this a fixed grid is drawn as its range only


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Plot:
    """A PNG written to ``plots/<file>``, shown inline in the html."""

    file: str
    caption: str
    png: bytes = field(repr=False)


Block = str | Table | Plot  # a str is a paragraph of plain text


@dataclass(frozen=True)
class Section:
    key: str  # the section's key in report.json
    title: str
    blocks: tuple[Block, ...]
    data: Any = None  # JSON-serialisable payload (None: not in report.json)


# ---------------------------------------------------------------- rendering


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Table):
                out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
                out.append("|" + "---|" * len(b.header))
                out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
            elif isinstance(b, Plot):
                out.append(f"![{b.caption}](plots/{b.file})")
            else:
                out.append(b)
            out.append("")
    return "\n".join(out)


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}"
    "th{background:#eee}figure{display:inline-block;margin:0.5em}"
    "img{max-width:520px}figcaption{font-size:90%;color:#555}"
)


def render_html(title: str, sections: Sequence[Section]) -> str:
    """One self-contained page: the plots are embedded as data URIs, every text escaped."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for sec in sections:
        out.append(f'<h2 id="{e(sec.key)}">{e(sec.title)}</h2>')
        for b in sec.blocks:
            if isinstance(b, Table):
                out.append("<table>")
                out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows]
                out.append("</table>")
            elif isinstance(b, Plot):
                src = "data:image/png;base64," + base64.b64encode(b.png).decode()
                out.append(
                    f'<figure><img src="{src}" alt="{e(b.caption)}">'
                    f"<figcaption>{e(b.caption)} (plots/{e(b.file)})</figcaption></figure>"
                )
            else:
                out.append(f"<p>{e(b)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_json(title: str, sections: Sequence[Section]) -> str:
    doc: dict[str, Any] = {"title": title}
    doc |= {sec.key: sec.data for sec in sections if sec.data is not None}
    return json.dumps(doc, indent=2) + "\n"


def _is_report_dir(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or (path / "report.json").is_file())


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse an output folder that exists and is not an earlier report (before any work)."""
    path = Path(path)
    if path.exists() and not _is_report_dir(path):
        raise HwgenError(
            f"output {path} exists and is not an hwgen report folder; choose another -o"
        )
    return path


def write_report(
    out_dir: str | os.PathLike,
    title: str,
    sections: Sequence[Section],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write report.md/.html/.json, plots/*.png and ``extra_files`` into ``out_dir`` atomically.

    Everything goes into a temporary sibling folder that is renamed into place; an earlier
    report in ``out_dir`` is replaced only once the new one is complete.
    """
    out = check_output_dir(out_dir)
    files = {
        "report.md": render_markdown(title, sections).encode(),
        "report.html": render_html(title, sections).encode(),
        "report.json": render_json(title, sections).encode(),
        **(extra_files or {}),
    }
    figures = [b for s in sections for b in s.blocks if isinstance(b, Plot)]
    files |= {f"plots/{f.file}": f.png for f in figures}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        new = tmp / "new"
        for name, data in files.items():
            (new / name).parent.mkdir(parents=True, exist_ok=True)
            (new / name).write_bytes(data)
        if out.exists():
            os.replace(out, tmp / "old")
        try:
            os.replace(new, out)
        except BaseException:
            if (tmp / "old").exists():
                os.replace(tmp / "old", out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- plots


def _png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


def _curve_axes(
    ax: Any, curve: list[tuple[int, float]], chosen: int | None, what: str, xlabel: str
) -> None:
    xs = [c[0] for c in curve]
    ys = [c[1] for c in curve]
    ax.plot(xs, ys, "o-", color="tab:blue", label="candidates")
    if chosen is not None and chosen in xs:
        ax.plot(
            [chosen],
            [ys[xs.index(chosen)]],
            "o",
            ms=12,
            mfc="none",
            mec="tab:red",
            mew=2,
            label=f"chosen {chosen}",
        )
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("squared error")
    ax.set_title(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def error_plot(name: str, result: TuneResult) -> Plot:
    """Weight and activation error vs fraction length (emax for powers of two), chosen marked."""
    q, lp = result.quant, result.precision.layer(name)
    wcurve, acurve = q.weight_curves.get(name, []), q.act_curves.get(name, [])
    panels = [c for c in (wcurve, acurve) if c] or [[]]
    fig = MplFigure(figsize=(4.2 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    col = 0
    if wcurve:
        pow2 = lp.emax is not None
        chosen = lp.emax if pow2 else lp.weight_frac
        _curve_axes(
            axes[0][col],
            wcurve,
            chosen,
            f"{name}: weights",
            "emax" if pow2 else "weight fraction length",
        )
        col += 1
    if acurve:
        _curve_axes(
            axes[0][col],
            acurve,
            lp.act_frac,
            f"{name}: output activations",
            "activation fraction length",
        )
    fig.tight_layout()
    return Plot(f"{name}_error.png", f"{name}: quantisation error vs fraction length", _png(fig))


def input_error_plot(result: TuneResult) -> Plot | None:
    curve = result.quant.act_curves.get("input")
    if not curve:
        return None
    fig = MplFigure(figsize=(4.2, 3.2))
    ax = fig.subplots()
    _curve_axes(
        ax, curve, result.precision.input.act_frac, "network input", "activation fraction length"
    )
    fig.tight_layout()
    return Plot("input_error.png", "input: quantisation error vs fraction length", _png(fig))


def weight_levels(fmt: WeightFormat) -> np.ndarray:
    """Every real value a weight of ``fmt`` can take, ascending."""
    if isinstance(fmt, Fixed):
        return np.arange(fmt.lo, fmt.hi + 1, dtype=np.float64) * 2.0**-fmt.frac
    if isinstance(fmt, Codebook):
        return np.asarray(fmt.entries, np.float64) * 2.0**-fmt.frac
    if isinstance(fmt, Planes):  # every channel's signed sums of its plane scales
        return np.unique(fmt.values()).astype(np.float64) * 2.0**-fmt.frac
    assert isinstance(fmt, Pow2)
    mags = 2.0 ** np.arange(fmt.emin, fmt.emax + 1)
    levels = np.concatenate([-mags[::-1], [0.0] if fmt.has_zero else [], mags])
    return levels


def layer_levels(layer: Conv2d | Linear) -> tuple[np.ndarray, str]:
    """The real weight values of a layer, ascending, and what they are in words.

    A per-channel scale ``m_c`` (bc, twn, lab, lat) multiplies each channel's codes: the
    levels are ``code · m_c`` over the codes and channels. amq's Planes weights are sums of
    its scaled binary planes: the levels are their values over the channels, ``2**M`` each.
    Otherwise the format's grid (:func:`weight_levels`).
    """
    fmt = layer.weight_format
    if layer.scale is not None and layer.scale_format is not None:
        codes = weight_levels(fmt) * 2.0**fmt.frac  # integer codes
        real = codes[:, None] * layer.scale[None, :] * 2.0 ** -(fmt.frac + layer.scale_format.frac)
        levels = np.unique(real)
        return levels, f"codes {fmt} x {layer.weight.shape[0]} channel scales"
    if isinstance(fmt, Planes):
        return weight_levels(fmt), f"sums of {fmt.planes} binary planes x {fmt.channels} channels"
    if isinstance(fmt, Codebook):
        return weight_levels(fmt), f"codebook of {len(fmt.entries)} entries"
    return weight_levels(fmt), str(fmt)


def histogram_plot(name: str, w: np.ndarray, layer: Conv2d | Linear) -> Plot:
    """Histogram of the float weights with the quantisation levels of ``layer`` drawn on it."""
    w = np.asarray(w, np.float64).ravel()
    fig = MplFigure(figsize=(6, 3.2))
    ax = fig.subplots()
    levels, what = layer_levels(layer)
    lim = max(float(np.abs(w).max(initial=0.0)), float(np.abs(levels).max())) * 1.05 or 1.0
    if len(levels) <= _MAX_LEVEL_LINES:
        for v in levels:
            ax.axvline(v, color="tab:red", lw=0.6, alpha=0.7, zorder=3)
        note = f"{len(levels)} levels"
    else:
        for v in (levels[0], levels[-1]):
            ax.axvline(v, color="tab:red", lw=1.0, zorder=3)
        on_grid = isinstance(layer.weight_format, Fixed)
        step = f", step {2.0**-layer.weight_format.frac:g}" if on_grid else ""
        note = f"{len(levels)} levels{step} (range drawn)"
    ax.hist(w, bins=min(100, max(10, w.size // 10)), range=(-lim, lim), color="tab:blue")
    ax.set_xlim(-lim, lim)
    ax.set_title(f"{name}: weights, {what} ({note})", fontsize=9)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    fig.tight_layout()
    return Plot(f"{name}_hist.png", f"{name}: float weights and the levels of {what}", _png(fig))


def prefix_plot(result: TuneResult) -> Plot:
    steps = result.prefix_accuracy
    fig = MplFigure(figsize=(max(5.0, 0.7 * len(steps) + 2), 3.4))
    ax = fig.subplots()
    xs = np.arange(len(steps))
    ax.plot(xs, [100 * a for _, a in steps], "o-", color="tab:blue", label="quantised prefix")
    floor = 100 * result.float_accuracy - result.max_drop_points
    ax.axhline(floor, color="tab:red", ls="--", label=f"budget ({result.max_drop_points:g} points)")
    ax.set_xticks(xs, [s for s, _ in steps], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy as layers are quantised one by one (rest float)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Plot("prefix_accuracy.png", "accuracy with the first k layers quantised", _png(fig))


def trials_plot(result: TuneResult) -> Plot:
    """Accuracy against weight ROM bits for every trial of the search, one marker per way of
    measuring (``Trial.method``), accepted filled, the chosen one ringed, the budget dashed."""
    fig = MplFigure(figsize=(7, 5.5))
    ax = fig.subplots()
    methods = list(dict.fromkeys(t.method for t in result.trials))
    for k, method in enumerate(methods):
        marker = "osD^v"[k % 5]
        for accepted, color in ((True, "tab:green"), (False, "tab:red")):
            pts = [
                (t.rom_bits, 100 * t.accuracy)
                for t in result.trials
                if t.method == method and t.accepted == accepted
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker,
                    color=color,
                    mfc=color if accepted else "none",
                    ls="none",
                    label=f"{'accepted' if accepted else 'rejected'}: {method}",
                )
    at: dict[tuple[int, float], list[int]] = {}  # trials on the same point share a label
    for i, t in enumerate(result.trials):
        at.setdefault((t.rom_bits, 100 * t.accuracy), []).append(i)
    for xy, idx in at.items():
        label = _ranges(idx).split(" ", 1)[1]
        ax.annotate(label, xy, fontsize=6, xytext=(3, 2), textcoords="offset points")
    chosen = ([result.rom_bits], [100 * result.accuracy])
    ax.plot(*chosen, "o", ms=14, mfc="none", mec="black", label="chosen")
    floor = 100 * result.float_accuracy - result.max_drop_points
    ax.axhline(
        floor, color="tab:red", ls="--", lw=1, label=f"budget (float - {result.max_drop_points:g})"
    )
    ax.axhline(100 * result.float_accuracy, color="tab:blue", ls=":", lw=1, label="float")
    ax.set_xlabel("weight ROM bits")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("every trial of the search (numbers: trial #)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    return Plot("trials.png", "accuracy vs weight ROM bits, every trial", _png(fig))


def _sweep_axes(ax: Any, xs: list[float], points: list[SweepPoint], result: TuneResult) -> None:
    """Accuracy on the left axis; ROM bits and cycles, as fractions of the dense point's, on
    the right."""
    dense = result.sweep[0].cost
    ax.plot(xs, [100 * p.accuracy for p in points], "o-", color="tab:blue", label="accuracy")
    floor = 100 * result.float_accuracy - result.max_drop_points
    ax.axhline(floor, color="tab:red", ls="--", lw=1, label="budget")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    cost = ax.twinx()
    for key, color, marker in (("rom_bits", "tab:green", "s--"), ("cycles", "tab:orange", "^:")):
        ys = [getattr(p.cost, key) / max(getattr(dense, key), 1) for p in points]
        cost.plot(xs, ys, marker, color=color, label=key.replace("_", " ") + " / dense")
    cost.set_ylabel("fraction of the dense build")
    cost.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = cost.get_legend_handles_labels()
    ax.legend(
        lines[0] + more[0],
        lines[1] + more[1],
        fontsize=7,
        ncol=2,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
    )


def sparsity_plot(result: TuneResult) -> Plot:
    """Accuracy, ROM bits and cycles against the measured fraction of zero blocks."""
    points = [p for p in result.sweep if p.kind in ("dense", "sparsity")]
    fig = MplFigure(figsize=(5.6, 4.4))
    ax = fig.subplots()
    xs = [100 * p.sparsity for p in points]
    _sweep_axes(ax, xs, points, result)
    for x, p in zip(xs, points, strict=True):
        ax.annotate(p.label, (x, 100 * p.accuracy), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("zero blocks (% of all blocks)")
    ax.set_title("accuracy vs sparsity", fontsize=10)
    fig.tight_layout()
    return Plot("sparsity.png", "accuracy, ROM bits and cycles vs block sparsity", _png(fig))


def rank_plot(result: TuneResult) -> Plot:
    """Accuracy, ROM bits and cycles against the conv layers' rank (the dense point last)."""
    points = [p for p in result.sweep if p.kind == "rank"] + [result.sweep[0]]
    fig = MplFigure(figsize=(5.6, 4.4))
    ax = fig.subplots()
    xs = list(range(len(points)))
    _sweep_axes(ax, xs, points, result)
    ax.set_xticks(xs, [str(p.target) if p.kind == "rank" else "full" for p in points])
    ax.set_xlabel("rank of the conv layers (Kx1 then 1xK)")
    ax.set_title("accuracy vs rank", fontsize=10)
    fig.tight_layout()
    return Plot("rank.png", "accuracy, ROM bits and cycles vs low rank", _png(fig))


# ---------------------------------------------------------------- the tuning sections


def _pct(a: float) -> str:
    return f"{100 * a:.2f}%"


def _format_json(f: ActFormat) -> dict[str, Any]:
    return {"bits": f.bits, "frac": f.frac, "signed": f.signed}


def layer_rows(result: TuneResult) -> list[dict[str, Any]]:
    """Per conv/linear and add layer: formats, ROM bits and accuracy impact (the JSON of the
    layer table). An add has no weights: its row has ``in_formats`` (both inputs), no weight
    keys and 0 ROM bits."""
    net = result.net
    docs = {d["name"]: d for d in hwq.to_json(net)["layers"]}
    impact = dict(result.prefix_accuracy)
    steps = [n for n, _ in result.prefix_accuracy]
    rows = []
    for layer in format_layers(net):
        ldoc = docs[layer.name]
        prev = steps[steps.index(layer.name) - 1]
        row: dict[str, Any] = {"name": layer.name, "op": ldoc["op"], "inputs": list(layer.inputs)}
        if isinstance(layer, Add):
            row |= {
                "out_shape": ldoc["out_shape"],
                "in_formats": [_format_json(net.formats[i]) for i in layer.inputs],
                "out_format": ldoc["out_format"],
                "rom_bits": 0,
            }
        else:
            row |= {
                "weight_shape": list(layer.weight.shape),
                "out_shape": ldoc["out_shape"],
                "weights": int(layer.weight.size),
                "weight_format": ldoc["weight_format"],
                "in_format": _format_json(net.in_format(layer)),
                "out_format": ldoc["out_format"],
                "rom_bits": layer_rom_bits(layer, block=result.block),
            }
            if result.block is not None:
                row["prune"] = result.precision.pruned.get(layer.name, 0.0)
        row["accuracy_impact_points"] = round(100 * (impact[layer.name] - impact[prev]), 6)
        rows.append(row)
    return rows


def _methods_text(result: TuneResult) -> str:
    """In words: how the trials were quantised, and that every accuracy was measured."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(result.trials):
        groups.setdefault(t.method, []).append(i)
    parts = [f"{method} for {_ranges(idx)}" for method, idx in groups.items()]
    return (
        f"Every accuracy below is measured: the integer golden model on the "
        f"{result.eval_size} evaluation images, nothing estimated. Trials were quantised by "
        + "; ".join(parts)
        + "."
    )


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"trials 0-2, 5"``."""
    spans: list[list[int]] = []
    for i in idx:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)
    return ("trial " if len(idx) == 1 else "trials ") + text


def tuning_sections(result: TuneResult) -> list[Section]:
    """Summary, per-layer table, prefix accuracy, search log and per-layer plots."""
    net = result.net
    rows = layer_rows(result)
    summary = {
        "model": result.model,
        "scheme": result.scheme,
        "max_drop_points": result.max_drop_points,
        "eval_images": result.eval_size,
        "float_accuracy": result.float_accuracy,
        "quant_accuracy": result.accuracy,
        "drop_points": round(result.drop_points, 6),
        "within_budget": result.within_budget,
        "rom_bits": result.rom_bits,
        "rom_bits_8bit": result.rom_bits_8bit,
        "input_format": hwq.to_json(net)["input"]["format"],
    }
    verdict = "within" if result.within_budget else "OVER"
    totals = Table(
        ("quantity", "value"),
        (
            ("model", result.model),
            ("scheme", result.scheme),
            ("evaluation images", str(result.eval_size)),
            ("float accuracy", _pct(result.float_accuracy)),
            ("quantised accuracy", _pct(result.accuracy)),
            (
                "drop",
                f"{result.drop_points:.2f} points ({verdict} the budget of "
                f"{result.max_drop_points:g})",
            ),
            ("input format", str(net.input_format)),
            (
                "weight ROM bits",
                f"{result.rom_bits} ({result.rom_bits / result.rom_bits_8bit:.1%} of 8-bit)"
                + ("" if result.block is None else f", nonzero blocks of {result.block} only"),
            ),
            ("8-bit baseline ROM bits", str(result.rom_bits_8bit)),
        ),
    )
    layer_table = Table(
        (
            "layer",
            "op",
            "weight shape",
            "out shape",
            "weight format",
            "act format",
            "ROM bits",
            "accuracy impact",
        ),
        tuple(
            (
                r["name"],
                r["op"],
                "x".join(map(str, r["weight_shape"])) if "weight_shape" in r else "-",
                "x".join(map(str, r["out_shape"])),
                "-" if isinstance(lyr, Add) else str(lyr.weight_format),
                str(lyr.out_format),
                str(r["rom_bits"]),
                f"{r['accuracy_impact_points']:+.2f} points",
            )
            for r, lyr in zip(rows, format_layers(net), strict=True)
        ),
    )
    prefix = [{"step": s, "accuracy": a} for s, a in result.prefix_accuracy]
    trials = [
        {
            "phase": t.phase,
            "layer": t.layer,
            "change": t.change,
            "accuracy": t.accuracy,
            "rom_bits": t.rom_bits,
            "accepted": t.accepted,
            "method": t.method,
        }
        for t in result.trials
    ]
    trial_table = Table(
        ("#", "phase", "layer", "change", "accuracy", "ROM bits", "accepted", "quantised by"),
        tuple(
            (
                str(i),
                t.phase,
                t.layer,
                t.change,
                _pct(t.accuracy),
                str(t.rom_bits),
                "yes" if t.accepted else "no",
                t.method,
            )
            for i, t in enumerate(result.trials)
        ),
    )
    q = result.quant
    curves = {
        n: {
            "weight": [list(p) for p in q.weight_curves.get(n, [])],
            "act": [list(p) for p in q.act_curves.get(n, [])],
        }
        for n in ["input", *net.names]
        if n in q.weight_curves or n in q.act_curves
    }
    figures: list[Block] = []
    inp = input_error_plot(result)
    if inp is not None:
        figures.append(inp)
    for layer in format_layers(net):
        figures.append(error_plot(layer.name, result))
        if layer.name in q.float_weights:
            figures.append(histogram_plot(layer.name, q.float_weights[layer.name], layer))
    sections = [
        Section(
            "summary",
            "Summary",
            (
                "Accuracy is measured with the integer golden model on the evaluation set; "
                "ROM bits are the sum over layers of weights x weight bits.",
                totals,
            ),
            summary,
        ),
        Section(
            "layers",
            "Layers",
            (
                "Accuracy impact: the change in accuracy when this layer joins the quantised "
                "prefix (the layers before it quantised, the layers after it float).",
                layer_table,
            ),
            rows,
        ),
        Section(
            "prefix_accuracy",
            "Accuracy as layers are quantised",
            (
                prefix_plot(result),
                Table(
                    ("quantised up to", "accuracy"),
                    tuple((p["step"], _pct(p["accuracy"])) for p in prefix),
                ),
            ),
            prefix,
        ),
        Section(
            "trials",
            "Search",
            (
                "Greedy search: lower one layer's weight bits at a time (most weights first) while "
                "the accuracy stays within the budget, then the activation bits likewise"
                + (
                    "; then raise one layer's block-prune fraction at a time (most weights "
                    "first) likewise, ROM bits counting the nonzero blocks only."
                    if any(t.phase == "sparsity" for t in result.trials)
                    else "."
                ),
                _methods_text(result),
                trial_table,
                trials_plot(result),
            ),
            trials,
        ),
        Section(
            "curves", "Per-layer quantisation error and weight histograms", tuple(figures), curves
        ),
    ]
    if result.sweep:
        sections.insert(4, compression_section(result))
    return sections


def compression_section(result: TuneResult) -> Section:
    """The compression sweep: a table of its points and accuracy vs sparsity and vs rank."""
    rows = [
        {
            "point": p.label,
            "kind": p.kind,
            "target": p.target,
            "zero_blocks": p.sparsity,
            "accuracy": p.accuracy,
            "rom_bits": p.cost.rom_bits,
            "cycles": p.cost.cycles,
            "macs": p.cost.macs,
        }
        for p in result.sweep
    ]
    table = Table(
        ("point", "zero blocks", "accuracy", "weight ROM bits", "cycles per inference", "MACs"),
        tuple(
            (
                r["point"],
                f"{r['zero_blocks']:.1%}",
                _pct(r["accuracy"]),
                str(r["rom_bits"]),
                str(r["cycles"]),
                str(r["macs"]),
            )
            for r in rows
        ),
    )
    block = result.sweep[0].block
    blocks: list[Block] = [
        "At the bits found by the search (the dense point), every conv/linear layer but the "
        "first block-pruned to each fraction, then the conv layers split into Kx1 and 1xK "
        "convolutions at each rank, each retrained and measured with the integer golden model "
        f"on the {result.eval_size} evaluation images. Zero blocks: the fraction of all-zero "
        f"blocks of {block} input channels, measured. Weight ROM bits and cycles per inference "
        "at the build's folding: each engine's scheduled ROM words x width (zero blocks are "
        "not stored) and the slowest engine's ideal cycles (output pixels x the sum over "
        "neuron folds of max(1, scheduled beats)), the network's period; a layer split by "
        "low rank is folded by the build's PE and SIMD limits.",
        table,
    ]
    if result.sweep_diverged:
        blocks.append(
            f"Left out: {', '.join(result.sweep_diverged)} (retraining diverged at these bits)."
        )
    if any(p.kind == "sparsity" for p in result.sweep):
        blocks.append(sparsity_plot(result))
    if any(p.kind == "rank" for p in result.sweep):
        blocks.append(rank_plot(result))
    data = {"points": rows, "diverged": list(result.sweep_diverged)}
    return Section("compression", "Compression: sparsity and rank", tuple(blocks), data)


def write_tuning_report(out_dir: str | os.PathLike, result: TuneResult) -> Path:
    """The tuning report set and ``precision.toml`` (the chosen configuration) in ``out_dir``."""
    check_output_dir(out_dir)  # before the plots are drawn
    sections = tuning_sections(result)
    extra = {"precision.toml": dumps(result.precision).encode()}
    return write_report(out_dir, f"hwgen tuning report: {result.model}", sections, extra)


# ---------------------------------------------------------------- synthesis


def synth_plot(doc: dict[str, Any]) -> Plot:
    """LUTs and FFs per layer, next to the whole design's, on a log scale."""
    names = [*doc["layers"], "network"]
    luts = [doc["layers"][n]["luts"] for n in doc["layers"]] + [doc["luts"]]
    ffs = [doc["layers"][n]["ffs"] for n in doc["layers"]] + [doc["ffs"]]
    fig = MplFigure(figsize=(7, 3.2))
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, luts, 0.4, label="LUT4")
    ax.bar(x + 0.2, ffs, 0.4, label="FF")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("cells")
    ax.set_title(f"{doc['top']} on {doc['device']}: Fmax {doc['fmax_mhz']:.1f} MHz")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return Plot("synth_resources.png", "resources per layer and for the network", _png(fig))


def synthesis_sections(doc: dict[str, Any]) -> list[Section]:
    avail = doc["available"]
    summary = Table(
        ("Fmax", "target", "LUT4", "FF", "BRAM", "DSP", "cycles/inference", "inferences/s"),
        (
            (
                f"{doc['fmax_mhz']:.1f} MHz",
                f"{doc['target_mhz']:g} MHz",
                f"{doc['luts']} / {avail['luts']}",
                f"{doc['ffs']} / {avail['ffs']}",
                f"{doc['brams']} / {avail['brams']}",
                f"{doc['dsps']} / {avail['dsps']}",
                f"{doc['cycles_per_inference']:g}",
                f"{doc['inferences_per_second']:,.0f}",
            ),
        ),
    )
    layers = Table(
        ("layer", "engine", "PE x SIMD", "LUT4", "FF", "BRAM", "DSP", "ideal cycles"),
        tuple(
            (
                name,
                d["kind"],
                f"{d['pe']} x {d['simd']}",
                str(d["luts"]),
                str(d["ffs"]),
                str(d["brams"]),
                str(d["dsps"]),
                str(d["ideal_cycles"]),
            )
            for name, d in doc["layers"].items()
        ),
    )
    text = (
        f"Whole design placed and routed by nextpnr against {doc['target_mhz']:g} MHz; "
        f"layers synthesised alone by Yosys (no routing). Cycles per inference: "
        f"{doc['cycles_source']}."
    )
    blocks: list[Any] = [text, summary]
    path = doc.get("critical_path")
    if path:
        blocks.append(
            f"Critical path: {path['delay_ns']:.2f} ns ({path['logic_ns']:.2f} logic, "
            f"{path['routing_ns']:.2f} routing) through {' → '.join(path['cells'])}."
        )
    return [Section("synth", "Synthesis", (*blocks, layers, synth_plot(doc)), doc)]


def write_synth_report(build_dir: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """``reports/synth.{md,html,json}`` and ``reports/plots/`` inside a build folder."""
    sections = synthesis_sections(doc)
    title = f"hwgen synthesis: {doc['top']} on {doc['device']}"
    files = {
        "synth.md": render_markdown(title, sections).encode(),
        "synth.html": render_html(title, sections).encode(),
        "synth.json": (json.dumps(doc, indent=2) + "\n").encode(),
    }
    files |= {f"plots/{b.file}": b.png for s in sections for b in s.blocks if isinstance(b, Plot)}
    out = Path(build_dir) / "reports"
    for name, data in sorted(files.items()):
        atomic_write_bytes(out / name, data)
    return out
