import numpy as np
import pytest

from hwgen.errors import HwgenError
from hwgen.ir import Fixed, Pow2
from hwgen.quant.weights import (
    best_weight_frac,
    detect_format,
    encode_exact,
    fixed_curve,
    inq_emax,
    quantize_fixed,
    quantize_pow2,
    weight_error,
)


def test_fixed_rounds_half_up_and_saturates():
    fmt = Fixed(4, 1)  # step 0.5, integers -8..7
    w = np.array([0.25, -0.25, 0.75, -0.75, 0.2499, 3.74, 3.75, 100.0, -4.0, -4.3, -100.0])
    assert quantize_fixed(w, fmt).tolist() == [1, 0, 2, -1, 0, 7, 7, 7, -8, -8, -8]


@pytest.mark.parametrize(
    ("bits", "emin"), [(1, 0), (2, 0), (3, -1), (4, -3), (5, -7), (6, -15), (7, -31)]
)
def test_pow2_emin_and_levels(bits, emin):
    fmt = Pow2(bits, 0)
    assert fmt.emin == emin
    mags = np.geomspace(2.0 ** (emin - 3), 4.0, 20000)
    sweep = np.concatenate([-mags, [0.0], mags])
    q = quantize_pow2(sweep, fmt)
    levels = {int(s) * (1 << k) for s in (-1, 1) for k in range(0 - emin + 1)}
    if bits >= 2:
        levels.add(0)
    assert set(q.tolist()) == levels  # every level reached, nothing else


def test_pow2_thresholds_ties_go_up():
    fmt = Pow2(4, 0)  # levels 0, 1/8, 1/4, 1/2, 1; integers 0, 1, 2, 4, 8 (frac 3)
    below = np.nextafter
    cases = {
        # α = 0 below 2**emin: (0 + 1/8)/2 = 1/16 goes up to 1/8, just under it is 0
        1 / 16: 1,
        below(1 / 16, 0): 0,
        # (α+β)/2 for α = 1/4, β = 1/2 is 3/8, which is also 3α/2: it goes up
        3 / 8: 4,
        below(3 / 8, 0): 2,
        # 3β/2 for β = 1/2 is 3/4: goes up to 1; just under stays 1/2
        3 / 4: 8,
        below(3 / 4, 0): 4,
        # at the top, 3 * 2**emax / 2 and beyond saturate to 2**emax
        1.5: 8,
        7.0: 8,
        0.0: 0,
    }
    w = np.array(list(cases))
    assert quantize_pow2(w, fmt).tolist() == list(cases.values())
    assert quantize_pow2(-w, fmt).tolist() == [-v for v in cases.values()]


def test_ternary_rule():
    fmt = Pow2(2, -1)  # {0, ±1/2}; threshold (0 + 1/2)/2 = 1/4
    w = np.array([0.25, np.nextafter(0.25, 0), -0.25, 0.7, 0.0])
    assert quantize_pow2(w, fmt).tolist() == [1, 0, -1, 1, 0]


def test_binary_has_no_zero():
    fmt = Pow2(1, -2)
    w = np.array([0.0, -0.0, 1e-9, -1e-9, 3.0, -3.0])
    q = quantize_pow2(w, fmt)
    assert q.tolist() == [1, 1, 1, -1, 1, -1]
    assert fmt.frac == 2 and np.all(fmt.on_grid(q))


def test_inq_emax_exact_at_powers():
    assert inq_emax(np.array([0.75])) == 0  # 4/3 * 0.75 = 1 exactly
    assert inq_emax(np.array([np.nextafter(0.75, 0)])) == -1
    assert inq_emax(np.array([-1.5, 0.1])) == 1
    assert inq_emax(np.array([0.3])) == -2
    assert inq_emax(np.zeros(3)) == 0


def test_inq_emax_never_saturates():
    rng = np.random.default_rng(1)
    for _ in range(50):
        w = rng.normal(0, 10.0 ** rng.uniform(-3, 1), size=20)
        fmt = Pow2(5, inq_emax(w))
        assert np.abs(w).max() < 1.5 * 2.0**fmt.emax  # below the top level's upper threshold


def test_best_weight_frac_is_the_least_squares_frac():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        for scale in (0.01, 0.3, 5.0):
            w = rng.normal(0, scale, size=200)
            w[0] = 8 * scale  # an outlier: saturating it may pay off
            best = best_weight_frac(w, bits)
            errs = {f: weight_error(w, quantize_fixed(w, Fixed(bits, f)), Fixed(bits, f))
                    for f in range(-20, 40)}  # fmt: skip
            assert errs[best] == min(errs.values())
            assert dict(fixed_curve(w, bits))[best] == errs[best]


def test_detect_pow2_grids():
    assert detect_format("c", np.array([0.5, -0.25, 0.0, 0.125])) == Pow2(4, -1)
    assert detect_format("c", np.array([0.5, -0.5, 0.0])) == Pow2(2, -1)
    assert detect_format("c", np.array([[0.25, -0.25], [0.25, 0.25]])) == Pow2(1, -2)
    assert detect_format("c", np.array([4.0, -1.0, 2.0])) == Pow2(4, 2)


def test_detect_fixed_grid():
    q = np.array([-100, 3, 0, 77, 5])
    assert detect_format("fc", q * 2.0**-6) == Fixed(8, 6)
    assert detect_format("fc", np.array([-12.0, 4.0, 8.0])) == Fixed(3, -2)
    fmt = detect_format("fc", np.array([-32768, 32767, 1]) * 2.0**-3)
    assert fmt == Fixed(16, 3)
    assert encode_exact("fc", q * 2.0**-6, fmt := Fixed(8, 6)).tolist() == q.tolist()


def test_detect_off_grid_names_layer_and_index():
    w = np.zeros((2, 3))
    w[0, 0], w[1, 2] = 0.5, 0.1  # 0.1 needs far more than 16 bits
    with pytest.raises(HwgenError, match=r"^layer conv2: weight\[1, 2\] = 0\.1 is on no "):
        detect_format("conv2", w)
    wide = np.array([2.0, 40000.0, 0.5])  # 17 bits at frac 0; at frac -1, 0.5 is off grid
    with pytest.raises(HwgenError, match=r"weight\[2\] = 0\.5"):
        detect_format("fc", wide)


def test_claimed_format_off_grid_names_index():
    with pytest.raises(HwgenError, match=r"^layer fc: weight\[0, 1\] = 0\.375 is not exactly on"):
        encode_exact("fc", np.array([[0.5, 0.375]]), Pow2(4, 0))
    with pytest.raises(HwgenError, match=r"weight\[2\] = 5\.0 is not exactly on the grid of fixed"):
        encode_exact("fc", np.array([1.0, -4.0, 5.0]), Fixed(3, 0))
