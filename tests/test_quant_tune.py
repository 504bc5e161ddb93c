"""The bit-width search: budget kept, widths lowered greedily, trials logged truthfully."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hwgen.quant.tune as tune_module
from hwgen.errors import HwgenError, RetrainDiverged
from hwgen.frontend.graph import (
    FAdd,
    FConv2d,
    FFlatten,
    FGlobalAvgPool,
    FLinear,
    FloatNet,
    FMaxPool2d,
    FSubsamplePad,
)
from hwgen.ir import ActFormat, Fixed, Linear, Network, Pow2
from hwgen.quant import quantize
from hwgen.quant.binarize import RetrainOptions
from hwgen.quant.codebook import CodebookOptions
from hwgen.quant.fakequant import accuracy
from hwgen.quant.inq import InqOptions
from hwgen.quant.precision import AddPrecision, dumps, parse
from hwgen.quant.prune import block_sparsity, block_view
from hwgen.quant.tune import (
    SPARSITY_STEPS,
    SWEEP_SPARSITY,
    TuneResult,
    float_accuracy,
    mac_layers,
    prefix_accuracy,
    rom_bits,
    sparsity_steps,
    tune,
    zero_blocks,
)


def toy_problem(seed: int = 0) -> tuple[FloatNet, np.ndarray, np.ndarray]:
    """A small random CNN and images labelled by the float model itself (float accuracy 1)."""
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)

    fnet = FloatNet(
        (1, 8, 8),
        (
            FConv2d("conv1", he(4, 1, 3, 3), rng.normal(0, 0.1, 4), padding=(1, 1), relu=True),
            FMaxPool2d("pool", (2, 2), (2, 2)),
            FConv2d("conv2", he(8, 4, 3, 3), rng.normal(0, 0.1, 8), padding=(1, 1), relu=True),
            FFlatten("flat"),
            FLinear("fc", he(10, 128), rng.normal(0, 0.1, 10)),
        ),
        "toy",
    )
    x = rng.random((300, 1, 8, 8))
    with torch.no_grad():
        y = fnet.forward(torch.as_tensor(x))[-1].argmax(1).numpy()
    return fnet, x, y


@pytest.fixture(scope="module")
def toy() -> tuple[FloatNet, np.ndarray, np.ndarray]:
    return toy_problem()


def residual_problem(seed: int = 0, n: int = 300) -> tuple[FloatNet, np.ndarray, np.ndarray]:
    """A small random residual CNN and images labelled by it (float accuracy 1).

    conv -> [conv, conv] + identity -> add -> [conv stride 2, conv] + subsample-pad
    shortcut -> add (ReLU) -> global average pool -> flatten -> linear; the linear layer
    is scaled to the spread of its inputs, so that every class occurs.
    """
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)

    def b(c: int) -> np.ndarray:
        return rng.normal(0, 0.1, c)

    body = (
        FConv2d("stem", he(4, 2, 3, 3), b(4), padding=(1, 1), relu=True),
        FConv2d("b1c1", he(4, 4, 3, 3), b(4), padding=(1, 1), relu=True),
        FConv2d("b1c2", he(4, 4, 3, 3), b(4), padding=(1, 1)),
        FAdd("add1", ("b1c2", "stem")),  # no ReLU: a signed sum
        FConv2d("b2c1", he(8, 4, 3, 3), b(8), (2, 2), (1, 1), relu=True),
        FConv2d("b2c2", he(8, 8, 3, 3), b(8), padding=(1, 1)),
        FSubsamplePad("short", (2, 2), (2, 2), inputs=("add1",)),
        FAdd("add2", ("b2c2", "short"), relu=True),
        FGlobalAvgPool("gap"),
        FFlatten("flat"),
    )
    x = rng.uniform(-1, 1, (n, 2, 8, 8))
    with torch.no_grad():
        feat = FloatNet((2, 8, 8), body).forward(torch.as_tensor(x))[-1].numpy()
    w = rng.normal(0, 1, (6, 8)) / (feat.std(0) + 1e-3) / np.sqrt(8)
    fnet = FloatNet((2, 8, 8), (*body, FLinear("fc", w, -w @ feat.mean(0))), "res")
    with torch.no_grad():
        y = fnet.forward(torch.as_tensor(x))[-1].argmax(1).numpy()
    return fnet, x, y


@pytest.fixture(scope="module")
def res() -> tuple[FloatNet, np.ndarray, np.ndarray]:
    return residual_problem()


def _check_log(r: TuneResult, x: np.ndarray, y: np.ndarray) -> None:
    """The final net is measured truthfully and every search decision obeyed the budget."""
    assert r.accuracy == accuracy(r.net, x, y)
    assert r.rom_bits == rom_bits(r.net)
    floor = 100 * r.float_accuracy - r.max_drop_points - 1e-9
    for t in r.trials:
        if t.phase in ("weights", "activations"):
            assert t.accepted == (100 * t.accuracy >= floor), t
    kept = [t.rom_bits for t in r.trials if t.accepted and t.phase in ("weights", "activations")]
    assert kept == sorted(kept, reverse=True)  # accepted narrowing steps never add ROM


def test_zero_drop_keeps_float_accuracy(toy):
    fnet, x, y = toy
    r = tune(fnet, "fixed", x[:100], x[100:], y[100:], 0.0, progress=False)
    assert r.float_accuracy == 1.0
    assert r.accuracy >= r.float_accuracy and r.within_budget
    _check_log(r, x[100:], y[100:])
    assert r.rom_bits < r.rom_bits_8bit  # it did find something to save
    assert any(not t.accepted for t in r.trials)  # and it stopped at a real limit


def test_generous_budget_reaches_the_minimum_widths(toy):
    fnet, x, y = toy
    r = tune(fnet, "fixed", x[:100], x[100:], y[100:], 100.0, progress=False)
    assert all(t.accepted for t in r.trials)
    layers = mac_layers(r.net)
    assert all(lyr.weight_format == Fixed(2, lyr.weight_format.frac) for lyr in layers)
    assert all(lyr.out_format.bits == 2 for lyr in layers)
    assert r.net.input_format.bits == 2
    assert r.rom_bits == 2 * sum(lyr.weight.size for lyr in layers)
    # largest ROM saving first: fc (1280 weights) is lowered before conv2 (288) and conv1 (36)
    order = [t.layer for t in r.trials if t.phase == "weights"]
    assert order == ["fc"] * 6 + ["conv2"] * 6 + ["conv1"] * 6
    # 1 start + 18 weight steps + 4 activations x 6 steps: every step measured once
    assert len(r.trials) == 1 + 18 + 24


def test_search_is_deterministic_and_reproducible_from_its_precision(toy):
    fnet, x, y = toy
    a = tune(fnet, "fixed", x[:100], x[100:], y[100:], 1.0, progress=False)
    b = tune(fnet, "fixed", x[:100], x[100:], y[100:], 1.0, progress=False)
    assert a.net == b.net and a.trials == b.trials
    again = quantize(fnet, a.precision, x[:100], progress=False)
    assert again.net == a.net


def test_pow2_scheme_searches_pow2_bits(toy):
    fnet, x, y = toy
    r = tune(fnet, "pow2", x[:100], x[100:], y[100:], 0.5, progress=False)
    assert all(isinstance(lyr.weight_format, Pow2) for lyr in mac_layers(r.net))
    assert r.trials[0].rom_bits == 5 * sum(lyr.weight.size for lyr in mac_layers(r.net))
    _check_log(r, x[100:], y[100:])
    assert r.within_budget


def test_inq_retrains_every_weight_trial_and_reuses_the_weights_for_activations(toy):
    fnet, x, y = toy
    opts = InqOptions(epochs=1, portions=(0.5, 1.0))
    train = (x[:100], y[:100])
    r = tune(fnet, "inq", x[:100], x[100:], y[100:], 2.0, train, progress=False, inq_options=opts)
    _check_log(r, x[100:], y[100:])
    assert r.precision.scheme == "inq"
    assert {t.layer for t in r.trials if t.phase == "weights"} == {"conv1", "conv2", "fc"}
    inq = "INQ retraining (1 epoch at each of 2 steps)"
    assert {t.method for t in r.trials if t.phase in ("start", "weights")} == {inq}
    base = max(i for i, t in enumerate(r.trials) if t.accepted and t.method == inq)
    assert {t.method for t in r.trials if t.phase == "activations"} == {
        f"the retrained weights of trial {base}, activation formats chosen again (no retraining)"
    }
    # the reported network is exactly what INQ gives for its precision, whichever phase won
    again = quantize(fnet, r.precision, x[:100], train, progress=False, inq_options=opts)
    assert again.net == r.net


def test_inq_widens_the_activations_on_the_start_weights_first(toy, monkeypatch):
    fnet, x, y = toy

    def fake(net, x, y):  # only 12-bit activations fit the budget
        return 1.0 if min(f.bits for f in net.formats.values()) >= 12 else 0.5

    monkeypatch.setattr(tune_module, "accuracy", fake)
    opts = InqOptions(epochs=1, portions=(1.0,))
    r = tune(fnet, "inq", x[:50], x[:50], y[:50], 0.0, (x[:50], y[:50]), progress=False,
             inq_options=opts)  # fmt: skip
    kept = "the retrained weights of trial 0, activation formats chosen again (no retraining)"
    assert [(t.phase, t.change, t.accepted, t.method) for t in r.trials[1:3]] == [
        ("widen", "act bits 8 -> 10", False, kept),
        ("widen", "act bits 10 -> 12", True, kept),
    ]
    weights = [t for t in r.trials if t.phase == "weights"]
    assert len(weights) == 9 and all(t.accepted for t in weights)  # 5 -> 2 bits, retrained
    assert {t.method for t in weights} == {"INQ retraining (1 epoch at each of 1 step)"}
    assert all(lyr.weight_format.bits == 2 for lyr in mac_layers(r.net))
    assert r.accuracy == 1.0


def test_ternary_keeps_two_bit_weights(toy):
    fnet, x, y = toy
    opts = InqOptions(epochs=1, portions=(1.0,))
    r = tune(
        fnet,
        "ternary",
        x[:100],
        x[100:],
        y[100:],
        100.0,
        (x[:100], y[:100]),
        progress=False,
        inq_options=opts,
    )
    assert not any(t.phase == "weights" for t in r.trials)
    assert all(lyr.weight_format.bits == 2 for lyr in mac_layers(r.net))


def test_prefix_accuracy_runs_from_float_to_the_integer_net(toy):
    fnet, x, y = toy
    q = tune(fnet, "fixed", x, x, y, 100.0, progress=False)
    steps = prefix_accuracy(fnet, q.net, x, y)
    assert [s for s, _ in steps] == ["float", "input", "conv1", "conv2", "fc"]
    assert steps[0][1] == float_accuracy(fnet, x, y) == 1.0
    assert steps[-1][1] == accuracy(q.net, x, y)
    assert steps[-1][1] < 1.0  # 2-bit everything: the prefix does show the damage


def _fake_accuracy(monkeypatch, table: dict[int, float]) -> None:
    """Accuracy as a function of the narrowest weight width: the greedy logic, exactly."""

    def fake(net, x, y):
        return table.get(min(lyr.weight_format.bits for lyr in mac_layers(net)), 0.5)

    monkeypatch.setattr(tune_module, "accuracy", fake)


def test_widens_until_the_budget_fits(toy, monkeypatch):
    fnet, x, y = toy
    _fake_accuracy(monkeypatch, {10: 1.0, 11: 1.0, 12: 1.0})
    r = tune(fnet, "fixed", x[:50], x[:50], y[:50], 0.0, progress=False)
    phases = [(t.phase, t.layer, t.change, t.accepted) for t in r.trials]
    assert phases[:2] == [
        ("start", "*", "scheme default", True),
        ("widen", "*", "weight bits 8 -> 10, act bits 8 -> 10", True),
    ]
    # then each layer tries 10 -> 9 once and is frozen; activations cost nothing here
    assert phases[2:5] == [
        ("weights", n, "weight bits 10 -> 9", False) for n in ("fc", "conv2", "conv1")
    ]
    assert all(lyr.weight_format.bits == 10 for lyr in mac_layers(r.net))
    assert all(lyr.out_format.bits == 2 for lyr in mac_layers(r.net))
    assert r.within_budget and r.accuracy == 1.0


def test_widening_that_never_fits_keeps_the_most_accurate(toy, monkeypatch):
    fnet, x, y = toy
    _fake_accuracy(monkeypatch, {10: 0.9, 12: 0.8})
    r = tune(fnet, "fixed", x[:50], x[:50], y[:50], 0.0, progress=False)
    widen = [(t.change, t.accepted) for t in r.trials if t.phase == "widen"]
    assert widen == [
        ("weight bits 8 -> 10, act bits 8 -> 10", True),
        ("weight bits 10 -> 12, act bits 10 -> 12", False),
        ("weight bits 12 -> 14, act bits 12 -> 14", False),
        ("weight bits 14 -> 16, act bits 14 -> 16", False),
    ]
    assert all(lyr.weight_format.bits == 10 for lyr in mac_layers(r.net))
    assert r.accuracy == 0.9 and not r.within_budget


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "auto"}, "tune: scheme 'auto' is not one of"),
        ({"max_drop_points": -1.0}, "non-negative number of points, not -1.0"),
        ({"max_drop_points": float("nan")}, "non-negative number of points, not nan"),
        ({"scheme": "inq"}, "scheme inq retrains the weights and needs training data"),
        ({"eval_y": np.zeros(3, int)}, "need labelled evaluation data, not 200 images, 3 labels"),
        ({"calib_x": np.zeros((4, 1, 7, 7))}, "must be (N, 1, 8, 8)"),
        ({"max_sparsity": 1.0}, "tune: max sparsity must be in (0, 1), not 1.0"),
        ({"max_sparsity": 0.5, "block": 0}, "tune: block must be a positive integer, not 0"),
        (
            {"scheme": "binary", "max_sparsity": 0.5},
            "scheme binary cannot keep pruned weights at zero: prune with fixed, pow2, inq",
        ),
        ({"max_sparsity": 0.5}, "pruning and low-rank retrain the model and need training data"),
        (
            {"scheme": "dqc", "max_sparsity": 0.5, "codebook_options": CodebookOptions(zero=False)},
            "tune: scheme dqc without its zero entry (--no-zero) cannot keep pruned weights",
        ),
    ],
)
def test_bad_arguments(toy, kwargs, message):
    fnet, x, y = toy
    args = {
        "scheme": "fixed",
        "calib_x": x[:100],
        "eval_x": x[100:],
        "eval_y": y[100:],
        "max_drop_points": 1.0,
    } | kwargs
    with pytest.raises(HwgenError) as e:
        tune(fnet, progress=False, **args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_digits_zero_drop():
    from hwgen.examples.digits import digits_float_net

    fnet, d = digits_float_net()
    r = tune(fnet, "fixed", d.x_train, d.x_test, d.y_test, 0.0, progress=False)
    assert r.accuracy >= r.float_accuracy
    _check_log(r, d.x_test, d.y_test)
    assert r.rom_bits < r.rom_bits_8bit


def test_tune_on_a_residual_net_searches_the_add_outputs_too(res):
    fnet, x, y = res
    r = tune(fnet, "fixed", x[:100], x[100:], y[100:], 10.0, progress=False)
    _check_log(r, x[100:], y[100:])
    assert r.within_budget and r.rom_bits < r.rom_bits_8bit
    act_layers = {t.layer for t in r.trials if t.phase == "activations"}
    assert {"add1", "add2"} <= act_layers
    assert {t.layer for t in r.trials if t.phase == "weights"} == {
        "stem", "b1c1", "b1c2", "b2c1", "b2c2", "fc",
    }  # fmt: skip
    for name in ("add1", "add2"):
        f = r.net.layer(name).out_format
        assert r.precision.layers[name] == AddPrecision(f.bits, f.frac, f.signed)
    steps = [s for s, _ in r.prefix_accuracy]
    assert steps == ["float", "input", "stem", "b1c1", "b1c2", "add1", "b2c1", "b2c2", "add2", "fc"]
    assert r.prefix_accuracy[-1][1] == r.accuracy
    assert quantize(fnet, r.precision, x[:100], progress=False).net == r.net


def test_inq_tune_on_a_residual_net_retrains_the_chosen_bits(res):
    fnet, x, y = res
    opts = InqOptions(epochs=1, portions=(0.5, 1.0))
    train = (x[:100], y[:100])
    r = tune(fnet, "inq", x[:100], x[100:], y[100:], 5.0, train, progress=False, inq_options=opts)
    _check_log(r, x[100:], y[100:])
    assert all(isinstance(lyr.weight_format, Pow2) for lyr in mac_layers(r.net))
    assert isinstance(r.precision.layers["add2"], AddPrecision)
    again = quantize(fnet, r.precision, x[:100], train, progress=False, inq_options=opts)
    assert again.net == r.net


@pytest.mark.slow
def test_digits_inq_half_a_point_saves_rom_bits():
    # issue #9: INQ tuning used to end where it started (18,920 bits, 5-bit everywhere)
    from hwgen.examples.digits import digits_float_net

    fnet, d = digits_float_net()
    train = (d.x_train, d.y_train)
    r = tune(fnet, "inq", d.x_train, d.x_test, d.y_test, 0.5, train, progress=False)
    _check_log(r, d.x_test, d.y_test)
    assert r.rom_bits < 15_000
    assert 100 * r.accuracy >= 100 * r.float_accuracy - 0.5
    assert quantize(fnet, r.precision, d.x_train, train, progress=False).net == r.net


@pytest.mark.parametrize(("scheme", "start", "low"), [("dqc", 5, 3), ("amq", 4, 2)])
def test_learned_scheme_searches_its_bit_count(toy, scheme, start, low):
    """dqc's index bits and amq's planes are searched as INQ's bits: every weight trial
    retrains, activation trials keep the accepted weights, the precision reproduces it."""
    fnet, x, y = toy
    train = (x[:100], y[:100])
    opts = {
        "retrain_options": RetrainOptions(epochs=1),
        "codebook_options": CodebookOptions(epochs=1),
    }
    r = tune(fnet, scheme, x[:100], x[100:], y[100:], 100.0, train, progress=False, **opts)
    _check_log(r, x[100:], y[100:])
    assert r.precision.scheme == scheme
    assert {n: lp.weight_bits for n, lp in r.precision.layers.items()} == dict.fromkeys(
        ("conv1", "conv2", "fc"), low
    )
    weights = [t for t in r.trials if t.phase == "weights"]
    assert [t.layer for t in weights] == [
        n for n in ("fc", "conv2", "conv1") for _ in range(start - low)
    ]
    retrained = f"{scheme} retraining (1 epoch)"
    assert {t.method for t in r.trials if t.phase in ("start", "weights")} == {retrained}
    base = max(i for i, t in enumerate(r.trials) if t.accepted and t.method == retrained)
    assert {t.method for t in r.trials if t.phase == "activations"} == {
        f"the retrained weights of trial {base}, activation formats chosen again (no retraining)"
    }
    if scheme == "dqc":
        assert all(len(lyr.weight_format.entries) == 2**low for lyr in mac_layers(r.net))
    again = quantize(fnet, r.precision, x[:100], train, progress=False, **opts)
    assert again.net == r.net


def test_fixed_width_learned_scheme_tunes_activations_only(toy):
    fnet, x, y = toy
    opts = RetrainOptions(epochs=1)
    r = tune(fnet, "lab", x[:100], x[100:], y[100:], 100.0, (x[:100], y[:100]), progress=False,
             retrain_options=opts)  # fmt: skip
    assert not any(t.phase == "weights" for t in r.trials)
    assert all(
        lyr.weight_format == Pow2(1, 0) and lyr.scale is not None for lyr in mac_layers(r.net)
    )
    assert r.rom_bits == sum(lyr.weight.size for lyr in mac_layers(r.net))


# ---------------------------------------------------------------- sparsity and rank


def test_sparsity_steps():
    assert sparsity_steps(0.9) == [0.25, 0.5, 0.75, 0.9]
    assert sparsity_steps(0.8) == [0.25, 0.5, 0.75, 0.8]
    assert sparsity_steps(0.3) == [0.25, 0.3]
    assert sparsity_steps(0.1) == [0.1]


def test_rom_bits_of_nonzero_blocks_count_a_narrow_last_block_by_its_channels():
    w = np.zeros((2, 5), np.int64)
    w[0, 4] = 1  # the last block of row 0 (one channel wide at block 2)
    w[1, 0] = 1
    layer = Linear("fc", 5, 2, Fixed(4, 0), ActFormat(8, 0), w, np.zeros(2, np.int64))
    net = Network((5,), ActFormat(8, 0), (layer,), "t")
    assert rom_bits(net) == 10 * 4
    assert rom_bits(net, block=2) == (1 + 2) * 4
    assert rom_bits(net, block=5) == 10 * 4
    assert zero_blocks(net, 2) == pytest.approx(4 / 6)


def test_sparsity_search_prunes_within_the_budget_and_its_precision_reproduces_it(toy, monkeypatch):
    fnet, x, y = toy

    def limited(net, x, y):  # the measured accuracy, but fc beyond 70% zero blocks fails
        fc_zeros = block_sparsity(net.layer("fc").weight, 2)
        return 0.0 if fc_zeros > 0.7 else accuracy(net, x, y)

    def diverging(fnet, p, *args, **kwargs):  # conv2's retraining at 0.5 diverges
        if p.pruned.get("conv2") == 0.5:
            raise RetrainDiverged("INQ retraining diverged (loss nan)")
        return quantize(fnet, p, *args, **kwargs)

    monkeypatch.setattr(tune_module, "accuracy", limited)
    monkeypatch.setattr(tune_module, "quantize", diverging)
    opts = InqOptions(epochs=1)
    train = (x[:100], y[:100])
    r = tune(fnet, "fixed", x[:100], x[100:], y[100:], 1.0, train, progress=False,
             inq_options=opts, max_sparsity=0.9, block=2)  # fmt: skip
    assert r.accuracy == accuracy(r.net, x[100:], y[100:]) and r.within_budget
    sparse = [t for t in r.trials if t.phase == "sparsity"]
    floor = 100 * r.float_accuracy - r.max_drop_points - 1e-9
    assert all(t.accepted == (100 * t.accuracy >= floor) for t in sparse)
    # the most weights first; per layer the steps in order until the first miss
    assert list(dict.fromkeys(t.layer for t in sparse)) == ["fc", "conv2", "conv1"]
    kept = {}
    for name in ("fc", "conv2", "conv1"):
        mine = [t for t in sparse if t.layer == name]
        tried = [float(t.change.split(" -> ")[1].split()[0]) for t in mine]
        assert tried == list(SPARSITY_STEPS[: len(tried)])
        assert all(t.accepted for t in mine[:-1])
        accepted = [f for f, t in zip(tried, mine, strict=True) if t.accepted]
        if accepted:
            kept[name] = accepted[-1]
    assert kept and r.precision.pruned == kept and r.precision.block == 2 and r.block == 2
    assert kept["fc"] == 0.5 and [t.accepted for t in sparse][:3] == [True, True, False]
    assert kept["conv2"] == 0.25 and sparse[4].change == "prune 0.25 -> 0.5 (retraining diverged)"
    assert (sparse[4].accuracy, sparse[4].rom_bits, sparse[4].accepted) == (0.0, 0, False)
    assert r.rom_bits == rom_bits(r.net, block=2) < rom_bits(r.net)
    for layer in mac_layers(r.net):
        n = int(np.prod(block_view(layer.weight, 2).shape[:-1]))
        target = round(kept.get(layer.name, 0.0) * n) / n
        assert block_sparsity(layer.weight, 2) >= target
    # precision.toml alone gives the same network: pruned, retrained, quantised again
    again = quantize(fnet, parse(dumps(r.precision)), x[:100], train, progress=False,
                     inq_options=opts)  # fmt: skip
    assert again.net == r.net


def test_compression_sweep_is_measured_and_costed_as_built(toy, tmp_path, monkeypatch):
    from hwgen import emit
    from hwgen.commands import engine_cost

    fnet, x, y = toy

    def diverging(fnet, p, *args, **kwargs):  # the split at rank 2 diverges
        if p.lowrank == 2:
            raise RetrainDiverged("INQ retraining diverged (loss nan)")
        return quantize(fnet, p, *args, **kwargs)

    monkeypatch.setattr(tune_module, "quantize", diverging)
    opts = InqOptions(epochs=1)
    train = (x[:100], y[:100])
    build = emit.BuildOptions(max_pe=1, max_simd=2, vectors=1)
    r = tune(fnet, "fixed", x[:100], x[100:], y[100:], 1.0, train, progress=False,
             inq_options=opts, block=2, sweep=engine_cost(build))  # fmt: skip
    assert r.block is None and not any(t.phase == "sparsity" for t in r.trials)
    # toy's conv2 (4 -> 8, 3x3) splits below rank 8 (36 weights per rank of 288)
    assert [(p.kind, p.target) for p in r.sweep] == [
        ("dense", None),
        *(("sparsity", f) for f in SWEEP_SPARSITY),
        ("rank", 1), ("rank", 4),
    ]  # fmt: skip
    assert r.sweep_diverged == ("rank 2",)
    dense = r.sweep[0]
    assert dense.net == r.net and dense.accuracy == r.accuracy
    for p in r.sweep:
        assert p.accuracy == accuracy(p.net, x[100:], y[100:])  # the golden model's
        assert p.sparsity == zero_blocks(p.net, 2) and p.block == 2
    for p in r.sweep[1:5]:  # every layer but the first, in blocks of 2
        assert p.precision.pruned == {"conv2": p.target, "fc": p.target}
        assert p.precision.block == 2
    zeros = [p.sparsity for p in r.sweep[:5]]
    assert zeros == sorted(zeros) and zeros[-1] > 0.6
    top = r.sweep[4]
    assert top.cost.rom_bits < dense.cost.rom_bits / 2 and top.cost.cycles < dense.cost.cycles
    for p in r.sweep[5:]:
        assert p.precision.lowrank == p.target
        names = [lyr.name for lyr in mac_layers(p.net)]
        assert names[-3:] == ["conv2_v", "conv2_h", "fc"]
        assert p.cost.macs < dense.cost.macs
    # the cost is what hwgen build makes of the point: manifest ideal cycles and ROM words
    manifest = emit.build(top.net, tmp_path / "b", build)
    assert manifest["top"]["ideal_cycles"] == top.cost.cycles
    rom = sum(e["rom_depth"] * e["rom_width"] for e in manifest["layers"])
    assert rom == top.cost.rom_bits
    # and a point's precision reproduces it
    for p in (top, r.sweep[-1]):
        again = quantize(fnet, p.precision, x[:100], train, progress=False, inq_options=opts)
        assert again.net == p.net
