"""Randomized RTL campaign: random small networks, built and simulated in Verilator.

Each case draws a layer (Conv2d with any kernel, stride and padding, Linear, max/average
pool or ReLU) or a residual piece (an add of the input and a conv of it, or a whole residual
block: two 3x3 convs and an identity or option-A subsample-pad shortcut, then an add), its
formats (Pow2 3..7 / Fixed 2..16 / ternary / binary weights, signed or
unsigned activations of 1..12 bits, ReLU or not, requantisation shifts of either sign, and
a rounding per format: half_up, half_even or floor),
its weights (random, sparse, or at the extremes: all-max, all-min, ±max), with probability
``CODEBOOK`` shift-add codebook weights instead (2 to 32 entries 0, ±2^k, ±2^j ± 2^k up to
±2^kmax, with or without 0, the extremes and two-digit entries at the top among them), with
probability ``SCALE`` a per-output-channel scale of a conv or dense layer (any Fixed format,
its min, max, 0 and -1 among the channels), a PE x SIMD folding or (for a conv or dense
layer, with probability ``UNROLL``) the unrolled engine, with probability ``SPARSE`` zero
blocks of a folded layer for the engine to skip (random blocks, whole PE rows, the whole
layer or all but one block), and a ROM style;
``hwgen.emit.build`` writes the build folder and ``hwgen.simulate.simulate_layer`` streams
the vectors (random images plus the all-max and all-min ones) through the RTL with random
input idles and output backpressure (on both inputs of an add engine; on every stream of a
network top). Every output value must equal the golden model's: ``rtl(x) == golden(x)``.

The default suite runs a fixed sample of six cases; ``-m slow`` runs 200 random ones.
Replay a case with ``random_case(seed)``: its ``describe()`` names everything drawn.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from conftest import (
    ARRAY_MODES,
    channel_scales,
    plane_format,
    shift_add_codebook,
    weight_array,
    with_roundings,
)

from hwgen import golden
from hwgen.emit import BuildOptions, build
from hwgen.hw.engine import MAX_UNROLLED_WEIGHTS, engine_info
from hwgen.ir import (
    ACT_FRAC_RANGE,
    ROUNDINGS,
    WEIGHT_FRAC_RANGE,
    ActFormat,
    Add,
    AvgPool2d,
    Codebook,
    Conv2d,
    Fixed,
    Layer,
    Linear,
    MaxPool2d,
    Network,
    Planes,
    Pow2,
    ReLU,
    SubsamplePad,
    WeightFormat,
    acc_bits,
)
from hwgen.simulate import simulate_layer

KINDS = ("conv", "conv", "conv", "dense", "dense", "maxpool", "avgpool", "relu", "add", "residual")
WEIGHT_KINDS = ("pow2", "pow2", "fixed", "fixed", "ternary", "binary")
AVG_KERNELS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4), (4, 2), (4, 4))
VECTORS = 4  # random images per vector file (the build adds the extreme ones)
UNROLL = 0.3  # chance that a conv or dense layer gets the unrolled engine
SCALE = 0.25  # chance that a conv or dense layer gets a per-output-channel scale
CODEBOOK = 0.25  # chance that a conv or dense layer gets codebook weights
PLANES = 0.2  # chance that a conv or dense layer without a codebook gets binary planes
SPARSE = 0.4  # chance that a folded conv or dense layer with a zero weight gets zero blocks
SPARSE_PATTERNS = ("blocks", "pe_rows", "zero_layer", "single_block")


@dataclass(frozen=True)
class Case:
    """One drawn configuration: the network, its folding and how it is simulated."""

    seed: int
    net: Network
    folding: dict[str, tuple[int, int]]
    weights: str  # the ARRAY_MODES mode of the weights ("" for pool and ReLU)
    rom_style: str
    stalls: float
    target: str  # a layer's name, or "network" for the stream top around them
    engines: dict[str, str] = field(default_factory=dict)  # the unrolled layers

    def describe(self) -> str:
        if len(self.net.layers) > 1:
            return self._describe_graph()
        layer, fin = self.net.layers[0], self.net.input_format
        c = self.net.input_shape
        s = f"seed {self.seed}: {type(layer).__name__} in {c} {fin}"
        if isinstance(layer, Conv2d):
            s += (
                f", {layer.in_channels}->{layer.out_channels} kernel {layer.kernel} "
                f"stride {layer.stride} padding {layer.padding}"
            )
        elif isinstance(layer, Linear):
            s += f", {layer.in_features}->{layer.out_features}"
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            s += f", kernel {layer.kernel} stride {layer.stride}"
        if isinstance(layer, (Conv2d, Linear)):
            s += (
                f", weights {layer.weight_format} ({self.weights}), out {layer.out_format}"
                f"{' relu' if layer.relu else ''}, acc {acc_bits(layer, fin)} bits"
            )
            if layer.scale is not None:
                s += f", scale {layer.scale_format} {layer.scale.tolist()}"
        pe, simd = self.folding[layer.name]
        engine = " unrolled" if self.engines else ""
        return (
            f"{s}; PE {pe} SIMD {simd}{engine}, rom {self.rom_style}, stalls {self.stalls:.2f}, "
            f"target {self.target}"
        )

    def _describe_graph(self) -> str:
        net = self.net
        parts = []
        for layer in net.layers:
            d = f"{layer.name}<-{'+'.join(layer.inputs)} {net.formats[layer.name]}"
            if isinstance(layer, Conv2d):
                d += f" k{layer.kernel} s{layer.stride} p{layer.padding} {layer.weight_format}"
                if layer.scale is not None:
                    d += f" scale {layer.scale_format} {layer.scale.tolist()}"
            if isinstance(layer, SubsamplePad):
                d += f" s{layer.stride} pad{layer.pad}"
            if getattr(layer, "relu", False):
                d += " relu"
            engine = " unrolled" if layer.name in self.engines else ""
            parts.append(f"{d} PE,SIMD {self.folding[layer.name]}{engine}")
        return (
            f"seed {self.seed}: in {net.input_shape} {net.input_format}; {'; '.join(parts)}; "
            f"weights {self.weights}, rom {self.rom_style}, stalls {self.stalls:.2f}, "
            f"target {self.target}"
        )


def _divisor(rng: np.random.Generator, n: int) -> int:
    return int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))


def _weight_format(rng: np.random.Generator, kind: str) -> WeightFormat:
    if kind == "fixed":
        return Fixed(int(rng.integers(2, 17)), int(rng.integers(-2, 9)))
    bits = {"ternary": 2, "binary": 1}.get(kind) or int(rng.integers(3, 8))
    return Pow2(bits, int(rng.integers(-3, 3)))


def _act_format(rng: np.random.Generator, frac: int | None = None) -> ActFormat:
    signed = bool(rng.integers(2))
    bits = int(rng.integers(2 if signed else 1, 13))
    return ActFormat(bits, int(rng.integers(-2, 7)) if frac is None else frac, signed)


def _mac_layer(
    rng: np.random.Generator,
    kind: str,
    wkind: str,
    shape: tuple[int, ...],
    fin: ActFormat,
    *,
    name: str | None = None,
    cout: int | None = None,
    same: tuple[int, int] | None = None,
) -> tuple[Layer, str]:
    """A Conv2d or Linear layer for input ``shape``; returns it and its weight mode.

    ``same`` = (kernel, stride) asks for a square conv padded by kernel // 2 (a residual
    branch's geometry); ``cout`` fixes the output channels.
    """
    wfmt = _weight_format(rng, wkind)
    cout = int(rng.integers(1, 9)) if cout is None else cout
    mode = str(rng.choice(ARRAY_MODES))
    if kind == "conv":
        cin, h, w = shape
        if same is None:
            kernel = (int(rng.integers(1, min(h, 3) + 1)), int(rng.integers(1, min(w, 3) + 1)))
            padding = tuple(int(rng.integers(0, k)) if rng.random() < 0.6 else 0 for k in kernel)
            stride = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        else:
            kernel, stride, padding = (same[0],) * 2, (same[1],) * 2, (same[0] // 2,) * 2
        weight = weight_array(rng, wfmt, (cout, cin, *kernel), mode)
        geometry = dict(stride=stride, padding=padding)
    else:
        weight = weight_array(rng, wfmt, (cout, shape[0]), mode)
        geometry = {}
    relu = bool(rng.integers(2))
    out_signed = bool(rng.integers(2)) or not relu

    def make(bias: np.ndarray, out: ActFormat) -> Layer:
        if kind == "conv":
            return Conv2d(
                name or "conv", shape[0], cout, kernel, wfmt, out, weight, bias, relu=relu,
                **geometry,
            )  # fmt: skip
        return Linear(name or "fc", shape[0], cout, wfmt, out, weight, bias, relu=relu)

    # Bias within the accumulator's range, and an output shift that keeps the outputs
    # mostly in range (with rounding), sometimes saturating, sometimes a left shift.
    abits = acc_bits(make(np.zeros(cout, dtype=np.int64), fin), fin)
    lim = 1 << max(abits - 2, 0)  # abits can be 1: all-zero or binary weights on a 1-bit input
    bias = rng.integers(-lim, lim, size=cout, endpoint=True)
    if rng.random() < 0.2:
        bias = np.zeros(cout, dtype=np.int64)
    out_bits = int(rng.integers(2 if out_signed else 1, 13))
    shift = abits - out_bits + int(rng.integers(-3, 3))
    frac = int(np.clip(fin.frac + wfmt.frac - shift, *ACT_FRAC_RANGE))
    return make(bias, ActFormat(out_bits, frac, out_signed)), mode


def _add_format(rng: np.random.Generator, fa: ActFormat, fb: ActFormat) -> ActFormat:
    """An add's output format near its inputs' scale: sometimes saturating, sometimes finer."""
    signed = bool(rng.integers(2))
    frac = int(rng.integers(min(fa.frac, fb.frac) - 2, max(fa.frac, fb.frac) + 3))
    return ActFormat(int(rng.integers(2 if signed else 1, 11)), frac, signed)


def _residual_net(
    rng: np.random.Generator, kind: str, wkind: str, fin: ActFormat
) -> tuple[Network, dict[str, tuple[int, int]], str]:
    """An add of the input and a conv of it, or a residual block; with a folding."""
    c, h, w = int(rng.integers(1, 5)), int(rng.integers(2, 7)), int(rng.integers(2, 7))
    if kind == "add":
        k = int(rng.choice([1, 3])) if min(h, w) >= 3 else 1
        conv, mode = _mac_layer(rng, "conv", wkind, (c, h, w), fin, cout=c, same=(k, 1))
        add_in = ("conv", "input") if rng.random() < 0.5 else ("input", "conv")
        fmts = [conv.out_format if i == "conv" else fin for i in add_in]
        add = Add("add", _add_format(rng, *fmts), add_in, bool(rng.integers(2)))
        layers: tuple[Layer, ...] = (conv, add)
    else:
        stride = int(rng.integers(1, 3))
        before, after = (0, 0) if stride == 1 and rng.random() < 0.5 else (
            int(rng.integers(0, 2)) * c, int(rng.integers(0, 2)) * c
        )  # fmt: skip
        cout = before + c + after
        conv1, mode = _mac_layer(
            rng, "conv", wkind, (c, h, w), fin, name="conv1", cout=cout, same=(3, stride)
        )
        conv2, _ = _mac_layer(
            rng, "conv", wkind, (cout, -(-h // stride), -(-w // stride)), conv1.out_format,
            name="conv2", cout=cout, same=(3, 1),
        )  # fmt: skip
        layers = (conv1, conv2)
        short = "input"
        if (stride, before, after) != (1, 0, 0):
            layers += (SubsamplePad("short", stride, (before, after), inputs=("input",)),)
            short = "short"
        add = Add("add", _add_format(rng, conv2.out_format, fin), ("conv2", short), True)
        layers += (add,)
    net = Network((c, h, w), fin, layers, name="case")
    folding = {}
    for layer in layers:
        if isinstance(layer, Conv2d):
            folding[layer.name] = (
                _divisor(rng, layer.out_channels), _divisor(rng, layer.in_channels)
            )  # fmt: skip
        else:
            ch = net.in_shape(layer)[0]
            if isinstance(layer, SubsamplePad):
                ch = math.gcd(ch, *layer.pad)
            pe = _divisor(rng, ch)
            folding[layer.name] = (pe, pe)
    return net, folding, mode


def _draw_roundings(seed: int, net: Network) -> Network:
    """``net`` with a rounding drawn for every stored format. A stream of its own, so a seed
    draws the same geometry, weights and widths as before rounding modes existed."""
    rng = np.random.default_rng([20240417, seed, 17])  # 17: the sample's MACs use all three
    return with_roundings(net, lambda name: ROUNDINGS[int(rng.integers(len(ROUNDINGS)))])


def effective_roundings(net: Network) -> set[str]:
    """The roundings the RTL of ``net`` uses: MAC and add outputs, average-pool inputs."""
    return {
        (net.in_format(lyr) if isinstance(lyr, AvgPool2d) else lyr.out_format).rounding
        for lyr in net.layers
        if isinstance(lyr, (Conv2d, Linear, Add, AvgPool2d))
    }


def _draw_engines(seed: int, case: Case, engine: str | None) -> Case:
    """``case`` with the unrolled engine drawn (or, with ``engine``, forced) for each conv
    and dense layer small enough. A stream of its own, as for the roundings."""
    rng = np.random.default_rng([20240417, seed, 23])
    engines, folding = {}, dict(case.folding)
    for layer in case.net.layers:
        if not isinstance(layer, (Conv2d, Linear)) or layer.weight.size > MAX_UNROLLED_WEIGHTS:
            continue
        if engine == "unrolled" or (engine is None and rng.random() < UNROLL):
            engines[layer.name] = "unrolled"
            folding[layer.name] = layer.weight.shape[:2]
    return replace(case, engines=engines, folding=folding)


def _draw_scales(seed: int, net: Network, scale: bool | None) -> Network:
    """``net`` with a per-output-channel scale drawn (or, with ``scale``, forced on or off)
    for each conv and dense layer: a Fixed format whose real values stay near ±1 (so the
    output formats drawn for the accumulator still fit), with the format's min, max, 0 and
    -1 among the channels. A stream of its own, as for the roundings."""
    rng = np.random.default_rng([20240417, seed, 29])
    layers = []
    for layer in net.layers:
        if isinstance(layer, (Conv2d, Linear)) and (
            scale or (scale is None and rng.random() < SCALE)
        ):
            bits = int(rng.integers(2, 17))
            sfmt = Fixed(bits, bits - 1 + int(rng.integers(-2, 3)))
            m = channel_scales(rng, sfmt, len(layer.bias))
            layer = replace(layer, scale=m, scale_format=sfmt)
        layers.append(layer)
    return replace(net, layers=tuple(layers))


def _draw_codebooks(seed: int, net: Network, mode: str, codebook: bool | None) -> Network:
    """``net`` with codebook weights drawn (or, with ``codebook``, forced on or off) for each
    conv and dense layer: ``2**bits`` (1..5) shift-add entries up to ``±2**kmax`` (kmax
    1..8), with or without 0, in the weights' array ``mode``; the frac keeps the largest
    weight's real size, so the output formats drawn for the accumulator still fit. A stream
    of its own, as for the roundings."""
    rng = np.random.default_rng([20240417, seed, 31])
    layers = []
    for layer in net.layers:
        if isinstance(layer, (Conv2d, Linear)) and (
            codebook or (codebook is None and rng.random() < CODEBOOK)
        ):
            kmax = int(rng.integers(1, 9))
            wfmt = layer.weight_format
            top = max(-wfmt.lo, wfmt.hi).bit_length()
            frac = int(np.clip(wfmt.frac + kmax + 1 - top, *WEIGHT_FRAC_RANGE))
            cb = shift_add_codebook(rng, int(rng.integers(1, 6)), kmax, frac)
            weight = weight_array(rng, cb, layer.weight.shape, mode or "random")
            layer = replace(layer, weight_format=cb, weight=weight)
        layers.append(layer)
    return replace(net, layers=tuple(layers))


def _draw_planes(seed: int, net: Network, mode: str, planes: bool | None) -> Network:
    """``net`` with binary-plane weights drawn (or, with ``planes``, forced on or off) for
    each conv and dense layer without a codebook: M (1..4) planes whose per-channel scales
    are ``bits``-bit integers (2..16; the min, max, 0 and 1 among them), in the weights'
    array ``mode`` (all planes +1 or -1 at the extremes); the frac keeps the largest
    weight's real size, as for the codebooks. A stream of its own."""
    rng = np.random.default_rng([20240417, seed, 37])
    layers = []
    for layer in net.layers:
        if (
            isinstance(layer, (Conv2d, Linear))
            and not isinstance(layer.weight_format, Codebook)
            and (planes or (planes is None and rng.random() < PLANES))
        ):
            m, bits = int(rng.integers(1, 5)), int(rng.integers(2, 17))
            fmt = plane_format(rng, layer.weight.shape[0], m, bits, 0)
            wfmt = layer.weight_format
            top = max(-wfmt.lo, wfmt.hi).bit_length()
            frac = wfmt.frac + max(-fmt.lo, fmt.hi).bit_length() - top
            fmt = replace(fmt, frac=int(np.clip(frac, *WEIGHT_FRAC_RANGE)))
            weight = weight_array(rng, fmt, layer.weight.shape, mode or "random")
            layer = replace(layer, weight_format=fmt, weight=weight)
        layers.append(layer)
    return replace(net, layers=tuple(layers))


