"""Constant matrix-vector multiplication as a shared adder graph (pure Python, no hardware).

``y = W x`` for a constant integer matrix ``W`` becomes shifts (wiring) and two-input adders.
Each weight is written in canonical signed digits (CSD: no two adjacent nonzero digits, so
the fewest ``±2**k`` terms), which makes every output a signed sum of shifted inputs. Then
common subexpressions are extracted greedily, as in Hartley's method: the two-term pattern
``x_a ± (x_b << d)`` that occurs in the most places across all outputs becomes one adder,
and every non-overlapping occurrence is replaced by that adder's output (shifted and signed);
repeat while some pattern occurs at least twice. Each output's remaining terms are summed by
a tree that always adds the two shallowest terms first, to keep the graph shallow.

The graph is exact: ``evaluate`` computes it on integers, and every node's value range
follows from its linear form over the inputs. Costs grow with the square of the terms per
output: this is meant for small layers (a dense layer, a conv's kernel window).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A signed shifted reference to a value: (value index, left shift, negated).
Term = tuple[int, int, bool]


@dataclass(frozen=True)
class Node:
    """One adder: ``(a << shift_a) + (b << shift_b)``, or minus the ``b`` part when ``sub``.

    ``a`` and ``b`` index the graph's values: inputs first, then nodes in order. One of the
    two shifts is 0.
    """

    a: int
    shift_a: int
    b: int
    shift_b: int
    sub: bool


@dataclass(frozen=True)
class AdderGraph:
    """``n_inputs`` inputs, the adder ``nodes`` (value ``n_inputs + i`` is node ``i``), and per
    output the term it equals (None: the output is 0)."""

    n_inputs: int
    nodes: tuple[Node, ...]
    outputs: tuple[Term | None, ...]

    def depths(self) -> list[int]:
        """Adder levels from the inputs to each value (0 for an input)."""
        depth = [0] * self.n_inputs
        for n in self.nodes:
            depth.append(1 + max(depth[n.a], depth[n.b]))
        return depth

    def coefficients(self) -> list[dict[int, int]]:
        """Each value's exact linear form over the inputs, ``{input: coefficient}``."""
        forms: list[dict[int, int]] = [{i: 1} for i in range(self.n_inputs)]
        for n in self.nodes:
            form = {i: c << n.shift_a for i, c in forms[n.a].items()}
            sign = -1 if n.sub else 1
            for i, c in forms[n.b].items():
                form[i] = form.get(i, 0) + sign * (c << n.shift_b)
            forms.append({i: c for i, c in form.items() if c})
        return forms


def csd(value: int) -> list[tuple[int, bool]]:
    """Canonical signed digits of an integer: ``[(shift, negative), ...]``, lowest first."""
    digits, v, k = [], int(value), 0
    while v:
        if v & 1:
            d = 2 - (v & 3)  # +1 when v = 1 (mod 4), -1 when v = 3 (mod 4)
            digits.append((k, d < 0))
            v -= d
        v >>= 1
        k += 1
    return digits


def _key(t: Term, u: Term) -> tuple[int, int, int, bool]:
    """The pattern of two terms, ``(a, b, d, sub)`` for ``a ± (b << d)``: ``a`` is the term
    with the lower shift (the lower value index on a tie)."""
    if (t[1], t[0]) > (u[1], u[0]):
        t, u = u, t
    return (t[0], u[0], u[1] - t[1], t[2] != u[2])


