"""Per-layer precision: the editable ``precision.toml`` that `tune` writes and `quantize` reads.

Layout::

    scheme = "fixed"            # fixed | inq | pow2 | ternary | binary | auto

    [input]                     # optional: the network input format
    act_bits = 8
    act_frac = 7
    act_signed = true

    [layers.conv1]              # one table per Conv2d/Linear layer, by name
    weight_bits = 8
    act_bits = 8
    weight_frac = 6             # Fixed schemes (omit to let quantize choose it)
    # emax = -1                 # power-of-two schemes (omit to use INQ's n1 rule)
    act_frac = 4                # output fraction length (omit to choose it greedily)
    act_signed = true           # optional; false gives an unsigned (ReLU) output

A value left out is chosen by the quantizer; a value given is used as it is, so a file
written by `tune` reproduces exactly the configuration it reports.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomli_w

from hwgen.errors import HwgenError
from hwgen.fsutil import atomic_write_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEMES = ("auto", "fixed", "inq", "pow2", "ternary", "binary")
_LAYER_KEYS = ("weight_bits", "act_bits", "weight_frac", "emax", "act_frac", "act_signed")
_INPUT_KEYS = ("act_bits", "act_frac", "act_signed")


@dataclass(frozen=True)
class LayerPrecision:
    """Bits and (optionally) fraction lengths of one Conv2d/Linear layer."""

    weight_bits: int | None = None
    act_bits: int | None = None
    weight_frac: int | None = None
    emax: int | None = None
    act_frac: int | None = None
    act_signed: bool | None = None


@dataclass(frozen=True)
class InputPrecision:
    act_bits: int | None = None
    act_frac: int | None = None
    act_signed: bool | None = None


@dataclass(frozen=True)
class Precision:
    """A scheme and per-layer settings; layers not named use the quantizer's defaults."""

    scheme: str
    layers: dict[str, LayerPrecision] = field(default_factory=dict)
    input: InputPrecision = InputPrecision()

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise HwgenError(f"scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        for name, lp in self.layers.items():
            _check_bits(self.scheme, f"layer {name}", lp)

    def layer(self, name: str) -> LayerPrecision:
        return self.layers.get(name, LayerPrecision())

    def check_names(self, names: Iterable[str]) -> None:
        """Every layer named here must be a Conv2d/Linear layer of the model."""
        known = list(names)
        for name in self.layers:
            if name not in known:
                raise HwgenError(
                    f"precision: the model has no conv/linear layer {name!r} "
                    f"(it has: {', '.join(known)})"
                )

    def override(
        self, scheme: str | None = None, weight_bits: int | None = None, act_bits: int | None = None
    ) -> Precision:
        """Command-line options win over the file, for every layer."""
        layers = {
            n: replace(
                lp,
                **{
                    k: v
                    for k, v in (("weight_bits", weight_bits), ("act_bits", act_bits))
                    if v is not None
                },
            )
            for n, lp in self.layers.items()
        }
        return Precision(scheme or self.scheme, layers, self.input)


def _check_bits(scheme: str, where: str, lp: LayerPrecision) -> None:
    wmax = 7 if scheme in ("inq", "pow2", "ternary", "binary") else 16
    wmin = {"ternary": 2, "binary": 1, "inq": 1, "pow2": 1}.get(scheme, 2)
    if lp.weight_bits is not None and not wmin <= lp.weight_bits <= wmax:
        raise HwgenError(
            f"{where}: weight bits {lp.weight_bits} out of range [{wmin}, {wmax}] for {scheme}"
        )
    if lp.act_bits is not None and not 2 <= lp.act_bits <= 16:
        raise HwgenError(f"{where}: activation bits {lp.act_bits} out of range [2, 16]")


def _typed(where: str, key: str, value: object) -> int | bool:
    want = bool if key == "act_signed" else int
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise HwgenError(f"precision: {where}.{key} must be {want.__name__}, not {value!r}")
    return value


def _table(where: str, d: object, keys: tuple[str, ...]) -> dict[str, int | bool]:
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
        if key not in ("scheme", "input", "layers"):
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
    inp = InputPrecision(**_table("input", doc.get("input", {}), _INPUT_KEYS))
    return Precision(scheme, layers, inp)


def load(path: str | Path) -> Precision:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise HwgenError(f"precision file {path}: {e.strerror}") from None
    return parse(text, str(path))


def dumps(p: Precision) -> str:
    doc: dict[str, object] = {"scheme": p.scheme}
    inp = {k: getattr(p.input, k) for k in _INPUT_KEYS if getattr(p.input, k) is not None}
    if inp:
        doc["input"] = inp
    doc["layers"] = {
        n: {k: getattr(lp, k) for k in _LAYER_KEYS if getattr(lp, k) is not None}
        for n, lp in p.layers.items()
    }
    return tomli_w.dumps(doc)


def save(p: Precision, path: str | Path) -> Path:
    return atomic_write_bytes(path, dumps(p).encode())


def check_bits(scheme: str, where: str, weight_bits: int | None, act_bits: int | None) -> None:
    """Range check of bit widths given outside a file (command-line options)."""
    if scheme not in SCHEMES:
        raise HwgenError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    _check_bits(scheme, where, LayerPrecision(weight_bits, act_bits))


def for_layers(p: Precision, names: Iterable[str]) -> Precision:
    """``p`` with a (possibly empty) entry for every named layer, so overrides reach them all."""
    names = list(names)
    p.check_names(names)
    return Precision(p.scheme, {n: p.layer(n) for n in names}, p.input)
