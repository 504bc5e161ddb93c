"""Per-layer bit-width search: the fewest weight ROM bits within an accuracy budget.

The search is greedy and measured, never estimated: every candidate precision is quantised
(``hwgen.quant.quantize``, which picks the fraction lengths) and scored with the integer
golden model on the evaluation set. The budget is ``float accuracy - max_drop`` points.

1. Start from the scheme's generous default (8-bit fixed / 5-bit powers of two, 8-bit
   activations). If even that misses the budget, widen every layer two bits at a time
   until it fits or the formats run out (keeping the most accurate widths; the result
   then says it is over budget).
2. Weights: try lowering one layer's weight bits by one, the layer with the most weights
   first (it saves the most ROM bits); keep the change if the accuracy stays within the
   budget, else freeze that layer. Repeat until every layer is frozen or at its minimum.
   Powers of two at 3 bits have two magnitudes only: there the search pins emax to the
   least-squares level instead of INQ's n1 (made for the top of many levels, it zeroes most
   weights; on ``digits`` the fc layer's squared error is 28 instead of 135).
3. Activations (line-buffer and datapath width, not ROM): the same, for the network
   input and every conv/linear/add output, the largest feature map first.

Powers of two with retraining (``inq``, ``ternary``, ``binary``): the start and every
weight trial run INQ on their bits (the given ``InqOptions``; a few seconds on
``digits``), so each accuracy is that of the retrained network, exactly what ``quantize``
gives for the resulting ``precision.toml``. Trials that change activation bits only keep
the accepted trial's retrained weights (INQ does not depend on activation formats) and
choose the formats again: no retraining, and still exact. So step 1 widens the
activations alone first, on the start's weights, and retrains wider weights only if that
is not enough. Each trial records how it was quantised (``Trial.method``).

The learned schemes (bc, twn, lab, lat, dqc, ttq, amq; :mod:`hwgen.quant.quantize`) are
searched the same way: every weight trial retrains, activation trials keep the accepted
trial's retrained model and integer weights (:func:`hwgen.quant.quantize.with_activations`).
Their weight bits are searched where the scheme has a count: dqc's codebook index bits
(5 down to 3) and amq's binary planes (4 down to 2); bc, lab (1) and twn, lat, ttq (2) are
fixed widths.

Sparsity (``max_sparsity``; schemes that keep pruned weights at 0:
:data:`hwgen.quant.quantize.PRUNABLE`): after the bits, each conv/linear layer, the most
weights first, raises its block-prune fraction through ``SPARSITY_STEPS`` (up to
``max_sparsity``) while the accuracy stays within the budget, in blocks of ``block`` input
channels (the build's SIMD). Every such trial is ``quantize`` of the trial's
``precision.toml`` (the bits, each layer's ``prune`` and ``block``): pruned and retrained
(:mod:`hwgen.quant.prune`), then the scheme (masked INQ for inq and ternary, masked
retraining for the learned ones), so the result's file reproduces it. Its ROM bits count
the weights of the nonzero blocks only (``rom_bits(net, block=...)``: what the engine
stores folded at PE = 1 and SIMD = ``block``).

The compression sweep (``sweep``, a :data:`CostFn` that builds nothing but the engines'
parameters) measures, at the bits found, the network pruned to each of
``SWEEP_SPARSITY`` (every conv/linear layer but the first, as ``hwgen quantize --prune``)
and its conv layers split at each of ``SWEEP_RANKS`` (``--lowrank``): accuracy from the
golden model, the fraction of zero blocks, and the cost function's weight ROM bits and
cycles per inference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hwgen import golden as gm
from hwgen.errors import HwgenError, RetrainDiverged
from hwgen.frontend.graph import FAdd, FConv2d, FLinear, FloatNet
from hwgen.ir import INPUT, Add, Conv2d, Linear, Network
from hwgen.quant import QuantResult, quantize
from hwgen.quant.binarize import RetrainOptions
from hwgen.quant.codebook import CodebookOptions
from hwgen.quant.fakequant import accuracy
from hwgen.quant.inq import InqOptions
from hwgen.quant.precision import (
    LEARNED,
    AddPrecision,
    InputPrecision,
    LayerPrecision,
    Precision,
)
from hwgen.quant.prune import block_view, nonzero_blocks
from hwgen.quant.quantize import prune_refusal, split_net, with_activations
from hwgen.quant.weights import pow2_curve

TUNE_SCHEMES = ("fixed", "pow2", "inq", "ternary", "binary", *LEARNED)
RETRAINED = ("inq", "ternary", "binary", *LEARNED)
POW2_SCHEMES = ("pow2", "inq", "ternary", "binary")
# scheme -> (min, start, max) weight bits searched; some are fixed widths
_WEIGHT_BITS = {
    "fixed": (2, 8, 16),
    "pow2": (2, 5, 7),
    "inq": (2, 5, 7),
    "ternary": (2, 2, 2),
    "binary": (1, 1, 1),
    "bc": (1, 1, 1),
    "lab": (1, 1, 1),
    "twn": (2, 2, 2),
    "lat": (2, 2, 2),
    "ttq": (2, 2, 2),
    "dqc": (3, 5, 5),  # codebook index bits
    "amq": (2, 4, 4),  # binary planes
}
_ACT_BITS = (2, 8, 16)
SPARSITY_STEPS = (0.25, 0.5, 0.75, 0.9)  # block-prune fractions tried per layer, in order
SWEEP_SPARSITY = (0.25, 0.5, 0.75, 0.9)
SWEEP_RANKS = (1, 2, 4, 8)
_RAISE_STEP = 2
_EPS = 1e-9  # accuracy comparisons in percentage points
POST_TRAINING = "post-training quantisation"


@dataclass(frozen=True)
class Trial:
    """One measured candidate of the search."""

    phase: str  # "start", "widen", "weights" or "activations"
    layer: str  # a layer name, "input", or "*" (every layer)
    change: str  # e.g. "weight bits 8 -> 7"
    accuracy: float
    rom_bits: int
    accepted: bool
    method: str = POST_TRAINING  # how the candidate was quantised, in words


@dataclass(frozen=True)
class Cost:
    """What a network costs in hardware at some folding (per inference)."""

    rom_bits: int  # weight ROM bits as stored (the scheduled words only)
    cycles: int  # the slowest engine's ideal cycles: the network's period
    macs: int


CostFn = Callable[[Network], Cost]


@dataclass(frozen=True)
class SweepPoint:
    """One measured point of the compression sweep."""

    kind: str  # "dense" (the bits found), "sparsity" or "rank"
    target: float | int | None  # the prune fraction or the rank asked for
    block: int  # the input channels of a block
    sparsity: float  # measured: the fraction of all-zero blocks over the MAC layers
    accuracy: float
    cost: Cost
    precision: Precision = field(repr=False, compare=False)  # reproduces the point
    net: Network = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        return sweep_label(self.kind, self.target)


def sweep_label(kind: str, target: float | int | None) -> str:
    """``dense``, ``prune 0.75`` or ``rank 4``."""
    if kind == "dense":
        return "dense"
    return f"{'prune' if kind == 'sparsity' else 'rank'} {target:g}"


@dataclass(frozen=True)
class TuneResult:
    """The chosen quantisation, how it was found, and what it costs."""

    scheme: str
    max_drop_points: float
    float_accuracy: float
    accuracy: float
    quant: QuantResult
    trials: tuple[Trial, ...]
    # accuracy with the input and then the first k MAC layers quantised, the rest float
    prefix_accuracy: tuple[tuple[str, float], ...]
    eval_size: int
    model: str = field(default="net")
    block: int | None = None  # pruned in blocks of this many input channels (ROM bits count
    # the nonzero blocks only); None: not pruned
    sweep: tuple[SweepPoint, ...] = ()
    sweep_diverged: tuple[str, ...] = ()  # the sweep points whose retraining diverged

    @property
    def net(self) -> Network:
        return self.quant.net

    @property
    def precision(self) -> Precision:
        return self.quant.precision

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.float_accuracy - self.accuracy)

    @property
    def within_budget(self) -> bool:
        return self.drop_points <= self.max_drop_points + _EPS

    @property
    def rom_bits(self) -> int:
        return rom_bits(self.net, block=self.block)

    @property
    def rom_bits_8bit(self) -> int:
        return rom_bits(self.net, bits=8)


def mac_layers(net: Network) -> list[Conv2d | Linear]:
    return [lyr for lyr in net.layers if isinstance(lyr, (Conv2d, Linear))]


def format_layers(net: Network) -> list[Conv2d | Linear | Add]:
    """The layers that choose an output format: conv/linear and add, in layer order."""
    return [lyr for lyr in net.layers if isinstance(lyr, (Conv2d, Linear, Add))]


def rom_bits(net: Network, bits: int | None = None, block: int | None = None) -> int:
    """Σ weights × weight bits over the MAC layers (``bits`` overrides every layer's width);
    with ``block``, the weights of the nonzero blocks only (``block`` × nonzero blocks)."""
    return sum(layer_rom_bits(lyr, bits, block) for lyr in mac_layers(net))


def layer_rom_bits(
    layer: Conv2d | Linear, bits: int | None = None, block: int | None = None
) -> int:
    """One layer's term of :func:`rom_bits` (a last, narrower block counts its channels)."""
    bits = bits or layer.weight_format.bits
    if block is None:
        return layer.weight.size * bits
    v = block_view(layer.weight, block)
    widths = np.minimum(block, layer.weight.shape[1] - block * np.arange(v.shape[-2]))
    return int((np.any(v != 0, axis=-1) * widths).sum()) * bits


def zero_blocks(net: Network, block: int) -> float:
    """The fraction of all-zero blocks of ``block`` input channels over the MAC layers."""
    nonzero = sum(int(nonzero_blocks(lyr.weight, block).sum()) for lyr in mac_layers(net))
    total = sum(int(np.prod(block_view(lyr.weight, block).shape[:-1])) for lyr in mac_layers(net))
    return 1.0 - nonzero / total


def float_accuracy(fnet: FloatNet, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the float model (float64), first index of the maximum as the prediction."""
    with torch.no_grad():
        out = fnet.forward(torch.as_tensor(np.asarray(x, np.float64)))[-1]
    return float(np.mean(out.reshape(len(x), -1).argmax(1).numpy() == np.asarray(y)))


def reference_activations(fnet: FloatNet, x: np.ndarray) -> list[np.ndarray]:
    """The float model's activations on ``x``, the reference of the fraction-length search.

    Computed in float32 (the precision the model was trained in) and handed over as float64:
    PyTorch's float64 convolutions are several times slower, and the search only compares
    squared errors that differ by far more than float32 rounding.
    """
    with torch.no_grad():
        outs = fnet.forward(torch.as_tensor(np.asarray(x, np.float32)))
    return [o.numpy().astype(np.float64) for o in outs]


def prefix_accuracy(
    fnet: FloatNet, net: Network, x: np.ndarray, y: np.ndarray
) -> list[tuple[str, float]]:
    """Accuracy as layers are quantised one by one: ``[("float", a), ("input", a), (l1, a)..]``.

    The steps are the layers that choose a format: conv/linear and add. Step k runs the
    integer golden model up to (not including) the (k+1)-th of them, turns every integer
    tensor back into reals (``a * 2**-frac``) and finishes with the float layers. The last
    step is the whole integer network.
    """
    if [lyr.name for lyr in fnet.layers] != net.names:
        raise HwgenError("prefix accuracy: the float and quantised networks have different layers")
    y = np.asarray(y)
    quantising = [i for i, lyr in enumerate(net.layers) if isinstance(lyr, (Conv2d, Linear, Add))]
    cuts = [*quantising, len(net.layers)]  # integer layers [0, cut) then float layers [cut, end)
    points = [("float", float_accuracy(fnet, x, y))]
    ints = {INPUT: gm.quantize_input(x, net.input_format)}
    done = 0
    for k, cut in enumerate(cuts):
        for layer in net.layers[done:cut]:
            ints[layer.name] = gm.layer_forward(
                layer, [ints[i] for i in layer.inputs], [net.formats[i] for i in layer.inputs]
            )
        done = cut
        xf = {n: torch.as_tensor(v * 2.0 ** -net.formats[n].frac) for n, v in ints.items()}
        with torch.no_grad():
            for layer in fnet.layers[cut:]:
                xf[layer.name] = fnet.layer_forward(layer, *(xf[i] for i in layer.inputs))
        out = xf[net.output]
        pred = out.reshape(len(x), -1).argmax(1).numpy()
        points.append(
            ("input" if k == 0 else net.layers[quantising[k - 1]].name, float(np.mean(pred == y)))
        )
    return points


class _Search:
    """The greedy search state: bits per layer, the best accepted result, the trial log."""

    def __init__(
        self,
        evaluate: Callable[[Precision], tuple[QuantResult, float]],
        scheme: str,
        names: list[str],
        acts: list[str],
        wstart: int,
        budget: Callable[[float], bool],
    ) -> None:
        """``names``: the conv/linear layers; ``acts``: the tensors with a format of their own
        (``"input"``, conv/linear and add outputs), in layer order."""
        self.evaluate, self.scheme, self.budget = evaluate, scheme, budget
        self.wbits = dict.fromkeys(names, wstart)
        self.abits = dict.fromkeys(acts, _ACT_BITS[1])
        self.trials: list[Trial] = []
        self.best: QuantResult | None = None
        self.best_acc = 0.0
        self.method = POST_TRAINING  # recorded with each trial
        self.retrains = False  # whether ``evaluate`` retrains the weights
        self.weights_trial = -1  # the trial that retrained the accepted weights
        self.emax3: dict[str, int] = {}  # power-of-two scale of each layer at 3 bits
        self.prune: dict[str, float] = {}  # block-prune fraction per layer (sparsity phase)
        self.block = 1

    def precision(
        self, wbits: dict[str, int], abits: dict[str, int], prune: dict[str, float] | None = None
    ) -> Precision:
        emax = {n: e for n, e in self.emax3.items() if wbits[n] == 3}
        p = bits_precision(self.scheme, wbits, abits, emax)
        if not prune:
            return p
        layers = {
            n: replace(lp, prune=prune[n]) if n in prune else lp for n, lp in p.layers.items()
        }
        return replace(p, layers=layers, block=self.block)

    def trial(
        self,
        phase: str,
        layer: str,
        change: str,
        wbits: dict[str, int],
        abits: dict[str, int],
        prune: dict[str, float] | None = None,
    ) -> bool:
        """Measure a candidate; adopt it if it is the start or within the budget. A candidate
        whose retraining diverges (no network) is rejected, logged at accuracy 0."""
        prune = self.prune if prune is None else prune
        try:
            q, acc = self.evaluate(self.precision(wbits, abits, prune))
        except RetrainDiverged:
            if phase == "start":
                raise
            change = f"{change} (retraining diverged)"
            self.trials.append(Trial(phase, layer, change, 0.0, 0, False, self.method))
            return False
        ok = self.budget(acc)
        # widening is adopted when it fits or at least beats the best so far
        take = ok or phase == "start" or (phase == "widen" and acc > self.best_acc)
        bits = rom_bits(q.net, block=self.block if prune else None)
        self.trials.append(Trial(phase, layer, change, acc, bits, take, self.method))
        if take:
            self.wbits, self.abits, self.best, self.best_acc = dict(wbits), dict(abits), q, acc
            self.prune = dict(prune)
            if self.retrains:
                self.weights_trial = len(self.trials) - 1
        return ok

    def widen(self, wmax: int) -> None:
        """Every width up by ``_RAISE_STEP`` until the budget is met or nothing can grow
        (``wmax`` = the current weight bits: activations only)."""
        w, a = self.wbits, self.abits
        while not self.budget(self.best_acc):
            nw = {n: min(b + _RAISE_STEP, max(wmax, b)) for n, b in w.items()}
            na = {n: min(b + _RAISE_STEP, _ACT_BITS[2]) for n, b in a.items()}
            if nw == w and na == a:
                return
            old, new = (max(w.values()), max(a.values())), (max(nw.values()), max(na.values()))
            change = f"act bits {old[1]} -> {new[1]}"
            if nw != w:
                change = f"weight bits {old[0]} -> {new[0]}, {change}"
            self.trial("widen", "*", change, nw, na)
            w, a = nw, na

    def lower(self, phase: str, order: list[str], lo: int, tick: Callable[[int], None]) -> None:
        """Greedy descent of one kind of width, ``order`` = the layers, most valuable first."""
        weights = phase == "weights"
        frozen: set[str] = set()
        while True:
            bits = self.wbits if weights else self.abits
            todo = [n for n in order if n not in frozen and bits[n] > lo]
            if not todo:
                return
            n = todo[0]
            cand = {**bits, n: bits[n] - 1}
            kind = "weight" if weights else "act"
            change = f"{kind} bits {bits[n]} -> {bits[n] - 1}"
            if weights:
                ok = self.trial(phase, n, change, cand, self.abits)
            else:
                ok = self.trial(phase, n, change, self.wbits, cand)
            if ok:
                tick(1)
            else:
                frozen.add(n)
                tick(bits[n] - lo)  # the steps this layer will no longer take

    def sparsify(self, order: list[str], steps: list[float], tick: Callable[[int], None]) -> None:
        """Raise each layer's prune fraction through ``steps`` (``order``: the most weights
        first) while the accuracy stays within the budget; a miss freezes the layer."""
        for n in order:
            for k, frac in enumerate(steps):
                old = self.prune.get(n, 0.0)
                cand = {**self.prune, n: frac}
                ok = self.trial("sparsity", n, f"prune {old:g} -> {frac:g}", self.wbits,
                                self.abits, cand)  # fmt: skip
                if not ok:
                    tick(len(steps) - k)
                    break
                tick(1)


def bits_precision(
    scheme: str,
    wbits: dict[str, int],
    abits: dict[str, int],
    emax: dict[str, int] | None = None,
) -> Precision:
    """The precision fixing only bits: weight bits per conv/linear layer (``wbits``) and act
    bits per tensor (``abits``: ``"input"``, conv/linear and add outputs); an ``abits`` entry
    that is not in ``wbits`` is an add layer's. ``emax`` pins some layers' power-of-two
    scale."""
    layers: dict[str, LayerPrecision | AddPrecision] = {}
    emax = emax or {}
    for n, b in abits.items():
        if n in wbits:
            layers[n] = LayerPrecision(weight_bits=wbits[n], act_bits=b, emax=emax.get(n))
        elif n != INPUT:
            layers[n] = AddPrecision(act_bits=b)
    return Precision(scheme, layers, InputPrecision(act_bits=abits[INPUT]))


def tune(
    fnet: FloatNet,
    scheme: str,
    calib_x: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    max_drop_points: float,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    progress: bool = True,
    inq_options: InqOptions | None = None,
    retrain_options: RetrainOptions | None = None,
    codebook_options: CodebookOptions | None = None,
    max_sparsity: float | None = None,
    block: int = 4,
    sweep: CostFn | None = None,
) -> TuneResult:
    """Search per-layer weight and activation bits (module docstring) and return the result.

    ``train`` (images, labels) is needed by the retrained schemes; ``inq_options`` sets
    INQ's retraining (epochs, learning rate, seed), ``retrain_options`` that of bc, twn,
    lab, lat and amq, ``codebook_options`` that of dqc and ttq: the same in every trial.
    ``max_sparsity`` also searches each layer's block-prune fraction up to it, in blocks of
    ``block``; ``sweep`` measures the compression sweep with that cost function (module
    docstring). Pruning and low-rank retrain with ``inq_options`` and need ``train``. A
    trial (but the start) or sweep point whose retraining diverges is rejected or left out
    (``TuneResult.sweep_diverged``).
    """
    if scheme not in TUNE_SCHEMES:
        raise HwgenError(f"tune: scheme {scheme!r} is not one of {', '.join(TUNE_SCHEMES)}")
    compress = max_sparsity is not None or sweep is not None
    if max_sparsity is not None and not 0.0 < max_sparsity < 1.0:
        raise HwgenError(f"tune: max sparsity must be in (0, 1), not {max_sparsity}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise HwgenError(f"tune: block must be a positive integer, not {block!r}")
    refusal = prune_refusal(scheme, codebook_options) if compress else None
    if refusal is not None:
        raise HwgenError(f"tune: {refusal}")
    if compress and train is None:
        raise HwgenError("tune: pruning and low-rank retrain the model and need training data")
    if not np.isfinite(max_drop_points) or max_drop_points < 0:
        raise HwgenError(
            f"tune: max drop must be a non-negative number of points, not {max_drop_points}"
        )
    if scheme in RETRAINED and train is None:
        raise HwgenError(f"tune: scheme {scheme} retrains the weights and needs training data")
    eval_y = np.asarray(eval_y)
    if len(eval_x) == 0 or len(eval_x) != len(eval_y):
        raise HwgenError(
            f"tune: need labelled evaluation data, not {len(eval_x)} images, {len(eval_y)} labels"
        )
    if (
        np.shape(calib_x)[1:] != tuple(fnet.input_shape)
        or np.shape(eval_x)[1:] != np.shape(calib_x)[1:]
    ):
        raise HwgenError(
            f"tune: calibration {np.shape(calib_x)} and evaluation {np.shape(eval_x)} images "
            f"must be (N, {', '.join(map(str, fnet.input_shape))})"
        )
    macs = {lyr.name: lyr for lyr in fnet.layers if isinstance(lyr, (FConv2d, FLinear))}
    names = list(macs)
    acts = [INPUT, *(lyr.name for lyr in fnet.layers if isinstance(lyr, (FConv2d, FLinear, FAdd)))]
    sizes = {n: fl.weight.size for n, fl in macs.items()}
    facc = float_accuracy(fnet, eval_x, eval_y)

    def budget(acc: float) -> bool:
        return 100.0 * (facc - acc) <= max_drop_points + _EPS

    options = inq_options or InqOptions()
    learned = {
        "inq_options": options,
        "retrain_options": retrain_options or RetrainOptions(),
        "codebook_options": codebook_options or CodebookOptions(),
    }
    if scheme in RETRAINED:

        def evaluate(p: Precision) -> tuple[QuantResult, float]:
            q = quantize(fnet, p, calib_x, train, progress=False, **learned)
            return q, accuracy(q.net, eval_x, eval_y)

    else:
        float_acts = reference_activations(fnet, calib_x)  # computed once for every trial

        def evaluate(p: Precision) -> tuple[QuantResult, float]:
            q = quantize(fnet, p, calib_x, progress=False, float_acts=float_acts)
            return q, accuracy(q.net, eval_x, eval_y)

    def compressed(p: Precision) -> tuple[QuantResult, float]:
        """A trial with pruning or a low-rank split: ``quantize`` retrains it all."""
        q = quantize(fnet, p, calib_x, train, progress=False, **learned)
        return q, accuracy(q.net, eval_x, eval_y)

    wlo, wstart, wmax = _WEIGHT_BITS[scheme]
    search = _Search(evaluate, scheme, names, acts, wstart, budget)
    search.block = block
    if scheme in POW2_SCHEMES:
        search.emax3 = {n: least_squares_emax(fl.weight, 3) for n, fl in macs.items()}
    if scheme in LEARNED:
        n = learned["codebook_options" if scheme in ("dqc", "ttq") else "retrain_options"].epochs
        search.method = f"{scheme} retraining ({n} epoch{'s' if n != 1 else ''})"
        search.retrains = True
    elif scheme in RETRAINED:
        epochs = f"{options.epochs} epoch{'s' if options.epochs != 1 else ''}"
        steps = f"{len(options.portions)} step{'s' if len(options.portions) != 1 else ''}"
        search.method = f"INQ retraining ({epochs} at each of {steps})"
        search.retrains = True

    def keep_weights() -> None:
        """From now on, trials keep the accepted weights and choose activation formats."""
        search.evaluate = (
            _on_learned_weights(search.best, calib_x, eval_x, eval_y)
            if scheme in LEARNED
            else _on_retrained_weights(search.best, calib_x, eval_x, eval_y)
        )
        search.method = (
            f"the retrained weights of trial {search.weights_trial}, activation formats "
            "chosen again (no retraining)"
        )
        search.retrains = False

    fractions = [] if max_sparsity is None else sparsity_steps(max_sparsity)
    steps = 1 + len(names) * (wstart - wlo) + len(acts) * (_ACT_BITS[1] - _ACT_BITS[0])
    steps += len(names) * len(fractions)
    weight_method = search.method
    columns = (
        TextColumn("tune {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("start", total=steps)

        def tick(n: int) -> None:
            bar.advance(task, n)

        search.trial("start", "*", "scheme default", search.wbits, search.abits)
        tick(1)
        if scheme in RETRAINED and not budget(search.best_acc):
            # wider activations need no retraining: try them on the start's weights first
            retraining = search.evaluate, search.method
            keep_weights()
            search.widen(0)
            search.evaluate, search.method = retraining
            search.retrains = True
        search.widen(wmax)
        bar.update(task, description="weights")
        search.lower("weights", sorted(names, key=lambda n: -sizes[n]), wlo, tick)
        if scheme in RETRAINED:
            keep_weights()
        bar.update(task, description="activations")
        shapes = _out_sizes(fnet, acts)
        search.lower(
            "activations", sorted(search.abits, key=lambda n: -shapes[n]), _ACT_BITS[0], tick
        )
        dense = search.best, search.best_acc, dict(search.wbits), dict(search.abits)
        if fractions:
            bar.update(task, description="sparsity")
            epochs = f"{options.epochs} epoch{'s' if options.epochs != 1 else ''}"
            search.evaluate = compressed
            search.method = (
                f"block pruning in blocks of {block}, retrained ({epochs} per pruning step), "
                f"then {weight_method}"
            )
            search.sparsify(sorted(names, key=lambda n: -sizes[n]), fractions, tick)
    assert search.best is not None and dense[0] is not None
    points: tuple[SweepPoint, ...] = ()
    diverged: tuple[str, ...] = ()
    if sweep is not None:
        points, diverged = _sweep(fnet, search, dense, compressed, sweep)
    quant = search.best
    return TuneResult(
        scheme=scheme,
        max_drop_points=float(max_drop_points),
        float_accuracy=facc,
        accuracy=search.best_acc,
        quant=quant,
        trials=tuple(search.trials),
        prefix_accuracy=tuple(prefix_accuracy(fnet, quant.net, eval_x, eval_y)),
        eval_size=len(eval_y),
        model=fnet.name,
        block=block if search.prune else None,
        sweep=points,
        sweep_diverged=diverged,
    )


def sparsity_steps(max_sparsity: float) -> list[float]:
    """The prune fractions tried per layer: ``SPARSITY_STEPS`` below ``max_sparsity``, then it."""
    return [f for f in SPARSITY_STEPS if f < max_sparsity] + [max_sparsity]


def _sweep(
    fnet: FloatNet,
    search: _Search,
    dense: tuple[QuantResult | None, float, dict[str, int], dict[str, int]],
    compressed: Callable[[Precision], tuple[QuantResult, float]],
    cost: CostFn,
) -> tuple[tuple[SweepPoint, ...], tuple[str, ...]]:
    """The compression sweep (module docstring) at the bits of ``dense`` (the result of the
    bit search and its accuracy, weight and activation bits): that point, then each
    network-wide prune fraction, then each rank of the conv layers. Returns the points and
    the labels of those left out because their retraining diverged."""
    base, acc, wbits, abits = dense
    assert base is not None
    points: list[SweepPoint] = []
    diverged: list[str] = []

    def measure(kind: str, target: float | int | None, p: Precision | None) -> None:
        try:
            q, a = (base, acc) if p is None else compressed(p)
        except RetrainDiverged:
            diverged.append(sweep_label(kind, target))
            return
        b = search.block
        points.append(
            SweepPoint(kind, target, b, zero_blocks(q.net, b), a, cost(q.net), q.precision, q.net)
        )

    measure("dense", None, None)
    names = list(wbits)
    for frac in SWEEP_SPARSITY if len(names) > 1 else ():
        # every layer but the first, as ``hwgen quantize --prune`` (Han et al.)
        measure("sparsity", frac, search.precision(wbits, abits, dict.fromkeys(names[1:], frac)))
    for rank in SWEEP_RANKS:
        asked = Precision(search.scheme, lowrank=rank)
        split = split_net(fnet, asked)
        if [fl.name for fl in split.layers] == [fl.name for fl in fnet.layers]:
            continue  # no layer is smaller split at this rank
        # a split layer (``conv2_v``, ``conv2_h``) takes the bits of the layer it replaces
        whole = {n: n if n in abits else n.rsplit("_", 1)[0] for n in _format_names(split)}
        p = bits_precision(
            search.scheme,
            {n: wbits[w] for n, w in whole.items() if w in wbits},
            {INPUT: abits[INPUT]} | {n: abits[w] for n, w in whole.items()},
        )
        measure("rank", rank, replace(p, lowrank=rank))
    return tuple(points), tuple(diverged)


def _format_names(fnet: FloatNet) -> list[str]:
    return [fl.name for fl in fnet.layers if isinstance(fl, (FConv2d, FLinear, FAdd))]


def least_squares_emax(w: np.ndarray, bits: int) -> int:
    """The power-of-two scale with the least squared weight error (the higher on ties)."""
    return min(pow2_curve(np.asarray(w, np.float64), bits), key=lambda ce: (ce[1], -ce[0]))[0]


def _on_retrained_weights(
    base: QuantResult | None, calib_x: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray
) -> Callable[[Precision], tuple[QuantResult, float]]:
    """Evaluation of activation trials for a retrained scheme: ``base``'s retrained float
    model, every layer's power-of-two format pinned (its weights are on that grid already,
    so they stay as they are), the activation formats chosen for the trial's bits."""
    assert base is not None and base.float_net is not None
    retrained, scheme = base.float_net, base.precision.scheme
    emax = {lyr.name: lyr.weight_format.emax for lyr in mac_layers(base.net)}

    def evaluate(p: Precision) -> tuple[QuantResult, float]:
        layers = {n: replace(lp, emax=emax[n]) if n in emax else lp for n, lp in p.layers.items()}
        q = quantize(retrained, replace(p, scheme="pow2", layers=layers), calib_x, progress=False)
        # the same network as INQ on these bits gives: say so in the precision
        q = replace(
            q,
            precision=replace(q.precision, scheme=scheme),
            weight_curves=base.weight_curves,
            float_weights=base.float_weights,
        )
        return q, accuracy(q.net, eval_x, eval_y)

    return evaluate


def _on_learned_weights(
    base: QuantResult | None, calib_x: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray
) -> Callable[[Precision], tuple[QuantResult, float]]:
    """Evaluation of activation trials for a learned scheme: ``base``'s retrained model and
    integer weights, the activation formats chosen for the trial's bits."""
    assert base is not None

    def evaluate(p: Precision) -> tuple[QuantResult, float]:
        q = with_activations(base, p, calib_x)
        return q, accuracy(q.net, eval_x, eval_y)

    return evaluate


def _out_sizes(fnet: FloatNet, names: list[str]) -> dict[str, int]:
    """Elements per image of the input and of the named layers' outputs."""
    x = torch.zeros((1, *fnet.input_shape), dtype=torch.float64)
    sizes = {"input": x.numel()}
    with torch.no_grad():
        for layer, out in zip(fnet.layers, fnet.forward(x), strict=True):
            if layer.name in names:
                sizes[layer.name] = out.numel()
    return sizes
