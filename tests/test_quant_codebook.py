import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hwgen.errors import HwgenError
from hwgen.examples.digits import digits_float_net
from hwgen.quant import codebook
from hwgen.quant.codebook import (
    Codebook,
    CodebookOptions,
    TtqFn,
    assign,
    dqc,
    entry_frac,
    feasible,
    init_codebook,
    nearest_shift_add,
    refit,
    shift_add_terms,
    ttq,
    weighted_error,
)
from hwgen.quant.inq import with_weights
from hwgen.quant.prune import block_sparsity, grow_mask


@functools.cache
def _two_terms(top: int) -> frozenset[int]:
    """Brute force: 0, ±2^j and ±2^j ± 2^k for shifts up to ``top``."""
    p = [0] + [s << k for k in range(top + 1) for s in (1, -1)]
    return frozenset(a + b for a in p for b in p)


@given(st.integers(-(1 << 20), 1 << 20))
def test_shift_add_terms_exact_and_minimal(e):
    if e not in _two_terms(22):
        with pytest.raises(HwgenError, match=rf"^codebook entry {e} is not 0, ±2\^k or ±2\^j"):
            shift_add_terms(e)
        return
    terms = shift_add_terms(e)
    assert sum(s << k for s, k in terms) == e
    assert all(s in (1, -1) for s, _ in terms)
    assert [k for _, k in terms] == sorted({k for _, k in terms}, reverse=True)
    # minimal: no terms only for 0, one only for a power of two
    assert (len(terms) == 0) == (e == 0)
    assert (len(terms) <= 1) == (e == 0 or (abs(e) & (abs(e) - 1)) == 0)


def test_shift_add_terms_every_small_integer():
    for e in range(-600, 601):
        if e in _two_terms(12):
            assert sum(s << k for s, k in shift_add_terms(e)) == e
        else:
            with pytest.raises(HwgenError):
                shift_add_terms(e)
    assert shift_add_terms(7) == [(1, 3), (-1, 0)]  # 8 - 1, not 4 + 2 + 1
    assert shift_add_terms(-10) == [(-1, 3), (-1, 1)]


@pytest.mark.parametrize("kmax", range(7))
def test_feasible_is_every_shift_add_integer_in_range(kmax):
    want = sorted(e for e in range(-(1 << kmax), (1 << kmax) + 1) if e in _two_terms(kmax + 2))
    assert feasible(kmax).tolist() == want
    assert all(k <= kmax for e in want for _, k in shift_add_terms(e))


@pytest.mark.parametrize(("kmax", "frac"), [(0, 0), (3, 0), (4, 2), (5, -1), (6, 5)])
def test_nearest_shift_add_is_the_nearest_feasible_value(kmax, frac):
    grid = [e for e in range(-(1 << kmax), (1 << kmax) + 1) if e in _two_terms(kmax + 2)]
    span = 2.0 ** (kmax - frac)
    x = np.concatenate([np.arange(-1.25 * span, 1.25 * span, 2.0**-frac / 8), [0.0, 1e9, -1e9]])
    got = nearest_shift_add(x, frac, kmax)
    for xi, e in zip(x, got.tolist(), strict=True):
        dist = [abs(xi - g * 2.0**-frac) for g in grid]
        best = min(dist)
        assert abs(xi - e * 2.0**-frac) == best
        ties = [g for g, d in zip(grid, dist, strict=True) if d == best]
        assert e == min(ties, key=lambda g: (abs(g), -g))  # smaller magnitude, then +a


def test_entry_frac_uses_the_top_entry():
    assert entry_frac(1.0, 6) == 6  # 64 * 2**-6 = 1.0 exactly
    assert entry_frac(0.75, 6) == 6
    assert entry_frac(1.0000001, 6) == 5
    assert entry_frac(0.5, 3) == 4
    assert entry_frac(0.0, 6) == 6
    with pytest.raises(HwgenError, match="codebook scale must be a finite magnitude, not nan"):
        entry_frac(float("nan"))