def random_case(
    seed: int,
    kind: str | None = None,
    wkind: str | None = None,
    engine: str | None = None,
    scale: bool | None = None,
    codebook: bool | None = None,
    planes: bool | None = None,
    sparse: str | bool | None = None,
) -> Case:
    """Draw case ``seed`` (``kind``, ``wkind``, ``engine``, ``scale``, ``codebook`` and
    ``planes`` force the layer and weight kinds, the conv/dense engine, ``folded`` or
    ``unrolled``, and whether its conv and dense layers have per-channel scales, codebook
    and binary-plane weights; ``sparse``, a SPARSE_PATTERNS name or False, their zero
    blocks)."""
    case = _random_case(seed, kind, wkind)
    net = _draw_codebooks(seed, _draw_roundings(seed, case.net), case.weights, codebook)
    net = _draw_planes(seed, net, case.weights, planes)
    net = _draw_scales(seed, net, scale)
    return _draw_sparsity(seed, _draw_engines(seed, replace(case, net=net), engine), sparse)


def _has_zero(fmt: WeightFormat) -> bool:
    if isinstance(fmt, Codebook):
        return 0 in fmt.entries
    return isinstance(fmt, Fixed) or (isinstance(fmt, Pow2) and fmt.has_zero)


def _draw_sparsity(seed: int, case: Case, sparse: str | bool | None) -> Case:
    """``case`` with zero blocks drawn (or, with ``sparse``, forced or left out) in each
    folded conv and dense layer whose format has a zero: blocks of its folding's SIMD input
    channels of one output channel at one kernel position, what the engine skips
    (hwgen.hw.sparse). ``blocks``: 70% of them zero at random; ``pe_rows``: about half the
    output channels (PE rows) all zero; ``zero_layer``: every block; ``single_block``: all
    but one. A stream of its own, as for the roundings."""
    rng = np.random.default_rng([20240417, seed, 41])
    layers, drawn = [], []
    for layer in case.net.layers:
        folded = isinstance(layer, (Conv2d, Linear)) and layer.name not in case.engines
        can = folded and _has_zero(layer.weight_format) and sparse is not False
        if can and (sparse or rng.random() < SPARSE):
            pattern = sparse or str(rng.choice(SPARSE_PATTERNS))
            w, simd = layer.weight, case.folding[layer.name][1]
            shape = (w.shape[0], w.shape[1] // simd, *w.shape[2:])
            keep = rng.random(shape) < 0.3 if pattern == "blocks" else np.ones(shape, bool)
            if pattern == "pe_rows":
                keep[rng.random(shape[0]) < 0.5] = False
            elif pattern != "blocks":
                keep[:] = False
            if pattern == "single_block":
                keep[tuple(int(rng.integers(n)) for n in shape)] = True
            layer = replace(layer, weight=w * np.repeat(keep, simd, axis=1))
            drawn.append(f"{layer.name} {pattern}")
        layers.append(layer)
    weights = f"{case.weights}; zero blocks: {', '.join(drawn)}" if drawn else case.weights
    return replace(case, net=replace(case.net, layers=tuple(layers)), weights=weights)


def _random_case(seed: int, kind: str | None, wkind: str | None) -> Case:
    rng = np.random.default_rng([20240417, seed])
    kind = kind or str(rng.choice(KINDS))
    wkind = wkind or str(rng.choice(WEIGHT_KINDS))
    fin = _act_format(rng)
    if kind in ("add", "residual"):
        net, folding, weights = _residual_net(rng, kind, wkind, fin)
        net = Network(net.input_shape, fin, net.layers, name=f"case{seed}")
        stalls = float(rng.uniform(0.1, 0.5))
        rom_style = "file" if rng.random() < 0.25 else "inline"
        target = "add" if kind == "add" and rng.random() < 0.5 else "network"
        return Case(seed, net, folding, weights, rom_style, stalls, target)
    if kind == "dense":
        shape: tuple[int, ...] = (int(rng.integers(1, 17)),)
    else:
        shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))
    weights = ""
    if kind in ("conv", "dense"):
        layer, weights = _mac_layer(rng, kind, wkind, shape, fin)
        folding = {layer.name: (_divisor(rng, layer.weight.shape[0]), _divisor(rng, shape[0]))}
    else:
        c, h, w = shape
        if kind == "maxpool":
            kernel = (int(rng.integers(1, min(h, 3) + 1)), int(rng.integers(1, min(w, 3) + 1)))
            layer = MaxPool2d("pool", kernel, (int(rng.integers(1, 4)), int(rng.integers(1, 4))))
        elif kind == "avgpool":
            fits = [k for k in AVG_KERNELS if k[0] <= h and k[1] <= w]
            kernel = fits[int(rng.integers(len(fits)))]
            stride = kernel if rng.random() < 0.5 else (int(rng.integers(1, 3)),) * 2
            layer = AvgPool2d("pool", kernel, stride)
        else:
            layer = ReLU("relu")
        pe = _divisor(rng, c)
        folding = {layer.name: (pe, pe)}
    net = Network(shape, fin, (layer,), name=f"case{seed}")
    stalls = float(rng.uniform(0.0, 0.5)) if rng.random() < 0.8 else 0.0
    rom_style = "file" if rng.random() < 0.25 else "inline"
    target = "network" if rng.random() < 0.2 else layer.name
    return Case(seed, net, folding, weights, rom_style, stalls, target)


