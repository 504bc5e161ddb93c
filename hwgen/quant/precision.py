"""Per-layer precision: the editable ``precision.toml`` that `tune` writes and `quantize` reads.

Layout::

    scheme = "fixed"            # fixed | inq | pow2 | ternary | binary | auto
                                # | bc | twn | lab | lat | dqc | ttq | amq
    block = 4                   # optional: prune in blocks of 4 input channels (default 1)
    lowrank = 4                 # optional: split conv layers at rank 4 before quantising
    # lowrank_energy = 0.9      #   or at the rank keeping this fraction of sum(S**2)
    # lowrank_layers = ["conv2"]  #   the layers to split (default: every conv layer)

    [input]                     # optional: the network input format
    act_bits = 8
    act_frac = 7
    act_signed = true

    [layers.conv1]              # one table per Conv2d/Linear/Add layer, by name
    weight_bits = 8
    act_bits = 8
    weight_frac = 6             # Fixed schemes (omit to let quantize choose it)
    # emax = -1                 # power-of-two schemes (omit to use INQ's n1 rule)
    act_frac = 4                # output fraction length (omit to choose it greedily)
    act_signed = true           # optional; false gives an unsigned (ReLU) output
    prune = 0.75                # optional: the fraction of its blocks pruned (retrained)

    [layers.add1]               # an add layer has no weights: its output format only
    act_bits = 8
    act_frac = 4
    act_signed = false

The retrained schemes of issue #11 learn their scales and codebooks, so their layers take
no ``weight_frac`` or ``emax``; their ``weight_bits`` are fixed by the scheme (bc, lab: 1;
twn, lat, ttq: 2) or count index bits (dqc: 3 to 5, a codebook of ``2**bits`` entries) or
binary planes (amq: 2 to 4).

A value left out is chosen by the quantizer; a value given is used as it is, so a file
written by `tune` reproduces exactly the configuration it reports. The file does not say
which layers are adds: the model does (:func:`for_layers`, ``Precision.check_names``).

Compression comes before the weight scheme (:func:`hwgen.quant.quantize.quantize`): the
low-rank split (:mod:`hwgen.quant.lowrank`; the layers tables then name the split layers,
``conv2_v`` and ``conv2_h``), then pruning (:mod:`hwgen.quant.prune`) of the layers with a
``prune`` value, in blocks of ``block``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from hwgen.errors import HwgenError
from hwgen.fsutil import atomic_write_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEMES = (
    "auto", "fixed", "inq", "pow2", "ternary", "binary", "bc", "twn", "lab", "lat", "dqc",
    "ttq", "amq",
)  # fmt: skip
# weight bits (min, max) of each scheme: Fixed and power-of-two widths, else what the bits
# count (bc/lab: binary codes, twn/lat/ttq: ternary, dqc: codebook index, amq: binary planes)
WEIGHT_BITS = {
    "auto": (2, 16), "fixed": (2, 16), "inq": (1, 7), "pow2": (1, 7), "ternary": (2, 2),
    "binary": (1, 1), "bc": (1, 1), "lab": (1, 1), "twn": (2, 2), "lat": (2, 2),
    "ttq": (2, 2), "dqc": (3, 5), "amq": (2, 4),
}  # fmt: skip
# the schemes whose scales or codebooks are learned: no weight_frac or emax to set
LEARNED = ("bc", "twn", "lab", "lat", "dqc", "ttq", "amq")
_LAYER_KEYS = (
    "weight_bits", "act_bits", "weight_frac", "emax", "act_frac", "act_signed", "prune",
)  # fmt: skip
_ACT_KEYS = ("act_bits", "act_frac", "act_signed")
_WEIGHT_KEYS = ("weight_bits", "weight_frac", "emax", "prune")
_TOP_KEYS = ("block", "lowrank", "lowrank_energy", "lowrank_layers")


@dataclass(frozen=True)
class LayerPrecision:
    """Bits and (optionally) fraction lengths of one Conv2d/Linear layer."""

    weight_bits: int | None = None
    act_bits: int | None = None
    weight_frac: int | None = None
    emax: int | None = None
    act_frac: int | None = None
    act_signed: bool | None = None
    prune: float | None = None


@dataclass(frozen=True)
class InputPrecision:
    act_bits: int | None = None
    act_frac: int | None = None
    act_signed: bool | None = None


@dataclass(frozen=True)
class AddPrecision:
    """The output format of one add layer (it has no weights)."""

    act_bits: int | None = None
    act_frac: int | None = None
    act_signed: bool | None = None


@dataclass(frozen=True)
class Precision:
    """A scheme and per-layer settings; layers not named use the quantizer's defaults.

    ``layers`` holds conv/linear layers and add layers alike: a file gives every layer as a
    :class:`LayerPrecision`; :func:`for_layers` turns those of add layers into
    :class:`AddPrecision` once the model says which they are.

    ``block``, ``lowrank``, ``lowrank_energy`` and ``lowrank_layers`` are the compression
    settings of the whole network (see the module doc).
    """

    scheme: str
    layers: dict[str, LayerPrecision | AddPrecision] = field(default_factory=dict)
    input: InputPrecision = InputPrecision()
    block: int | None = None
    lowrank: int | None = None
    lowrank_energy: float | None = None
    lowrank_layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise HwgenError(f"scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        check_compression(self.block, self.lowrank, self.lowrank_energy)
        for name, lp in self.layers.items():
            _check_bits(self.scheme, f"layer {name}", getattr(lp, "weight_bits", None), lp.act_bits)
            prune = getattr(lp, "prune", None)
            if prune is not None and not 0.0 <= prune < 1.0:
                raise HwgenError(f"layer {name}: prune must be in [0, 1), not {prune}")
            if self.scheme in LEARNED:
                for key in ("weight_frac", "emax"):
                    if getattr(lp, key, None) is not None:
                        raise HwgenError(
                            f"layer {name}: scheme {self.scheme} learns its weight scales; "
                            f"{key} does not apply"
                        )

    def layer(self, name: str) -> LayerPrecision | AddPrecision:
        return self.layers.get(name, LayerPrecision())

    def check_names(self, names: Iterable[str], adds: Iterable[str] = ()) -> None:
        """Every layer named here must be a conv/linear layer (``names``) or an add layer
        (``adds``) of the model, and an add layer has no weight settings."""
        macs, adds = list(names), list(adds)
        for name, lp in self.layers.items():
            if name in adds:
                given = [k for k in _WEIGHT_KEYS if getattr(lp, k, None) is not None]
                if given:
                    raise HwgenError(
                        f"precision: layer {name} is an add and has no weights: "
                        f"remove {', '.join(given)} (it takes {', '.join(_ACT_KEYS)})"
                    )
            elif name in macs and isinstance(lp, AddPrecision):
                raise HwgenError(f"precision: layer {name} is a conv/linear layer, not an add")
            elif name not in macs:
                kinds = "conv/linear or add" if adds else "conv/linear"
                raise HwgenError(
                    f"precision: the model has no {kinds} layer {name!r} "
                    f"(it has: {', '.join(macs + adds)})"
                )

    @property
    def pruned(self) -> dict[str, float]:
        """The layers with a nonzero ``prune`` target."""
        return {n: lp.prune for n, lp in self.layers.items() if getattr(lp, "prune", None)}

    def override(
        self, scheme: str | None = None, weight_bits: int | None = None, act_bits: int | None = None
    ) -> Precision:
        """Command-line options win over the file, for every layer."""
        layers = {}
        for n, lp in self.layers.items():
            new = {"weight_bits": weight_bits, "act_bits": act_bits}
            if isinstance(lp, AddPrecision):
                del new["weight_bits"]  # an add has no weights
            layers[n] = replace(lp, **{k: v for k, v in new.items() if v is not None})
        return replace(self, scheme=scheme or self.scheme, layers=layers)


def check_compression(block: int | None, lowrank: int | None, energy: float | None) -> None:
    """Range check of the block size, the rank and the kept energy."""
    for key, value in (("block", block), ("lowrank", lowrank)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise HwgenError(f"{key} must be a positive integer, not {value}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise HwgenError(f"lowrank energy must be in (0, 1], not {energy}")
    if lowrank is not None and energy is not None:
        raise HwgenError(f"give a low rank ({lowrank}) or a kept energy ({energy}), not both")


def _check_bits(scheme: str, where: str, weight_bits: int | None, act_bits: int | None) -> None:
    wmin, wmax = WEIGHT_BITS[scheme]
    if weight_bits is not None and wmin == wmax and weight_bits != wmin:
        raise HwgenError(f"{where}: scheme {scheme} has {wmin}-bit weights, not {weight_bits}")
    if weight_bits is not None and not wmin <= weight_bits <= wmax:
        raise HwgenError(
            f"{where}: weight bits {weight_bits} out of range [{wmin}, {wmax}] for {scheme}"
        )
    if act_bits is not None and not 2 <= act_bits <= 16:
        raise HwgenError(f"{where}: activation bits {act_bits} out of range [2, 16]")


def _typed(where: str, key: str, value: object) -> int | bool | float | tuple[str, ...]:
    if key == "lowrank_layers":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HwgenError(f"precision: {where}.{key} must be a list of names, not {value!r}")
        return tuple(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("prune", "lowrank_energy") and number:
        return float(value)
    want = bool if key == "act_signed" else int
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        want_name = "a number" if key in ("prune", "lowrank_energy") else want.__name__
        raise HwgenError(f"precision: {where}.{key} must be {want_name}, not {value!r}")
    return value


def _table(where: str, d: object, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise HwgenError(f"precision: [{where}] must be a table")
    for key in d:
        if key not in keys:
            raise HwgenError(
                f"precision: unknown key {key!r} in [{where}] (known: {', '.join(keys)})"
            )
    return {k: _typed(where, k, v) for k, v in d.items()}


def parse(text: str, source: str = "precision.toml") -> Precision:
    """Parse and check a precision.toml document."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HwgenError(f"{source}: not valid TOML ({e})") from None
    for key in doc:
        if key not in ("scheme", "input", "layers", *_TOP_KEYS):
            raise HwgenError(f"{source}: unknown top-level key {key!r}")
    scheme = doc.get("scheme")
    if not isinstance(scheme, str):
        raise HwgenError(f'{source}: needs a top-level scheme = "..." ({", ".join(SCHEMES)})')
    layers_doc = doc.get("layers", {})
    if not isinstance(layers_doc, dict):
        raise HwgenError(f"{source}: layers must be tables [layers.<name>]")
    layers = {
        n: LayerPrecision(**_table(f"layers.{n}", d, _LAYER_KEYS)) for n, d in layers_doc.items()
    }
    inp = InputPrecision(**_table("input", doc.get("input", {}), _ACT_KEYS))
    top = {k: _typed(source, k, doc[k]) for k in _TOP_KEYS if k in doc}
    return Precision(scheme, layers, inp, **top)


