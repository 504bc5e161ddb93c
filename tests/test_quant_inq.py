import numpy as np
import pytest
import torch
from conftest import tiny_float_net
from test_quant_tune import residual_problem

from hwgen.errors import HwgenError
from hwgen.frontend.graph import FConv2d, FLinear
from hwgen.ir import Pow2
from hwgen.quant.inq import FloatModule, InqOptions, inq, select_to_freeze
from hwgen.quant.weights import inq_emax, quantize_pow2


def test_float_module_matches_float_net():
    rng = np.random.default_rng(0)
    fnet = tiny_float_net(rng)
    x = rng.normal(size=(5, 1, 6, 6))
    want = fnet.forward(torch.as_tensor(x))[-1]
    got = FloatModule(fnet).double()(torch.as_tensor(x))
    assert torch.allclose(want, got, rtol=1e-6, atol=1e-6)  # float, HWC flatten: same graph


def test_float_module_runs_the_residual_graph():
    fnet, x, _ = residual_problem(n=6)
    want = fnet.forward(torch.as_tensor(x))[-1]
    module = FloatModule(fnet).double()
    got = module(torch.as_tensor(x))
    assert torch.allclose(want, got, rtol=1e-6, atol=1e-6)  # weights went through float32
    assert [n for n, _ in module.named_parameters()][:4] == [
        "macs.0.weight", "macs.0.bias", "macs.1.weight", "macs.1.bias",
    ]  # fmt: skip
    assert len(list(module.parameters())) == 2 * 6  # the conv/linear layers only


def test_magnitude_partition_takes_the_largest_free_weights():
    w = np.array([0.1, -0.9, 0.5, -0.3, 0.7])
    frozen = np.array([False, True, False, False, False])
    picked = select_to_freeze(w, frozen, 2, "magnitude", np.random.default_rng(0))
    assert sorted(picked.tolist()) == [2, 4]
    rnd = select_to_freeze(w, frozen, 4, "random", np.random.default_rng(0))
    assert sorted(rnd.tolist()) == [0, 2, 3, 4]


@pytest.mark.parametrize("partition", ["magnitude", "random"])
def test_inq_ends_on_grid_and_is_seeded(partition):
    rng = np.random.default_rng(1)
    fnet = tiny_float_net(rng)
    x = rng.uniform(0, 1, (48, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 48)
    fmts = {"c": Pow2(4, inq_emax(fnet.layers[0].weight)), "fc": Pow2(3, -1)}
    opts = InqOptions(epochs=2, batch_size=16, partition=partition)
    a, before = inq(fnet, fmts, (x, y), opts, progress=False)
    b, _ = inq(fnet, fmts, (x, y), opts, progress=False)
    for name, i in (("c", 0), ("fc", 3)):
        w = a.layers[i].weight
        assert np.array_equal(w, b.layers[i].weight)
        q = quantize_pow2(w, fmts[name])
        assert np.array_equal(q * 2.0 ** -fmts[name].frac, w)  # exactly on the grid
        assert before[name].shape == w.shape
        if partition == "magnitude":  # step 1 froze the largest half at its power of two
            w0 = fnet.layers[i].weight
            top = np.argsort(-np.abs(w0.ravel()), kind="stable")[: round(0.5 * w0.size)]
            q0 = quantize_pow2(w0, fmts[name]) * 2.0 ** -fmts[name].frac
            assert np.array_equal(w.ravel()[top], q0.ravel()[top])
    assert not np.array_equal(a.layers[3].bias, fnet.layers[3].bias)  # biases retrained


def test_options_checked():
    with pytest.raises(HwgenError, match=r"portions must increase and end at 1\.0"):
        InqOptions(portions=(0.5, 0.4, 1.0))
    with pytest.raises(HwgenError, match="optimizer must be sgd or adam"):
        InqOptions(optimizer="rmsprop")


def test_inq_retrains_a_residual_net_onto_its_grids():
    fnet, x, y = residual_problem(n=96)
    macs = [fl for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear))]
    fmts = {fl.name: Pow2(5, inq_emax(fl.weight)) for fl in macs}
    opts = InqOptions(epochs=1, batch_size=32)
    a, _ = inq(fnet, fmts, (x.astype(np.float32), y), opts, progress=False)
    b, _ = inq(fnet, fmts, (x.astype(np.float32), y), opts, progress=False)
    assert [fl.inputs for fl in a.layers] == [fl.inputs for fl in fnet.layers]
    for fl, fb, f0 in zip(a.layers, b.layers, fnet.layers, strict=True):
        if fl.name in fmts:
            fmt = fmts[fl.name]
            assert np.array_equal(fl.weight, fb.weight)  # seeded
            assert np.array_equal(quantize_pow2(fl.weight, fmt) * 2.0**-fmt.frac, fl.weight)
            assert not np.array_equal(fl.bias, f0.bias)  # every branch was trained