class _Builder:
    """The outputs as term sets, with the count of every two-term pattern across them."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.n_inputs = matrix.shape[1]
        self.nodes: list[Node] = []
        self.depth = [0] * self.n_inputs
        self.outputs: list[dict[tuple[int, int], bool]] = []  # (value, shift) -> negated
        self.counts: dict[tuple[int, int, int, bool], int] = defaultdict(int)
        # Candidates by rank (``_push``) with the count they were pushed at. A count that grows
        # is pushed again; one that shrinks is pushed again when its stale entry comes up.
        self.heap: list[tuple[tuple[int, int, int, tuple[int, int, int, bool]], int]] = []
        self.pushing = False  # while the outputs are filled, the heap is built once at the end
        for row in matrix:
            terms: dict[tuple[int, int], bool] = {}
            self.outputs.append(terms)
            for i, w in enumerate(row):
                for shift, neg in csd(int(w)):
                    self._add(terms, (i, shift, neg))
        for key, n in self.counts.items():
            if n >= 2:
                self._push(key, n)
        self.pushing = True

    def _pairs(self, terms: dict[tuple[int, int], bool], t: Term, step: int) -> None:
        for (v, s), neg in terms.items():
            if (v, s) != (t[0], t[1]):
                key = _key(t, (v, s, neg))
                n = self.counts[key] = self.counts[key] + step
                if step > 0 and n >= 2 and self.pushing:
                    self._push(key, n)

    def _push(self, key: tuple[int, int, int, bool], n: int) -> None:
        a, b, d, _ = key
        # Most frequent; then the shallowest and narrowest adder; then a fixed order.
        heapq.heappush(self.heap, ((-n, max(self.depth[a], self.depth[b]), d, key), n))

    def _add(self, terms: dict[tuple[int, int], bool], t: Term) -> None:
        """Add a term to an output; equal terms merge (x + x = x << 1, x - x = 0)."""
        v, s, neg = t
        if (v, s) in terms:
            other = terms[(v, s)]
            self._remove(terms, (v, s))
            if other == neg:
                self._add(terms, (v, s + 1, neg))
            return
        self._pairs(terms, t, 1)
        terms[(v, s)] = neg

    def _remove(self, terms: dict[tuple[int, int], bool], vs: tuple[int, int]) -> None:
        neg = terms.pop(vs)
        self._pairs(terms, (*vs, neg), -1)

    def node(self, a: int, shift_a: int, b: int, shift_b: int, sub: bool) -> int:
        self.nodes.append(Node(a, shift_a, b, shift_b, sub))
        self.depth.append(1 + max(self.depth[a], self.depth[b]))
        return self.n_inputs + len(self.nodes) - 1

    def extract(self) -> None:
        """Greedy common subexpression extraction (see the module docstring)."""
        while self.heap:
            rank, n = heapq.heappop(self.heap)
            now = self.counts[rank[3]]
            if now != n:
                if 2 <= now < n:
                    self._push(rank[3], now)
                continue
            a, b, d, sub = rank[3]
            new = self.node(a, 0, b, d, sub)
            for terms in self.outputs:
                for v, s in [vs for vs in terms if vs[0] == a]:
                    partner = (b, s + d)
                    if (v, s) in terms and partner in terms and partner != (v, s):
                        neg = terms[(v, s)]
                        if (terms[partner] != neg) == sub:
                            self._remove(terms, (v, s))
                            self._remove(terms, partner)
                            self._add(terms, (new, s, neg))

    def tree(self, terms: dict[tuple[int, int], bool]) -> Term | None:
        """Sum an output's terms, always the two shallowest first."""
        pending = sorted((self.depth[v], s, v, neg) for (v, s), neg in terms.items())
        while len(pending) > 1:
            (_, s1, v1, n1), (_, s2, v2, n2) = pending[0], pending[1]
            if n1 and not n2:  # the minuend is the positive one
                s1, v1, n1, s2, v2, n2 = s2, v2, n2, s1, v1, n1
            low = min(s1, s2)
            new = self.node(v1, s1 - low, v2, s2 - low, n1 != n2)
            pending = sorted([*pending[2:], (self.depth[new], low, new, n1)])
        if not pending:
            return None
        _, s, v, neg = pending[0]
        return (v, s, neg)


def optimise(matrix: Sequence[Sequence[int]] | np.ndarray) -> AdderGraph:
    """The shared adder graph of ``y = matrix @ x`` (``matrix``: outputs x inputs, integers)."""
    w = np.asarray(matrix, dtype=object)
    if w.ndim != 2:
        raise ValueError(f"the matrix must be 2-D, not of shape {w.shape}")
    b = _Builder(w)
    b.extract()
    outputs = tuple(b.tree(terms) for terms in b.outputs)
    return AdderGraph(b.n_inputs, tuple(b.nodes), outputs)


def evaluate(graph: AdderGraph, x: Sequence[int]) -> list[int]:
    """The graph's outputs for one integer input vector (exact Python integers)."""
    values = [int(v) for v in x]
    for n in graph.nodes:
        b = values[n.b] << n.shift_b
        values.append((values[n.a] << n.shift_a) + (-b if n.sub else b))
    out = []
    for t in graph.outputs:
        v = 0 if t is None else values[t[0]] << t[1]
        out.append(-v if t is not None and t[2] else v)
    return out
