"""Zero-block skipping: the schedule, the ROM it selects, and sparse engines against the
golden model with random stalls (all-zero PE rows, an all-zero layer, one nonzero block)."""

import numpy as np
import pytest
from conftest import lane_weights
from test_hw_engine import run_engine

from hwgen.golden import layer_forward
from hwgen.hw.engine import engine_info, make_engine
from hwgen.hw.folding import plan_layer
from hwgen.hw.rom import decode_weights, rom_width, rom_words, weight_matrix
from hwgen.hw.sparse import fold_schedule, is_dense, pixel_beats, rom_addresses, window_beats
from hwgen.ir import ActFormat, Conv2d, Fixed, Linear, Network, Pow2

POW2 = Pow2(4, -1)


def _conv(weight, fmt=POW2, hw=(4, 5), stride=1, padding=1):
    cout, cin, kh, kw = weight.shape
    bias = np.arange(cout) * 37 - 60
    layer = Conv2d(
        "conv", cin, cout, (kh, kw), fmt, ActFormat(8, 1), weight, bias,
        stride=(stride, stride), padding=(padding, padding), relu=True,
    )  # fmt: skip
    return Network((cin, *hw), ActFormat(8, 4), (layer,))


def _blocks(rng, shape, keep, simd, fmt=POW2):
    """Random weights with each block (SIMD input channels of one output channel at one
    kernel position) kept with probability ``keep``, else all zero."""
    cout, cin, kh, kw = shape
    w = lane_weights(rng, fmt, shape)
    w = np.where(w == 0, 1, w)  # only whole blocks are zero
    kept = rng.random((cout, cin // simd, kh, kw)) < keep
    return w * np.repeat(kept, simd, axis=1)


def test_schedule_is_the_union_of_the_folds_pes():
    w = np.zeros((4, 4, 1, 2), np.int64)  # Cout 4, Cin 4, 1x2: at SIMD 2, 4 beats a window
    w[0, 3, 0, 1] = 1  # fold 0 (channels 0, 1): beat (kw 1, g 1) = 3
    w[1, 0, 0, 0] = -2  # fold 0: beat 0
    w[1, 1, 0, 0] = 4  # the same block
    layer = _conv(w, padding=0).layers[0]  # fold 1 (channels 2, 3): all zero
    assert window_beats(layer, 2) == 4
    schedule = fold_schedule(layer, 2, 2)
    assert schedule == ((0, 3), (0,))
    assert pixel_beats(schedule) == 3 and not is_dense(schedule, 4)
    assert rom_addresses(schedule, 4).tolist() == [0, 3, 4]
    assert fold_schedule(layer, 1, 4) == ((1,), (0,), (0,), (0,))
    assert fold_schedule(layer, 4, 1) == ((0, 1, 7),)
    dense = _conv(np.ones((2, 2, 3, 3), np.int64)).layers[0]
    assert is_dense(fold_schedule(dense, 1, 2), 9)


@pytest.mark.parametrize(("pe", "simd"), [(1, 1), (2, 3), (4, 6), (2, 2)])
def test_rom_holds_the_scheduled_words_in_order(pe, simd):
    rng = np.random.default_rng(pe * 7 + simd)
    fmt = Fixed(5, 0)
    w = _blocks(rng, (4, 6, 2, 3), 0.5, 1, fmt)
    w[1] = 0  # an all-zero output channel
    layer = _conv(w, fmt).layers[0]
    words = rom_words(layer, pe, simd)
    beats = window_beats(layer, simd)
    addrs = rom_addresses(fold_schedule(layer, pe, simd), beats)
    assert len(words) == len(addrs) <= 4 // pe * beats
    m = weight_matrix(layer).reshape(4, -1, simd)  # (Cout, beat, lane)
    cb = fmt.bits
    for word, addr in zip(words, addrs, strict=True):
        nf, beat = divmod(int(addr), beats)
        for k in range(pe):
            codes = [(int(word) >> ((k * simd + lane) * cb)) & 31 for lane in range(simd)]
            assert decode_weights(fmt, np.array(codes)).tolist() == m[nf * pe + k, beat].tolist()
    # Every skipped word is zero in all PEs of its fold.
    skipped = np.setdiff1d(np.arange(4 // pe * beats), addrs)
    folds = m.reshape(4 // pe, pe, beats, simd).transpose(0, 2, 1, 3).reshape(-1, pe * simd)
    assert not folds[skipped].any()


CASES = {
    # weights, PE, SIMD, stride, padding
    "random_blocks_pe1": ("random", 1, 2, 1, 1),
    "random_blocks_pe2": ("random", 2, 2, 1, 1),
    "zero_pe_rows": ("zero_pe_rows", 2, 2, 1, 1),
    "zero_layer": ("zero_layer", 2, 4, 1, 0),
    "single_block": ("single_block", 1, 2, 2, 1),
}


def _case_weights(rng, kind, shape, simd):
    w = _blocks(rng, shape, 0.3, simd)
    if kind == "zero_pe_rows":  # PE 0 of fold 0 (channel 0); fold 1 (channels 2, 3) all zero
        w[[0, 2, 3]] = 0
    elif kind == "zero_layer":
        w[:] = 0
    elif kind == "single_block":
        w[:] = 0
        w[2, 2:4, 1, 0] = [4, -1]
    return w


@pytest.mark.parametrize(("kind", "pe", "simd", "stride", "padding"), CASES.values(), ids=CASES)
def test_sparse_engine_matches_golden_with_stalls(kind, pe, simd, stride, padding):
    rng = np.random.default_rng(len(kind))
    w = _case_weights(rng, kind, (4, 4, 3, 3), simd)
    net = _conv(w, stride=stride, padding=padding)
    info = engine_info(net, 0, pe, simd)
    assert info.ideal_cycles < info.macs // (pe * simd)  # blocks are skipped
    x = rng.integers(-128, 128, size=(2, 4, 4, 5))
    got, _ = run_engine(net, 0, pe, simd, x, stall_in=0.3, stall_out=0.3, seed=pe)
    assert np.array_equal(got, layer_forward(net.layers[0], x, net.input_format))


def test_sparse_dense_layer_matches_golden_with_stalls():
    rng = np.random.default_rng(11)
    w = _blocks(rng, (6, 12, 1, 1), 0.25, 4)[:, :, 0, 0]
    w[4:] = 0
    layer = Linear("fc", 12, 6, POW2, ActFormat(8, 2), w, rng.integers(-99, 99, 6))
    net = Network((12,), ActFormat(6, 3, signed=False), (layer,))
    x = rng.integers(0, 64, size=(3, 12))
    got, _ = run_engine(net, 0, 2, 4, x, stall_in=0.2, stall_out=0.4, seed=2)
    assert np.array_equal(got, layer_forward(layer, x, net.input_format))


def test_cycles_follow_the_schedule():
    """Cycles per pixel = sum over folds of max(1, scheduled beats): the engine keeps one
    beat a cycle, and skipping 3/4 of the blocks is ~4x fewer cycles than dense."""
    rng = np.random.default_rng(3)
    w = _blocks(rng, (4, 8, 3, 3), 0.25, 4)
    net = _conv(w, hw=(5, 5))
    dense = _conv(np.where(w == 0, 1, w), hw=(5, 5))
    x = rng.integers(-128, 128, size=(2, 8, 5, 5))
    schedule = fold_schedule(net.layers[0], 1, 4)
    info = engine_info(net, 0, 1, 4)
    assert info.ideal_cycles == 25 * sum(max(1, len(s)) for s in schedule)
    assert info.rom_depth == pixel_beats(schedule) == len(info.roms[0])
    assert engine_info(dense, 0, 1, 4).ideal_cycles == info.macs // 4
    got, cycles = run_engine(net, 0, 1, 4, x)
    assert np.array_equal(got, layer_forward(net.layers[0], x, net.input_format))
    _, cycles1 = run_engine(net, 0, 1, 4, x[:1])
    per_image = cycles - cycles1  # steady state: the fill latency cancels
    assert info.ideal_cycles <= per_image <= 1.02 * info.ideal_cycles
    _, dense2 = run_engine(dense, 0, 1, 4, x)
    _, dense1 = run_engine(dense, 0, 1, 4, x[:1])
    assert (dense2 - dense1) / per_image >= 3


def test_folding_plan_counts_the_scheduled_beats():
    rng = np.random.default_rng(5)
    net = _conv(_blocks(rng, (4, 4, 3, 3), 0.25, 2))
    info = engine_info(net, 0, 2, 2)
    p = plan_layer(net, 0, 2, 2)
    assert p.cycles == info.ideal_cycles
    assert p.rom_bits == info.rom_depth * rom_width(net.layers[0], 2, 2)


def test_a_dense_layer_builds_the_dense_window():
    net = _conv(np.ones((2, 2, 3, 3), np.int64))
    assert make_engine(net, 0, 1, 2).elaborate(None).submodules.window.schedule is None
