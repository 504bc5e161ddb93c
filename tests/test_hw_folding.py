"""The folding solver: balance, budgets, folding.toml round trip, the build and CLI options."""

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import example_network, residual_network, weight_array

from hwgen import hwq
from hwgen.cli import main
from hwgen.emit import BuildOptions, build, choose_foldings, load_folding
from hwgen.errors import HwgenError
from hwgen.hw.engine import choose_folding, engine_info
from hwgen.hw.folding import LayerPlan, build_target, candidates, plan, plan_layer, solve
from hwgen.hw.rom import bram_blocks
from hwgen.ir import ActFormat, Codebook, Conv2d, Linear, Network, Pow2


def _best_cycles(net, budget_luts: float) -> int:
    """Brute force: the lowest slowest-engine cycles of any folding within the LUT budget."""
    engines = [i for i, la in enumerate(net.layers) if la.name in net.shapes and i in _eng(net)]
    opts = [[plan_layer(net, i, *f) for f in candidates(net, i, 64, 8)] for i in engines]
    best = None
    for combo in itertools.product(*opts):
        if sum(p.luts for p in combo) <= budget_luts:
            c = max(p.cycles for p in combo)
            best = c if best is None else min(best, c)
    return best


def _eng(net) -> list[int]:
    return [i for i, la in enumerate(net.layers) if type(la).__name__ != "Flatten"]


def _narrowest(net) -> int:
    return plan(net, {net.layers[i].name: (1, 1) for i in _eng(net)}).luts


@pytest.mark.parametrize("extra", [300, 2000, 5000, 15000])
def test_solver_reaches_the_best_balance_within_a_lut_budget(extra):
    net = example_network()
    luts = _narrowest(net) + extra
    got = solve(net, budget=(luts, 1000))
    assert got.luts <= luts
    assert got.cycles == _best_cycles(net, luts)


def test_target_is_met_with_the_cheapest_balanced_folding():
    net = example_network()
    fastest = solve(net, budget=(1e9, 1000))
    target = 2 * fastest.cycles
    got = solve(net, clock_mhz=1.0, target_fps=1e6 / target, budget=(1e9, 1000))
    assert got.cycles <= target < 2 * got.cycles or got.cycles == max(
        plan_layer(net, i, 1, 1).cycles for i in _eng(net)
    )
    assert got.luts <= fastest.luts


def test_every_engine_is_balanced_toward_the_slowest():
    """No engine is wider than it needs: halving any widened engine would make it the slowest."""
    net = residual_network()
    got = solve(net, clock_mhz=1.0, target_fps=1e6 / 600, budget=(1e9, 1000))
    assert got.cycles <= 600
    for p in got.layers:
        i = net.names.index(p.name)
        slower = [plan_layer(net, i, *f) for f in candidates(net, i, 1024, 8)]
        cheaper = [q for q in slower if q.luts < p.luts and q.cycles <= 600]
        assert not cheaper, (p, cheaper)


def _deep_rom_net() -> Network:
    """One 3x3 conv 64 -> 64 (184 kbit of pow2 5-bit weights): its ROM needs block RAM."""
    rng = np.random.default_rng(0)
    fmt = Pow2(5, 0)
    w = weight_array(rng, fmt, (64, 64, 3, 3), "random")
    conv = Conv2d("conv", 64, 64, 3, fmt, ActFormat(8, 0), w, np.zeros(64, int), padding=1)
    return Network((64, 4, 4), ActFormat(8, 4), (conv,))


def test_bram_budget_stops_the_search_and_is_respected():
    net = _deep_rom_net()
    free = solve(net, budget=(8000, 1000))
    assert free.brams == 20 and free.luts <= 8000
    tight = solve(net, budget=(8000, 16))
    assert tight.brams == 16 and tight.cycles == 2 * free.cycles
    with pytest.raises(HwgenError, match="runs out of block RAM"):
        solve(net, target_fps=free.fps, budget=(8000, 16))
    with pytest.raises(HwgenError, match="does not fit ecp5-85f"):
        solve(net, budget=(8000, 12))


def test_engines_follow_the_engine_rules():
    net = residual_network()
    got = solve(net, budget=(1e9, 1000))
    for name, (pe, simd) in got.foldings.items():
        engine_info(net, net.names.index(name), pe, simd)  # raises on an invalid folding
    assert candidates(net, net.names.index("b2_short"), 64, 8) == [(1, 1), (2, 2)]


def test_unreachable_target_is_one_line_with_the_best_rate():
    net = example_network()
    with pytest.raises(HwgenError) as e:
        solve(net, "up5k", 24.0, target_fps=1e9)
    msg = str(e.value)
    assert "\n" not in msg and "1e+09" in msg and "up5k" in msg and "per second" in msg
    with pytest.raises(HwgenError, match="out of LUT4"):
        solve(net, target_fps=1e9, budget=(_narrowest(net) + 100, 100))
    with pytest.raises(HwgenError, match="must be a positive number"):
        solve(net, target_fps=-1)


def test_fixed_layers_keep_their_folding():
    net = example_network()
    got = solve(net, fixed={"conv1": (1, 1)}, budget=(1e9, 1000))
    assert got.foldings["conv1"] == (1, 1)


def test_folding_toml_round_trip(tmp_path):
    net = residual_network()
    got = solve(net, budget=(1e9, 1000))
    path = tmp_path / "folding.toml"
    path.write_text(got.to_toml())
    assert load_folding(path) == got.foldings
    assert plan(net, load_folding(path)).to_toml() == got.to_toml()


def test_estimates_count_rom_blocks_and_logic():
    net = example_network()
    p = plan_layer(net, 0, 4, 1)
    assert p.rom_storage == "logic" and p.rom_blocks == 0 and p.rom_bits == 4 * 9 * 4
    layer = net.layers[0]
    assert p.rom_bits == layer.weight.size * layer.weight_format.bits
    assert bram_blocks(160, 1152) == 15


