"""The ``digits-res`` example: a residual CNN, accurate, deterministic, imported exactly."""

from __future__ import annotations

import numpy as np
import torch

from hwgen.examples import load_example
from hwgen.examples.digits import load_digits_split, train
from hwgen.examples.digits_res import (
    EPOCHS,
    LR,
    build_digits_res_model,
    digits_res_float_net,
    train_digits_res_model,
)
from hwgen.frontend import load_model
from hwgen.frontend.graph import FAdd, FConv2d, FFlatten, FGlobalAvgPool, FLinear, FSubsamplePad
from hwgen.reproducible import float64_init


def test_trained_model_is_accurate_and_imports_exactly():
    net, data = digits_res_float_net()
    assert [type(layer) for layer in net.layers] == [
        FConv2d, FConv2d, FConv2d, FAdd, FConv2d, FConv2d, FSubsamplePad, FAdd,
        FGlobalAvgPool, FFlatten, FLinear,
    ]  # fmt: skip
    assert [layer.name for layer in net.layers] == [
        "conv1",
        "layers_0_0_conv1",
        "layers_0_0_conv2",
        "layers_0_0",
        "layers_1_0_conv1",
        "layers_1_0_conv2",
        "layers_1_0_shortcut",
        "layers_1_0",
        "pool",
        "flatten",
        "linear",
    ]
    assert net.layers[3].inputs == ("layers_0_0_conv2", "conv1") and net.layers[3].relu
    assert net.layers[6].stride == (2, 2) and net.layers[6].pad == (4, 4)
    assert sum(p.numel() for p in build_digits_res_model().parameters()) == 4962
    model = train_digits_res_model(0).double()
    x = torch.from_numpy(data.x_test).double()
    with torch.no_grad():
        want = model(x)
    got = net.forward(x)[-1]
    assert torch.allclose(got, want, rtol=0, atol=1e-9)
    acc = float((got.argmax(1).numpy() == data.y_test).mean())
    assert acc >= 0.97, acc
    assert np.array_equal(data.x_test, load_digits_split().x_test)  # the digits split
    assert load_model("digits-res")[0] is net and load_example("digits-res")[0] is net


def test_training_is_deterministic_whatever_the_thread_count():
    # A training from scratch, bypassing the cache, with another thread count set around it:
    # the same weights bit for bit as the cached model's.
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        torch.manual_seed(0)
        with float64_init():
            model = build_digits_res_model()
        fresh = train(model, load_digits_split(), EPOCHS, 0, LR).state_dict()
    finally:
        torch.set_num_threads(threads)
    cached = train_digits_res_model(0).state_dict()  # what digits_res_float_net() imports
    assert all(torch.equal(fresh[k], cached[k]) for k in cached)