def _weights(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.laplace(0, 0.2, n) + rng.normal(0, 0.02, n)


@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 5),
    st.booleans(),
    st.sampled_from([0.0, 1.0, 2.0]),
    st.integers(3, 8),
)
def test_refit_never_increases_the_weighted_error(seed, bits, zero, power, kmax):
    w = _weights(seed, 300)
    frac = entry_frac(float(np.abs(w).max()), kmax)
    rng = np.random.default_rng(seed)
    grid = feasible(kmax) if zero else feasible(kmax)[feasible(kmax) != 0]
    if len(grid) < 1 << bits:
        with pytest.raises(HwgenError, match=f"^kmax {kmax} has {len(grid)} shift-add values"):
            init_codebook(w, bits, frac, zero=zero, kmax=kmax)
        return
    start = set(rng.choice(grid, (1 << bits) - zero, replace=False).tolist())
    start = start | {0} if zero else start
    while len(start) < 1 << bits:  # a drawn 0 left the codebook one short
        start.add(int(rng.choice(grid)))
    cb = tuple(sorted(start))
    for _ in range(3):
        new = refit(w, cb, frac, zero=zero, kmax=kmax, power=power)
        before = weighted_error(w, cb, frac, power)
        assert weighted_error(w, new, frac, power) <= before * (1 + 1e-12)
        assert len(new) == 1 << bits and list(new) == sorted(set(new))
        assert all(int(e) in set(grid.tolist()) for e in new)  # feasible, 0 only if pinned
        assert (0 in new) == zero
        cb = new


def test_refit_merges_collapsed_entries_and_refills():
    # 17 takes the weights at 18.4, 20 those at 18.6: both means project to 18 (16 + 2),
    # so the two merge and the freed entry goes where it saves most, to the weights at -3
    w = np.concatenate([np.full(50, 18.4), np.full(50, 18.6), np.full(10, -3.0)])
    cb = (0, 17, 20)
    new = refit(w, cb, 0, zero=True, kmax=6, power=1.0)
    assert new == (-3, 0, 18)
    assert weighted_error(w, new, 0, 1.0) < weighted_error(w, cb, 0, 1.0)


def test_init_codebook_is_symmetric_for_symmetric_weights():
    w = _weights(3, 500)
    w = np.concatenate([w, -w])
    frac = entry_frac(float(np.abs(w).max()))
    cb = init_codebook(w, 3, frac, zero=False)
    assert list(cb) == sorted(-e for e in cb)
    assert len(init_codebook(w, 3, frac, zero=True)) == 8


def test_codebook_of_all_zero_weights_is_still_full_and_distinct():
    for zero in (False, True):
        cb = init_codebook(np.zeros(10), 3, 6, zero=zero)
        assert len(cb) == 8 and list(cb) == sorted(set(cb)) and (0 in cb) == zero
    with pytest.raises(HwgenError, match=r"^DQC codebook \[1, 2\] must hold 0"):
        refit(np.ones(3), (1, 2), 0, zero=True)


def test_assign_picks_the_nearest_entry():
    entries = (-8, -2, 0, 3, 16)
    w = np.array([-100.0, -5.0, -4.9, -1.0, 1.5, 1.6, 9.5, 10.0, 100.0]) / 4
    # -5, -1, 1.5 and 9.5 are midpoints: they go to the smaller magnitude
    assert np.asarray(entries)[assign(w, entries, 2)].tolist() == [-8, -2, -2, 0, 0, 3, 3, 16, 16]
    assert assign(w, entries, 2).dtype == np.uint8


def test_codebook_checks_its_entries():
    idx = np.zeros((2, 2), np.uint8)
    cb = Codebook((-12, 0, 7), 3, np.array([[0, 1], [2, 2]], np.uint8))
    assert cb.integers.tolist() == [[-12, 0], [7, 7]]
    assert cb.weights.tolist() == [[-1.5, 0.0], [0.875, 0.875]]
    with pytest.raises(HwgenError, match=r"^codebook entry 11 is not 0, ±2\^k or ±2\^j ± 2\^k"):
        Codebook((0, 11), 0, idx)
    with pytest.raises(HwgenError, match=r"entries must be 1 to 256 increasing ints, not \[2, 1\]"):
        Codebook((2, 1), 0, idx)
    with pytest.raises(HwgenError, match="codebook indices must be uint8 below 2"):
        Codebook((1, 2), 0, np.full((2, 2), 2, np.uint8))
    with pytest.raises(HwgenError, match="codebook frac 99 is outside"):
        Codebook((1, 2), 99, idx)


