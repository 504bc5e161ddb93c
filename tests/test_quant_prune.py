import numpy as np
import pytest
import torch

from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.frontend.graph import FConv2d, FFlatten, FLinear, FloatNet
from hwgen.ir import Conv2d, Linear, Pow2
from hwgen.quant.inq import InqOptions
from hwgen.quant.precision import Precision
from hwgen.quant.prune import (
    block_sparsity,
    block_view,
    grow_mask,
    masked_inq,
    nonzero_blocks,
    prune,
    schedule,
)
from hwgen.quant.quantize import quantize
from hwgen.quant.weights import dequantize, quantize_pow2


def _naive_nonzero_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """Count blocks by loops over (out, kernel position, channel group)."""
    w4 = w if w.ndim == 4 else w[:, :, None, None]
    cout, cin, kh, kw = w4.shape
    counts = np.zeros(cout, np.int64)
    for o in range(cout):
        for y in range(kh):
            for x in range(kw):
                for c0 in range(0, cin, block):
                    counts[o] += bool(np.any(w4[o, c0 : c0 + block, y, x] != 0))
    return counts


@pytest.mark.parametrize("shape", [(3, 5, 2, 3), (4, 8, 3, 3), (6, 13)])
@pytest.mark.parametrize("block", [1, 2, 4])
def test_nonzero_blocks_match_a_loop_over_channel_groups(shape, block):
    rng = np.random.default_rng(block)
    w = rng.integers(-2, 3, shape) * (rng.random(shape) < 0.3)
    w[0] = 0  # an all-zero output channel
    got = nonzero_blocks(w, block)
    assert np.array_equal(got, _naive_nonzero_blocks(w, block))
    assert got[0] == 0
    blocks = shape[0] * -(-shape[1] // block) * int(np.prod(shape[2:]))
    assert block_sparsity(w, block) == pytest.approx(1 - got.sum() / blocks)
    assert np.array_equal(nonzero_blocks(w, None), np.count_nonzero(w.reshape(shape[0], -1), 1))


def test_dense_blocks_are_channels_of_one_pixel_in_the_flatten_order():
    c, h, w = 8, 3, 2
    fnet = FloatNet((c, h, w), (FFlatten("flat"),))
    x = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w)
    flat = fnet.forward(x)[-1].numpy()  # the dense layer's input vector, (1, H*W*C)
    v = block_view(flat, 4)  # a dense weight row's blocks
    for g in range(v.shape[1]):
        pixel, half = divmod(g, c // 4)
        py, px = divmod(pixel, w)
        assert np.array_equal(v[0, g], x[0, 4 * half : 4 * half + 4, py, px].numpy())


@pytest.mark.parametrize("block", [None, 3, 4])
def test_masks_hit_the_block_count_grow_and_prune_the_smallest(block):
    w = np.random.default_rng(0).normal(size=(6, 10, 3, 3))
    kept = np.ones(w.shape, bool)
    b = block or 1
    blocks = 6 * -(-10 // b) * 9
    for s in schedule(0.8, 3):
        new = grow_mask(w, kept, s, block)
        assert np.all(new <= kept)  # a pruned weight stays pruned
        zero = np.where(new, w, 0.0)
        assert round(block_sparsity(zero, block) * blocks) == round(s * blocks)
        norms = np.sqrt(np.sum(block_view(w, block) ** 2, -1))
        gone = ~np.any(block_view(new, block), -1) & np.any(block_view(kept, block), -1)
        left = np.any(block_view(new, block), -1)
        assert norms[gone].max() <= norms[left].min()
        kept = new


def test_schedule_halves_the_remaining_steps():
    assert schedule(0.9, 3) == pytest.approx([0.45, 0.675, 0.9])
    assert schedule(0.5, 1) == [0.5]


def test_bad_arguments_are_one_line_errors():
    fnet, data = digits_float_net()
    train = (data.x_train[:8], data.y_train[:8])
    with pytest.raises(HwgenError, match="block must be a positive integer, not 0"):
        prune(fnet, train, 0.5, block=0)
    with pytest.raises(HwgenError, match="layer conv1 sparsity must be in"):
        prune(fnet, train, 1.0)
    with pytest.raises(HwgenError, match="no conv/linear layer named 'pool1'"):
        prune(fnet, train, {"pool1": 0.5})
    with pytest.raises(HwgenError, match="steps must be a positive integer, not 0"):
        prune(fnet, train, 0.5, steps=0)
    with pytest.raises(HwgenError, match=r"not \(2, 3, 4\)"):
        block_view(np.zeros((2, 3, 4)), 2)
    with pytest.raises(HwgenError, match="no power-of-two format for layer conv2"):
        masked_inq(fnet, {}, {"conv1": Pow2(5, 0)}, train)
    with pytest.raises(HwgenError, match="no zero level"):
        masked_inq(fnet, {}, dict.fromkeys(("conv1", "conv2", "fc"), Pow2(1, 0)), train)


def _tiny() -> tuple[FloatNet, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    fnet = FloatNet(
        (4, 3, 3),
        (
            FConv2d("c", rng.normal(0, 0.5, (8, 4, 3, 3)), rng.normal(0, 0.1, 8), relu=True),
            FFlatten("f"),
            FLinear("d", rng.normal(0, 0.3, (3, 8)), np.zeros(3)),
        ),
    )
    x = rng.random((48, 4, 3, 3))
    return fnet, (x, rng.integers(0, 3, 48))


def test_retraining_keeps_pruned_weights_zero_and_is_deterministic():
    fnet, train = _tiny()
    opts = InqOptions(epochs=2)
    got, masks = prune(fnet, train, {"c": 0.5, "d": 0.25}, block=2, options=opts, progress=False)
    again, _ = prune(fnet, train, {"c": 0.5, "d": 0.25}, block=2, options=opts, progress=False)
    before = {fl.name: fl for fl in fnet.layers}
    for fl, fa in zip(got.layers, again.layers, strict=True):
        if isinstance(fl, (FConv2d, FLinear)):
            assert np.all(fl.weight[~masks[fl.name]] == 0.0)
            assert np.array_equal(fl.weight, fa.weight)
            assert not np.array_equal(fl.bias, before[fl.name].bias)  # biases retrain
            kept = fl.weight[masks[fl.name]]
            assert np.count_nonzero(kept) == kept.size  # the kept ones still train
    assert block_sparsity(masks["c"], 2) == 0.5
    assert block_sparsity(masks["d"], 2) == 0.25


def test_pruned_zeros_survive_rounding_schemes_and_masked_inq():
    fnet, (x, y) = _tiny()
    pruned, masks = prune(
        fnet, (x, y), 0.5, block=4, steps=1, options=InqOptions(epochs=1), progress=False
    )
    for scheme in ("fixed", "pow2"):
        net = quantize(pruned, Precision(scheme), x[:16], progress=False).net
        for layer in net.layers:
            if isinstance(layer, (Conv2d, Linear)):
                assert np.all(layer.weight[~masks[layer.name]] == 0)
    formats = {"c": Pow2(5, -1), "d": Pow2(5, -1)}
    got = masked_inq(
        pruned, masks, formats, (x, y), InqOptions(epochs=1, portions=(0.5, 1.0)), progress=False
    )
    for fl in got.layers:
        if isinstance(fl, (FConv2d, FLinear)):
            fmt = formats[fl.name]
            assert np.all(fl.weight[~masks[fl.name]] == 0.0)
            assert np.array_equal(fl.weight, dequantize(quantize_pow2(fl.weight, fmt), fmt))


def test_digits_block_pruning_keeps_accuracy():
    fnet, data = digits_float_net()
    pruned, masks = prune(fnet, (data.x_train, data.y_train), 0.5, block=4, steps=2, progress=False)
    x = torch.as_tensor(data.x_test, dtype=torch.float64)
    acc = np.mean(pruned.forward(x)[-1].argmax(1).numpy() == data.y_test)
    assert acc >= 0.95
    for fl in pruned.layers:
        if isinstance(fl, (FConv2d, FLinear)):
            assert block_sparsity(fl.weight, 4) == pytest.approx(0.5, abs=1 / masks[fl.name].size)
