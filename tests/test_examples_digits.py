"""The ``digits`` example: fixed split, accurate, deterministic, imported exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hwgen.examples.digits import (
    accuracy,
    build_digits_model,
    digits_float_net,
    load_digits_split,
    train,
    train_digits_model,
)
from hwgen.frontend import load_model
from hwgen.frontend.graph import FConv2d, FFlatten, FLinear, FMaxPool2d
from hwgen.reproducible import float64_init


def test_split_is_fixed_and_stratified():
    a, b = load_digits_split(), load_digits_split()
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == np.float32 and a.y_test.dtype == np.int64
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert np.array_equal(np.bincount(a.y_test), [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])
    assert np.array_equal(a.y_test[:8], [7, 6, 3, 7, 7, 3, 2, 8])  # pins the shuffle too


def test_trained_model_is_accurate_and_imports_exactly():
    net, data = digits_float_net()
    assert [type(layer) for layer in net.layers] == [
        FConv2d,
        FMaxPool2d,
        FConv2d,
        FFlatten,
        FLinear,
    ]
    assert [layer.name for layer in net.layers] == ["conv1", "pool1", "conv2", "flatten", "fc"]
    model = train_digits_model(0).double()
    x = torch.from_numpy(data.x_test).double()
    with torch.no_grad():
        want = model(x)
    got = net.forward(x)[-1]
    assert torch.allclose(got, want, rtol=0, atol=1e-9)
    acc = float((got.argmax(1).numpy() == data.y_test).mean())
    assert acc >= 0.95, acc
    assert load_model("digits")[0] is net


def test_training_is_deterministic():
    # Two full trainings from scratch, bypassing the cache: identical weights, bit for bit.
    data = load_digits_split()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        with float64_init():
            model = build_digits_model()
        states.append(train(model, data, seed=0).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    cached = train_digits_model(0).state_dict()  # what digits_float_net() imports
    assert all(torch.equal(states[0][k], cached[k]) for k in cached)


# Trains the example from scratch (no cache) and runs a short INQ on it; a digest of both.
_DIGEST = """
import hashlib, torch
from hwgen.examples.digits import INPUT_SHAPE, build_digits_model, load_digits_split, train
from hwgen.frontend.torch_import import from_module
from hwgen.quant import quantize
from hwgen.quant.inq import InqOptions
from hwgen.quant.precision import Precision
from hwgen.reproducible import float64_init

def digest():
    d = load_digits_split()
    torch.manual_seed(0)
    with float64_init():
        model = build_digits_model()
    fnet = from_module(train(model, d), INPUT_SHAPE)
    q = quantize(fnet, Precision("inq", {}), d.x_train[:1], (d.x_train, d.y_train),
                 progress=False, inq_options=InqOptions(epochs=1))
    h = hashlib.sha256()
    for layer in fnet.layers + q.net.layers:
        for name in ("weight", "bias"):
            if hasattr(layer, name):
                h.update(getattr(layer, name).tobytes())
    return h.hexdigest()
"""


@pytest.fixture(scope="module")
def digest_here() -> str:
    """The digest in this process, with PyTorch on two threads."""
    scope: dict = {}
    exec(_DIGEST, scope)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return scope["digest"]()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "env",
    [
        # one thread, ATen's scalar kernels instead of this machine's vector ones
        {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
        # two threads, oneDNN restricted to SSE4.1 (other convolution kernels)
        {"OMP_NUM_THREADS": "2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    ],
)
def test_weights_do_not_depend_on_the_machine(env, digest_here):
    # Trained in float32, each of these environments gave other weights (97.5-98.1% float).
    run = subprocess.run(
        [sys.executable, "-c", _DIGEST + "print(digest())"],
        env=os.environ | env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == digest_here


def test_training_restores_the_thread_count_and_default_dtype():
    data = load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = train(build_digits_model(), data, epochs=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.get_default_dtype() == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    grid = torch.cat([p.detach().double().ravel() for p in model.parameters()]) * 2.0**24
    assert torch.equal(grid, grid.round())  # on the snapped grid


def test_accuracy_helper_and_after_step_callback():
    data = load_digits_split()
    seen = []

    def freeze_first_bias(model: torch.nn.Module) -> None:
        seen.append(1)
        model.conv1.bias[0] = 0.25  # e.g. INQ re-imposing an already quantized weight

    model = train(build_digits_model(), data, epochs=1, seed=1, after_step=freeze_first_bias)
    assert len(seen) == -(-1437 // 128)
    assert model.conv1.bias[0].item() == 0.25 and not model.training
    assert 0.0 <= accuracy(model, data.x_test, data.y_test) <= 1.0