def test_options_checked():
    with pytest.raises(HwgenError, match="codebook optimizer must be sgd or adam, not 'rms'"):
        CodebookOptions(optimizer="rms")
    with pytest.raises(HwgenError, match=r"TTQ threshold must be in \(0, 1\), not 1.5"):
        CodebookOptions(threshold=1.5)
    with pytest.raises(HwgenError, match=r"codebook kmax must be in \[0, 30\], not 31"):
        CodebookOptions(kmax=31)


def test_ttq_gradients_are_the_papers():
    rng = np.random.default_rng(0)
    w = torch.tensor(rng.uniform(-1, 1, (4, 6)), requires_grad=True)
    wp = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    wn = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    delta = torch.tensor(0.3, dtype=torch.float64)
    c = torch.tensor(rng.normal(size=(4, 6)))
    out = TtqFn.apply(w, wp, wn, delta)
    (out * c).sum().backward()
    # the explicit expressions: ternary values for Wp/Wn, the scaled identity for w
    w2 = w.detach().clone().requires_grad_()
    wp2, wn2 = wp.detach().clone().requires_grad_(), wn.detach().clone().requires_grad_()
    pos, neg = (w2 > delta).double(), (w2 < -delta).double()
    ternary = wp2 * pos - wn2 * neg
    surrogate = wp.detach() * w2 * pos + w2 * (1 - pos - neg) + wn.detach() * w2 * neg
    (ternary * c).sum().backward()
    (surrogate * c).sum().backward()
    assert torch.equal(out, ternary)
    assert torch.allclose(wp.grad, wp2.grad) and torch.allclose(wn.grad, wn2.grad)
    assert torch.allclose(w.grad, w2.grad)
    assert wn.grad == -(c * neg).sum()  # the chain rule's minus


def _test_accuracy(fnet, data) -> float:
    with torch.no_grad():
        logits = fnet.forward(torch.as_tensor(data.x_test, dtype=torch.float64))[-1]
    return float(np.mean(logits.numpy().argmax(1) == data.y_test))


def _check_exported(q, books):
    for fl in q.layers:
        if fl.name in books:
            cb = books[fl.name]
            assert cb.indices.shape == fl.weight.shape
            assert np.array_equal(fl.weight, np.asarray(cb.entries)[cb.indices] * 2.0**-cb.frac)


def test_dqc_retraining_beats_the_initial_codebook():
    fnet, data = digits_float_net()
    train = (data.x_train, data.y_train)
    q0, b0 = dqc(fnet, 3, train, zero=True, options=CodebookOptions(epochs=0), progress=False)
    q, books = dqc(fnet, 3, train, zero=True, progress=False)  # INQ's budget: 16 epochs
    short = CodebookOptions(epochs=2)
    once, _ = dqc(fnet, 3, train, zero=True, options=short, progress=False)
    again, _ = dqc(fnet, 3, train, zero=True, options=short, progress=False)
    _check_exported(q, books)
    _check_exported(q0, b0)
    assert all(len(cb.entries) == 8 and 0 in cb.entries for cb in books.values())
    for a, b in zip(once.layers, again.layers, strict=True):
        if a.name in books:
            assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert not np.array_equal(q.layers[-1].bias, fnet.layers[-1].bias)  # biases retrained
    assert _test_accuracy(q, data) > _test_accuracy(q0, data)