def test_codebook_lane_estimates_follow_the_mux_and_the_rom_holds_indices():
    """A codebook engine's ROM holds index bits; its lanes cost about the width times the
    mux inputs: more index bits cost more, TTQ's three entries least."""
    net = example_network()
    base = net.layers[0]

    def plan_with(cb: Codebook, pe: int = 4) -> LayerPlan:
        w = np.asarray(cb.entries)[np.arange(base.weight.size).reshape(base.weight.shape) % 3]
        w[w == 0] = cb.entries[-1]  # no zero block: every word is stored
        layer = replace(base, weight_format=cb, weight=w)
        return plan_layer(replace(net, layers=(layer, *net.layers[1:])), 0, pe, 1)

    ttq = plan_with(Codebook((-24, 0, 40), 6))
    dqc3 = plan_with(Codebook((-40, -17, -6, 0, 5, 16, 34, 64), 6))
    dqc5 = plan_with(Codebook(tuple(range(-64, 64, 4)), 6))
    assert ttq.luts < dqc3.luts < dqc5.luts
    assert (ttq.rom_bits, dqc3.rom_bits, dqc5.rom_bits) == tuple(
        base.weight.size * b for b in (2, 3, 5)
    )


def test_build_target_defaults_and_conflicts():
    assert build_target(None, None, None) == ("ecp5-85f", 100.0)
    assert build_target(None, "ulx3s-85f", None) == ("ecp5-85f", 50.0)
    assert build_target("up5k", None, 12.0) == ("up5k", 12.0)
    with pytest.raises(HwgenError, match="not board ulx3s-85f's device"):
        build_target("up5k", "ulx3s-85f", None)


def test_default_build_keeps_the_lane_limits():
    net = example_network()
    got = choose_foldings(net, BuildOptions())
    assert got == {
        la.name: choose_folding(net, i, 4, 4) for i, la in enumerate(net.layers) if i in _eng(net)
    }
    assert choose_foldings(net, BuildOptions(device="up5k")) == solve(net, "up5k").foldings


@pytest.mark.parametrize("make", [example_network, residual_network], ids=["chain", "dag"])
def test_build_writes_folding_toml_that_folding_reads_back(tmp_path, make):
    net = make()
    opts = BuildOptions(target_fps=1e5, vectors=1)
    manifest = build(net, tmp_path / "a", opts)
    folding = load_folding(tmp_path / "a" / "folding.toml")
    assert folding == {k: tuple(v) for k, v in manifest["foldings"].items()}
    again = build(net, tmp_path / "b", BuildOptions(folding=folding, vectors=1))
    assert again["foldings"] == manifest["foldings"]
    assert (tmp_path / "a" / "folding.toml").read_text() == (
        tmp_path / "b" / "folding.toml"
    ).read_text()


def test_cli_target_fps(tmp_path, capsys):
    model = tmp_path / "m.hwq"
    hwq.save(example_network(), model)
    out = tmp_path / "out"
    assert main(["build", str(model), "-o", str(out), "--target-fps", "100000"]) == 0
    capsys.readouterr()
    assert (out / "folding.toml").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert max(e["ideal_cycles"] for e in manifest["layers"]) <= 1000
    assert main(["build", str(model), "-o", str(tmp_path / "x"), "--target-fps", "1e9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--target-fps 1e+09 is out of reach" in err
    assert not (tmp_path / "x").exists()


def test_solver_unrolls_only_when_allowed_and_cheaper_for_the_rate():
    """A dense 16 -> 8 layer at one vector per cycle: folded lanes stop at SIMD 8 (2 cycles),
    the unrolled engine reaches 1; ``unrolled=True`` lets the solver take it."""
    rng = np.random.default_rng(0)
    fmt = Pow2(4, 0)
    layer = Linear(
        "fc",
        16,
        8,
        fmt,
        ActFormat(8, 0),
        weight_array(rng, fmt, (8, 16), "random"),
        np.zeros(8, dtype=np.int64),
    )
    net = Network((16,), ActFormat(8, 0), (layer,))
    with pytest.raises(HwgenError, match="out of reach"):
        solve(net, target_fps=100e6)
    got = solve(net, target_fps=100e6, unrolled=True)
    assert got.engines == {"fc": "unrolled"} and got.foldings == {"fc": (8, 16)}
    assert got.cycles == 1 and got.layers[0].rom_storage == ""
    assert 'engine = "unrolled"' in got.to_toml()
    # A rate that a few folded lanes reach: they stay, cheaper than the unrolled engine.
    slow = solve(net, target_fps=100e6 / 32, unrolled=True)
    assert slow.engines == {} and slow.cycles <= 32
    assert slow.luts < plan_layer(net, 0, 8, 16, engine="unrolled").luts


def test_cli_engine_option_and_bad_engine_in_folding(tmp_path, capsys):
    model = tmp_path / "m.hwq"
    net = example_network()
    hwq.save(net, model)
    out = tmp_path / "out"
    assert main(["build", str(model), "-o", str(out), "--engine", "unrolled"]) == 0
    assert "dense unrolled" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    macs = [la.name for la in net.layers if isinstance(la, (Conv2d, Linear))]
    assert manifest["engines"] == {name: "unrolled" for name in macs}
    assert all(e["rom_depth"] == 0 for e in manifest["layers"] if e["name"] in macs)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[layers.{macs[0]}]\nengine = "wide"\n')
    assert main(["build", str(model), "-o", str(tmp_path / "x"), "--folding", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "engine must be one of folded, unrolled, not 'wide'" in err
    )
    assert not (tmp_path / "x").exists()