def run_case(case: Case, tmp_path) -> None:
    """Build ``case`` into ``tmp_path`` and require every RTL output to equal the golden one."""
    opts = BuildOptions(
        folding=case.folding,
        engines=case.engines,
        rom_style=case.rom_style,
        vectors=VECTORS,
        seed=case.seed,
    )
    out = tmp_path / "build"
    manifest = build(case.net, out, opts)
    entries = {e["name"]: e for e in [*manifest["layers"], manifest["top"]]}
    entry = entries[case.target]
    with np.load(out / entry["vectors"], allow_pickle=False) as vec:
        x, y = vec["input"], vec["output"]
        xb = vec.get("input_b")
    # The vectors are the golden model, and hold the all-max and all-min inputs.
    net = case.net
    if case.target == "network":
        fin = net.input_format
        assert np.array_equal(y, golden.forward(net, x)[-1]), case.describe()
    else:
        layer = net.layer(case.target)
        fins = [net.formats[i] for i in layer.inputs]
        xs = [x] if xb is None else [x, xb]
        assert np.array_equal(y, golden.layer_forward(layer, xs, fins)), case.describe()
        fin = fins[0]
    assert any(np.all(img == fin.hi) for img in x) and any(np.all(img == fin.lo) for img in x)
    r = simulate_layer(out, case.target, stalls=case.stalls, seed=case.seed)
    assert r.first_mismatch is None, f"{case.describe()}: {r.first_mismatch} (waves: {r.waves})"
    assert r.ok and r.mismatches == 0, case.describe()
    assert r.images == len(x) and r.outputs_checked == y.size, case.describe()
    # Each MAC lane does one product a cycle; a pool or ReLU engine takes one beat a cycle.
    assert r.cycles >= r.ideal_cycles, case.describe()