def test_dqc_without_zero_and_per_layer_bits():
    fnet, data = digits_float_net()
    bits = {"conv1": 2, "conv2": 3, "fc": 4}
    q, books = dqc(fnet, bits, (data.x_train, data.y_train), zero=False,
                   options=CodebookOptions(epochs=1), progress=False)  # fmt: skip
    _check_exported(q, books)
    assert {n: len(cb.entries) for n, cb in books.items()} == {n: 1 << b for n, b in bits.items()}
    assert all(0 not in cb.entries for cb in books.values())
    with pytest.raises(HwgenError, match=r"DQC bits name layers \['conv1'\], the model has"):
        dqc(fnet, {"conv1": 3}, (data.x_train, data.y_train), progress=False)


def test_ttq_retraining_beats_its_initial_scales():
    fnet, data = digits_float_net()
    train = (data.x_train, data.y_train)
    q0, _ = ttq(fnet, train, options=CodebookOptions(epochs=0), progress=False)
    q, books = ttq(fnet, train, options=CodebookOptions(epochs=4), progress=False)
    _check_exported(q, books)
    for cb in books.values():
        assert len(cb.entries) == 3 and cb.entries[1] == 0  # {-Wn, 0, +Wp}
        assert 1 << 5 <= max(-cb.entries[0], cb.entries[2]) <= 1 << 6  # the larger uses kmax 6
    assert _test_accuracy(q, data) > _test_accuracy(q0, data)
    diverging = CodebookOptions(epochs=1, optimizer="sgd", lr=0.01)
    with pytest.raises(HwgenError, match=r"^layer conv1: TTQ scales Wp=.* are not positive"):
        ttq(fnet, train, options=diverging, progress=False)


# ---------------------------------------------------------------- pruned weights (#12)


def _pruned_digits():
    """digits with 75% of conv2's and fc's blocks of 4 pruned (0.0, as prune leaves them),
    its masks and training data."""
    fnet, data = digits_float_net()
    macs = {fl.name: fl for fl in fnet.layers if fl.name in ("conv2", "fc")}
    masks = {n: grow_mask(fl.weight, np.ones(fl.weight.shape, bool), 0.75, 4)
             for n, fl in macs.items()}  # fmt: skip
    fnet = with_weights(fnet, {n: (fl.weight * masks[n], fl.bias) for n, fl in macs.items()})
    return fnet, masks, (data.x_train, data.y_train)


@pytest.mark.parametrize("scheme", ["dqc", "ttq"])
def test_masked_codebook_retraining_keeps_pruned_weights_at_the_zero_entry(scheme, monkeypatch):
    fnet, masks, train = _pruned_digits()
    latent: list[dict[str, np.ndarray]] = []  # the float weights at the end of retraining

    def export(fnet, module, books):
        latent.append({n: module.macs[module.index[n]].weight.detach().numpy() for n in masks})
        return export_(fnet, module, books)

    export_ = codebook._export
    monkeypatch.setattr(codebook, "_export", export)
    fn = functools.partial(dqc, fnet, 3) if scheme == "dqc" else functools.partial(ttq, fnet)
    opts = CodebookOptions(epochs=2)
    q, books = fn(train, options=opts, progress=False, masks=masks)
    _check_exported(q, books)
    weights = {fl.name: fl.weight for fl in q.layers if fl.name in masks}
    for n, m in masks.items():
        cb = books[n]
        assert np.all(cb.indices[~m] == cb.entries.index(0)) and np.any(cb.integers[m])
        assert not np.any(weights[n][~m]) and block_sparsity(weights[n], 4) >= 0.75
    fn(train, options=opts, progress=False)  # unmasked: the pruned latent weights move
    held, moved = latent
    assert not any(np.any(held[n][~m]) for n, m in masks.items())
    assert all(np.any(moved[n][~m]) for n, m in masks.items())


def test_dqc_without_zero_refuses_masks():
    fnet, masks, train = _pruned_digits()
    with pytest.raises(HwgenError, match=r"^DQC without a zero entry has no code for pruned"):
        dqc(fnet, 3, train, zero=False, progress=False, masks=masks)
    with pytest.raises(HwgenError, match=r"^layer fc: prune mask of shape \(2, 2\), not"):
        ttq(fnet, train, progress=False, masks={"fc": np.ones((2, 2), bool)})
