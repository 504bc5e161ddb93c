"""The tuning report set: complete, consistent with the net, deterministic, atomic; the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import matplotlib.image
import numpy as np
import pytest
from test_quant_tune import residual_problem, toy_problem

from hwgen import hwq, report
from hwgen.cli import main
from hwgen.errors import HwgenError
from hwgen.ir import ActFormat, Codebook, Fixed, Linear, Planes, Pow2
from hwgen.quant import precision, quantize
from hwgen.quant.binarize import RetrainOptions
from hwgen.quant.fakequant import accuracy
from hwgen.quant.tune import Cost, SweepPoint, TuneResult, layer_rom_bits, mac_layers, tune

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result() -> TuneResult:
    fnet, x, y = toy_problem()
    return tune(fnet, "fixed", x[:100], x[100:], y[100:], 1.0, progress=False)


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    return report.write_tuning_report(tmp_path_factory.mktemp("report") / "rep", result)


def _read_report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_report_set_is_complete_and_consistent(result, written):
    out = written
    for name in report.REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    doc = _read_report(out)
    net = result.net
    s = doc["summary"]
    assert s["scheme"] == "fixed" and s["model"] == "toy" and s["eval_images"] == 200
    assert s["float_accuracy"] == result.float_accuracy == 1.0
    assert s["quant_accuracy"] == result.accuracy
    assert s["drop_points"] == pytest.approx(100 * (1.0 - result.accuracy))
    assert s["within_budget"] is True
    assert s["rom_bits"] == sum(lyr.weight.size * lyr.weight_format.bits for lyr in mac_layers(net))
    assert s["rom_bits_8bit"] == 8 * sum(lyr.weight.size for lyr in mac_layers(net))
    model = hwq.to_json(net)
    assert s["input_format"] == model["input"]["format"]
    rows = doc["layers"]
    macs = [ld for ld in model["layers"] if ld["op"] in ("conv2d", "linear")]
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc"]
    for r, ld, lyr in zip(rows, macs, mac_layers(net), strict=True):
        assert r["weight_format"] == ld["weight_format"] and r["out_format"] == ld["out_format"]
        assert r["weight_shape"] == list(lyr.weight.shape) and r["out_shape"] == ld["out_shape"]
        assert r["rom_bits"] == lyr.weight.size * lyr.weight_format.bits
    # the impacts add up from the float accuracy to the quantised one (input step aside)
    steps = dict((p["step"], p["accuracy"]) for p in doc["prefix_accuracy"])
    total = sum(r["accuracy_impact_points"] for r in rows)
    assert total == pytest.approx(100 * (result.accuracy - steps["input"]))
    assert steps["fc"] == result.accuracy == accuracy(net, *_toy_eval())
    assert len(doc["trials"]) == len(result.trials)
    first = result.trials[0]
    assert doc["trials"][0] == {
        "phase": "start",
        "layer": "*",
        "change": "scheme default",
        "accuracy": first.accuracy,
        "rom_bits": first.rom_bits,
        "accepted": True,
        "method": "post-training quantisation",
    }
    assert set(doc["curves"]) == {"input", "conv1", "conv2", "fc"}

    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == sorted(
        ["input_error.png", "prefix_accuracy.png", "trials.png"]
        + [f"{n}_{k}.png" for n in ("conv1", "conv2", "fc") for k in ("error", "hist")]
    )
    for p in (out / "plots").iterdir():
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC)
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0  # something is drawn

    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for lyr in mac_layers(net):
        row = f"<tr><td>{lyr.name}</td><td>{'conv2d' if lyr.name != 'fc' else 'linear'}</td>"
        assert row in page
        assert f"<td>{lyr.weight_format}</td><td>{lyr.out_format}</td>" in page
    assert page.count('<img src="data:image/png;base64,') == len(plots)
    md = (out / "report.md").read_text()
    assert "| conv1 | conv2d | 4x1x3x3 | 4x8x8 |" in md
    assert all(f"](plots/{p})" in md for p in plots)


def test_search_section_says_how_each_trial_was_measured(result):
    retrained = "INQ retraining (4 epochs at each of 4 steps)"
    kept = "the retrained weights of trial 1, activation formats chosen again (no retraining)"
    methods = [retrained, retrained, kept, kept, kept, retrained]
    trials = tuple(replace(t, method=m) for t, m in zip(result.trials, methods, strict=False))
    assert len(trials) == 6
    sections = report.tuning_sections(replace(result, trials=trials))
    search = next(s for s in sections if s.key == "trials")
    text = [b for b in search.blocks if isinstance(b, str)][1]
    assert text == (
        "Every accuracy below is measured: the integer golden model on the 200 evaluation "
        f"images, nothing estimated. Trials were quantised by {retrained} for trials 0-1, 5; "
        f"{kept} for trials 2-4."
    )
    table = next(b for b in search.blocks if isinstance(b, report.Table))
    assert table.header[-1] == "quantised by" and [r[-1] for r in table.rows[:6]] == methods
    assert [t["method"] for t in search.data[:6]] == methods
    plot = next(b for b in search.blocks if isinstance(b, report.Plot))
    assert plot.file == "trials.png" and plot.png.startswith(PNG_MAGIC)


def test_compression_section_tables_and_plots_the_sweep(result, tmp_path):
    def point(kind, target, zeros, acc, rom, cycles, macs):
        cost = Cost(rom, cycles, macs)
        return SweepPoint(kind, target, 4, zeros, acc, cost, result.precision, result.net)

    sweep = (
        point("dense", None, 0.05, 0.99, 8000, 900, 5000),
        point("sparsity", 0.5, 0.5, 0.98, 4000, 500, 5000),
        point("sparsity", 0.9, 0.875, 0.9, 1000, 150, 5000),
        point("rank", 2, 0.0625, 0.95, 3000, 400, 2000),
    )
    swept = replace(result, sweep=sweep, sweep_diverged=("rank 1",))
    out = report.write_tuning_report(tmp_path / "rep", swept)
    doc = _read_report(out)
    assert list(doc)[list(doc).index("trials") + 1] == "compression"
    assert doc["compression"]["diverged"] == ["rank 1"]
    assert doc["compression"]["points"][1] == {
        "point": "prune 0.5",
        "kind": "sparsity",
        "target": 0.5,
        "zero_blocks": 0.5,
        "accuracy": 0.98,
        "rom_bits": 4000,
        "cycles": 500,
        "macs": 5000,
    }
    points = [r["point"] for r in doc["compression"]["points"]]
    assert points == ["dense", "prune 0.5", "prune 0.9", "rank 2"]
    md = (out / "report.md").read_text()
    assert "## Compression: sparsity and rank" in md
    assert "| prune 0.9 | 87.5% | 90.00% | 1000 | 150 | 5000 |" in md
    assert "| rank 2 | 6.2% | 95.00% | 3000 | 400 | 2000 |" in md
    assert "Left out: rank 1 (retraining diverged at these bits)." in md
    for png in ("sparsity.png", "rank.png"):
        assert (out / "plots" / png).read_bytes().startswith(PNG_MAGIC)
        assert (
            f"](plots/{png})" in md
            and f"(plots/{png})</figcaption>" in (out / "report.html").read_text()
        )
    # a result without a sweep has no such section
    assert "compression" not in _read_report(report.write_tuning_report(tmp_path / "b", result))


def test_pruned_layers_count_their_nonzero_blocks(result):
    layers = dict(result.precision.layers)
    layers["fc"] = replace(layers["fc"], prune=0.5)
    quant = replace(result.quant, precision=replace(result.precision, layers=layers))
    pruned = replace(result, block=2, quant=quant)
    sections = {s.key: s for s in report.tuning_sections(pruned)}
    rows = sections["layers"].data
    assert [r["prune"] for r in rows] == [0.0, 0.0, 0.5]
    for r, lyr in zip(rows, mac_layers(result.net), strict=True):
        assert r["rom_bits"] == layer_rom_bits(lyr, block=2)
    assert sections["summary"].data["rom_bits"] == sum(r["rom_bits"] for r in rows)
    totals = next(b for b in sections["summary"].blocks if isinstance(b, report.Table))
    assert dict(totals.rows)["weight ROM bits"].endswith(", nonzero blocks of 2 only")


def _toy_eval() -> tuple[np.ndarray, np.ndarray]:
    _, x, y = toy_problem()
    return x[100:], y[100:]


def test_precision_toml_reproduces_the_net(result, written):
    p = precision.load(written / "precision.toml")
    assert p == result.precision
    fnet, x, _ = toy_problem()
    assert quantize(fnet, p, x[:7], progress=False).net == result.net  # every frac is pinned


def test_report_is_deterministic(result, written, tmp_path):
    a = written
    b = report.write_tuning_report(tmp_path / "b", result)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    text = "".join((b / n).read_text() for n in ("report.md", "report.json"))
    assert str(tmp_path) not in text and "/tmp" not in text


def test_failed_write_leaves_nothing_and_keeps_the_old_report(result, tmp_path, monkeypatch):
    sections = report.tuning_sections(result)  # the plots, rendered once

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        report.write_report(tmp_path / "new", "t", sections)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    old = report.write_report(tmp_path / "old", "t", sections)
    before = (old / "report.json").read_bytes()
    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        report.write_report(old, "t", sections)
    assert (old / "report.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    monkeypatch.undo()
    report.write_report(old, "t2", sections)  # a finished rewrite replaces it
    assert _read_report(old)["title"] == "t2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_refuses_a_folder_that_is_not_a_report(result, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(HwgenError, match="is not an hwgen report folder"):
        report.write_tuning_report(tmp_path / "mine", result)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_residual_report_lists_the_add_layers(tmp_path):
    fnet, x, y = residual_problem()
    r = tune(fnet, "fixed", x[:100], x[100:], y[100:], 100.0, progress=False)
    out = report.write_tuning_report(tmp_path / "rep", r)
    doc = _read_report(out)
    rows = {row["name"]: row for row in doc["layers"]}
    assert list(rows) == ["stem", "b1c1", "b1c2", "add1", "b2c1", "b2c2", "add2", "fc"]
    net = r.net
    for name in ("add1", "add2"):
        add = net.layer(name)
        fa, fb = (net.formats[i] for i in add.inputs)
        assert rows[name] == {
            "name": name,
            "op": "add",
            "inputs": list(add.inputs),
            "out_shape": list(net.shapes[name]),
            "in_formats": [{"bits": f.bits, "frac": f.frac, "signed": f.signed} for f in (fa, fb)],
            "out_format": {
                "bits": add.out_format.bits,
                "frac": add.out_format.frac,
                "signed": add.out_format.signed,
            },
            "rom_bits": 0,
            "accuracy_impact_points": rows[name]["accuracy_impact_points"],
        }
    assert rows["b2c1"]["inputs"] == ["add1"]
    total = sum(row["accuracy_impact_points"] for row in rows.values())
    steps = dict((p["step"], p["accuracy"]) for p in doc["prefix_accuracy"])
    assert total == pytest.approx(100 * (r.accuracy - steps["input"]))
    md = (out / "report.md").read_text()
    f2 = net.layer("add2").out_format
    assert f"| add2 | add | - | 8x4x4 | - | {f2} | 0 |" in md
    assert (out / "plots" / "add1_error.png").is_file()
    assert not (out / "plots" / "add1_hist.png").exists()
    assert set(doc["curves"]) == {"input", *rows}
    assert precision.load(out / "precision.toml").layers["add2"].act_frac == f2.frac


def test_weight_levels():
    assert report.weight_levels(Fixed(2, 1)).tolist() == [-1.0, -0.5, 0.0, 0.5]
    assert report.weight_levels(Pow2(3, 0)).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert report.weight_levels(Pow2(2, -1)).tolist() == [-0.5, 0.0, 0.5]
    assert report.weight_levels(Pow2(1, 2)).tolist() == [-4.0, 4.0]  # binary: no zero


def test_layer_levels_of_the_learned_schemes():
    w = np.array([[1, -1, 0], [0, 1, 1]], np.int64)
    scaled = Linear(
        "fc", 3, 2, Pow2(2, 0), ActFormat(8, 0), w, np.zeros(2, np.int64),
        scale=np.array([3, -2]), scale_format=Fixed(4, 2),
    )  # fmt: skip
    levels, what = report.layer_levels(scaled)
    # codes -1, 0, 1 times m_c * 2**-2 for m = 3 and -2
    assert levels.tolist() == [-0.75, -0.5, 0.0, 0.5, 0.75]
    assert what == "codes ternary.emax0 x 2 channel scales"
    book = replace(scaled, weight_format=Codebook((-3, 0, 1, 6), 1), scale=None,
                   scale_format=None, weight=np.array([[6, -3, 0], [0, 1, 1]]))  # fmt: skip
    assert report.layer_levels(book)[0].tolist() == [-1.5, 0.0, 0.5, 3.0]
    fmt = Planes(((4, 1), (1, -4)), 2)
    planes = replace(book, weight_format=fmt, weight=np.array([[5, -3, 5], [3, 3, -5]]))
    # amq: the sums of the channels' signed plane scales, not a whole Fixed grid
    levels, what = report.layer_levels(planes)
    assert levels.tolist() == [-1.25, -0.75, 0.75, 1.25]
    assert what == "sums of 2 binary planes x 2 channels"


def test_learned_scheme_report_draws_its_levels(tmp_path):
    fnet, x, y = toy_problem()
    r = tune(fnet, "lab", x[:100], x[100:], y[100:], 100.0, (x[:100], y[:100]), progress=False,
             retrain_options=RetrainOptions(epochs=1))  # fmt: skip
    out = report.write_tuning_report(tmp_path / "rep", r)
    doc = _read_report(out)
    assert doc["summary"]["scheme"] == "lab"
    md = (out / "report.md").read_text()
    for layer in mac_layers(r.net):
        assert (out / "plots" / f"{layer.name}_hist.png").read_bytes().startswith(PNG_MAGIC)
        n = len(report.layer_levels(layer)[0])
        assert f"{layer.name}: float weights and the levels of codes binary.emax0 x " in md
        assert 2 <= n <= 2 * layer.weight.shape[0]


def test_html_escapes_text():
    sec = report.Section(
        "x", "a <b> & c", ("<script>alert(1)</script>", report.Table(("<th>",), (("<td>&",),)))
    )
    page = report.render_html("t<", [sec])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<td>&lt;td&gt;&amp;</td>" in page and "<title>t&lt;</title>" in page


# ---------------------------------------------------------------- CLI


def test_cli_tune_digits_round_trip(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["tune", "digits", "--max-drop", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report: " in printed and "within budget" in printed
    doc = _read_report(out)
    assert doc["summary"]["within_budget"] and doc["summary"]["drop_points"] <= 1.0 + 1e-9
    hwq_path = tmp_path / "x.hwq"
    rc = main(
        ["quantize", "digits", "--precision", str(out / "precision.toml"), "-o", str(hwq_path)]
    )
    assert rc == 0
    net = hwq.load(hwq_path)
    model = hwq.to_json(net)
    macs = [ld for ld in model["layers"] if ld["op"] in ("conv2d", "linear")]
    assert [(r["weight_format"], r["out_format"]) for r in doc["layers"]] == [
        (ld["weight_format"], ld["out_format"]) for ld in macs
    ]
    assert doc["summary"]["input_format"] == model["input"]["format"]
    # the same network the tune measured: its accuracy is the reported one
    from hwgen.examples.digits import digits_float_net

    _, d = digits_float_net()
    assert accuracy(net, d.x_test, d.y_test) == doc["summary"]["quant_accuracy"]
    fnet, _ = digits_float_net()
    again = quantize(fnet, precision.load(out / "precision.toml"), d.x_train, progress=False)
    assert again.net == net


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "nosuchmodel", "--max-drop", "1", "-o", "{out}"], "nosuchmodel"),
        (["tune", "digits", "--max-drop", "-1", "-o", "{out}"], "--max-drop must be"),
        (["tune", "digits", "--max-drop", "1"], "the following arguments are required: -o"),
        (["tune", "digits", "-o", "{out}"], "required: --max-drop"),
        (["tune", "digits", "--max-drop", "1", "--epochs", "3", "-o", "{out}"], "--epochs 3"),
        (
            ["tune", "digits", "--max-drop", "1", "--data", "{tmp}/none.npz", "-o", "{out}"],
            "no such file",
        ),
        (
            ["tune", "digits", "--max-drop", "1", "--max-sparsity", "1.5", "-o", "{out}"],
            "--max-sparsity 1.5: must be in (0, 1)",
        ),
        (
            [
                "tune",
                "digits",
                "--max-drop",
                "1",
                "--max-sparsity",
                "0.5",
                "--block",
                "0",
                "-o",
                "{out}",
            ],
            "--block 0: must be a positive integer",
        ),
        (
            ["tune", "digits", "--max-drop", "1", "--pe", "2", "-o", "{out}"],
            "--pe, --simd and --folding set the sweep's folding: add --compression-sweep",
        ),
        (
            [
                "tune",
                "digits",
                "--max-drop",
                "1",
                "--compression-sweep",
                "--scheme",
                "binary",
                "-o",
                "{out}",
            ],
            "scheme binary cannot keep pruned weights at zero",
        ),
    ],
)
def test_cli_errors(tmp_path, capsys, argv, message):
    work = tmp_path / "work"
    work.mkdir()
    argv = [a.format(out=work / "rep", tmp=work) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hwgen: error: ") and message in err
    assert list(work.iterdir()) == []  # nothing written
