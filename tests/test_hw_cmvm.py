"""The adder-graph optimiser: CSD digits, exactness of the graph, sharing, depth."""

import itertools

import numpy as np
import pytest

from hwgen.hw.cmvm import csd, evaluate, optimise


@pytest.mark.parametrize("value", [*range(-70, 71), 2**40 + 3, -(2**33) - 1])
def test_csd_is_canonical_and_exact(value):
    digits = csd(value)
    assert sum((-1 if neg else 1) << s for s, neg in digits) == value
    shifts = [s for s, _ in digits]
    assert all(b - a >= 2 for a, b in itertools.pairwise(shifts))


@pytest.mark.parametrize("seed", range(6))
def test_graph_equals_the_matrix_product(seed):
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(1, 9), rng.integers(1, 17)
    w = rng.integers(-300, 300, size=(rows, cols))
    w[rng.random(w.shape) < 0.3] = 0
    w[0] = 0  # an all-zero output
    graph = optimise(w)
    assert graph.outputs[0] is None
    for x in [rng.integers(-(2**20), 2**20, size=cols) for _ in range(5)]:
        assert evaluate(graph, x) == list(w.astype(object) @ x.astype(object))
    for form, v in zip(graph.coefficients(), range(graph.n_inputs + len(graph.nodes)), strict=True):
        x = rng.integers(-99, 99, size=cols)
        values = evaluate_value(graph, x, v)
        assert values == sum(c * int(x[i]) for i, c in form.items())


def evaluate_value(graph, x, v):
    """Value ``v`` of the graph (an input or a node) for input ``x``."""
    values = [int(a) for a in x]
    for n in graph.nodes:
        b = values[n.b] << n.shift_b
        values.append((values[n.a] << n.shift_a) + (-b if n.sub else b))
    return values[v]


def test_common_subexpressions_are_shared():
    # Three outputs hold x0 + 2*x1 - 4*x2 (shifted or negated): one adder pair serves all.
    w = np.array([[1, 2, -4, 0], [2, 4, -8, 1], [-1, -2, 4, 0]])
    graph = optimise(w)
    assert len(graph.nodes) == 3  # x0 + 2x1 - 4x2 (two adders), + x3 for the second row
    x = [3, -5, 7, 11]
    assert evaluate(graph, x) == list(w @ x)


def test_pow2_layer_needs_fewer_adders_than_terms():
    rng = np.random.default_rng(0)
    w = rng.choice([0, 1, 2, 4, 8], size=(8, 16)) * rng.choice([-1, 1], size=(8, 16))
    naive = int((w != 0).sum(1).clip(1).sum()) - len(w)  # one adder per extra term
    graph = optimise(w)
    assert len(graph.nodes) < 0.85 * naive
    assert max(graph.depths()) <= 6


def test_optimise_is_deterministic():
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, size=(6, 12))
    assert optimise(w) == optimise(w.copy())