# The default sample: a convolution with INQ and one with ternary weights, a dense layer
# with fixed-point weights, an average pool, an add, a residual block (all folded) and an
# unrolled convolution; then per-channel scales at their extremes on a folded convolution
# (5 neuron folds, 15-bit scales), a folded dense layer (2 folds) and an unrolled
# convolution; then codebooks: a folded convolution with 32 entries (the lanes' digit
# muxes), a folded dense layer with 16 and a scale (shared products), an unrolled
# convolution with 8; the slow campaign covers the rest.
SAMPLE = (
    (1, "conv", "pow2", "folded", False, False),
    (2, "dense", "fixed", "folded", False, False),
    (3, "conv", "ternary", "folded", False, False),
    (4, "avgpool", None, "folded", False, False),
    (5, "add", "fixed", "folded", False, False),
    (9, "residual", "pow2", "folded", False, False),
    (33, "conv", "fixed", "unrolled", False, False),
    (42, "conv", "pow2", "folded", True, False),
    (57, "dense", "fixed", "folded", True, False),
    (43, "conv", "ternary", "unrolled", True, False),
    (64, "conv", "pow2", "folded", False, True),
    (62, "dense", "pow2", "folded", True, True),
    (65, "conv", "pow2", "unrolled", False, True),
)


@pytest.mark.parametrize(
    "seed,kind,wkind,engine,scale,codebook",
    SAMPLE,
    ids=[f"{k}-{w or ''}-{e}{'-scaled' * s}{'-codebook' * c}" for _, k, w, e, s, c in SAMPLE],
)
def test_sample(seed, kind, wkind, engine, scale, codebook, tmp_path):
    case = random_case(seed, kind, wkind, engine, scale, codebook, planes=False, sparse=False)
    scales = [getattr(lyr, "scale", None) for lyr in case.net.layers]
    assert any(m is not None for m in scales) == scale
    books = [isinstance(getattr(lyr, "weight_format", None), Codebook) for lyr in case.net.layers]
    assert any(books) == codebook
    run_case(case, tmp_path)