def load(path: str | Path) -> Precision:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise HwgenError(f"precision file {path}: {e.strerror}") from None
    return parse(text, str(path))


def dumps(p: Precision) -> str:
    doc: dict[str, object] = {"scheme": p.scheme}
    for key in _TOP_KEYS:
        value = getattr(p, key)
        if value is not None:
            doc[key] = list(value) if key == "lowrank_layers" else value
    inp = {k: getattr(p.input, k) for k in _ACT_KEYS if getattr(p.input, k) is not None}
    if inp:
        doc["input"] = inp
    doc["layers"] = {
        n: {k: getattr(lp, k) for k in _LAYER_KEYS if getattr(lp, k, None) is not None}
        for n, lp in p.layers.items()
    }
    return tomli_w.dumps(doc)


def save(p: Precision, path: str | Path) -> Path:
    return atomic_write_bytes(path, dumps(p).encode())


def check_bits(scheme: str, where: str, weight_bits: int | None, act_bits: int | None) -> None:
    """Range check of bit widths given outside a file (command-line options)."""
    if scheme not in SCHEMES:
        raise HwgenError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    _check_bits(scheme, where, weight_bits, act_bits)


def for_layers(p: Precision, names: Iterable[str], adds: Iterable[str] = ()) -> Precision:
    """``p`` with an entry for every conv/linear layer (``names``) and add layer (``adds``),
    in that order, so that overrides reach them all; an add layer's entry is an
    :class:`AddPrecision`."""
    names, adds = list(names), list(adds)
    p.check_names(names, adds)
    layers: dict[str, LayerPrecision | AddPrecision] = {n: p.layer(n) for n in names}
    for n in adds:
        lp = p.layer(n)
        layers[n] = AddPrecision(lp.act_bits, lp.act_frac, lp.act_signed)
    return replace(p, layers=layers)