# Binary planes (amq): a folded convolution, a folded dense layer with a per-channel scale
# after its planes, an unrolled convolution.
PLANES_SAMPLE = (
    (80, "conv", "pow2", "folded", False),  # 4 planes, random signs, stalls 0.30
    (82, "dense", "fixed", "folded", True),  # 2 planes, a 13-bit scale at its extremes
    (73, "conv", "fixed", "unrolled", False),  # 3 planes as constant weights
)


@pytest.mark.parametrize(
    "seed,kind,wkind,engine,scale",
    PLANES_SAMPLE,
    ids=[f"{k}-{e}{'-scaled' * s}" for _, k, _, e, s in PLANES_SAMPLE],
)
def test_planes_sample(seed, kind, wkind, engine, scale, tmp_path):
    case = random_case(seed, kind, wkind, engine, scale, codebook=False, planes=True)
    assert isinstance(case.net.layers[0].weight_format, Planes), case.describe()
    run_case(case, tmp_path)


# Zero-block skipping, folded with random stalls: all-zero PE rows (ternary, 4 of 6 output
# channels zero at PE 3), 70% zero blocks (PE 4, SIMD 7, the network top), an all-zero
# dense layer and a single nonzero block (PE 8, SIMD 1).
SPARSE_SAMPLE = (
    (114, "conv", "ternary", "pe_rows"),
    (101, "conv", "pow2", "blocks"),
    (92, "dense", "fixed", "zero_layer"),
    (90, "conv", "fixed", "single_block"),
)


@pytest.mark.parametrize(
    "seed,kind,wkind,pattern", SPARSE_SAMPLE, ids=[f"{k}-{p}" for _, k, _, p in SPARSE_SAMPLE]
)
def test_sparse_sample(seed, kind, wkind, pattern, tmp_path):
    case = random_case(seed, kind, wkind, "folded", False, False, planes=False, sparse=pattern)
    pe, simd = case.folding[case.net.layers[0].name]
    info = engine_info(case.net, 0, pe, simd)
    assert info.ideal_cycles < info.macs // (pe * simd) and case.stalls > 0, case.describe()
    run_case(case, tmp_path)


def test_sample_covers_every_rounding():
    """The default sample simulates every rounding mode, in MAC requantisers and beyond."""
    nets = [random_case(*s, planes=False, sparse=False).net for s in SAMPLE]
    first = [n.layers[0] for n in nets]
    macs = {lyr.out_format.rounding for lyr in first if isinstance(lyr, (Conv2d, Linear))}
    assert macs == set(ROUNDINGS)
    assert set().union(*(effective_roundings(n) for n in nets)) == set(ROUNDINGS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1200))
def test_campaign(seed, tmp_path):
    run_case(random_case(seed), tmp_path)
