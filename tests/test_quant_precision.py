"""precision.toml: parse, write, add layers (output format only), overrides."""

from __future__ import annotations

import pytest

from hwgen.errors import HwgenError
from hwgen.quant.precision import (
    AddPrecision,
    InputPrecision,
    LayerPrecision,
    Precision,
    dumps,
    for_layers,
    parse,
)

DOC = """\
scheme = "fixed"

[input]
act_bits = 8

[layers.conv1]
weight_bits = 6
act_frac = 3

[layers.add1]
act_bits = 7
act_signed = false
"""


def test_add_layers_parse_resolve_and_write_back():
    p = parse(DOC)
    assert p.layers["add1"] == LayerPrecision(act_bits=7, act_signed=False)  # the file can't tell
    q = for_layers(p, ["conv1", "fc"], ["add1", "add2"])
    assert q.layers == {
        "conv1": LayerPrecision(weight_bits=6, act_frac=3),
        "fc": LayerPrecision(),
        "add1": AddPrecision(act_bits=7, act_signed=False),
        "add2": AddPrecision(),
    }
    assert q.input == InputPrecision(act_bits=8)
    assert for_layers(parse(dumps(q)), ["conv1", "fc"], ["add1", "add2"]) == q
    assert "[layers.add1]\nact_bits = 7\nact_signed = false\n" in dumps(q)


def test_overrides_give_add_layers_act_bits_only():
    q = for_layers(parse(DOC), ["conv1"], ["add1"]).override("pow2", weight_bits=4, act_bits=6)
    assert q.scheme == "pow2"
    assert q.layers["conv1"] == LayerPrecision(weight_bits=4, act_bits=6, act_frac=3)
    assert q.layers["add1"] == AddPrecision(act_bits=6, act_signed=False)


@pytest.mark.parametrize("key", ["weight_bits = 4", "weight_frac = 2", "emax = -1"])
def test_weight_keys_on_an_add_layer_are_an_error(key):
    p = parse(f'scheme = "fixed"\n[layers.add1]\n{key}\nact_bits = 6\n')
    name = key.split()[0]
    message = (
        f"precision: layer add1 is an add and has no weights: remove {name} "
        "(it takes act_bits, act_frac, act_signed)"
    )
    with pytest.raises(HwgenError) as e:
        for_layers(p, ["conv1"], ["add1"])
    assert str(e.value) == message


def test_unknown_layers_and_kinds():
    p = parse('scheme = "fixed"\n[layers.add9]\nact_bits = 6\n')
    with pytest.raises(HwgenError, match=r"no conv/linear or add layer 'add9' \(it has: c, a\)$"):
        p.check_names(["c"], ["a"])
    with pytest.raises(HwgenError, match=r"no conv/linear layer 'add9' \(it has: c\)$"):
        p.check_names(["c"])
    with pytest.raises(HwgenError, match="layer c is a conv/linear layer, not an add"):
        Precision("fixed", {"c": AddPrecision(act_bits=4)}).check_names(["c"])
    with pytest.raises(HwgenError, match=r"layer a: activation bits 17 out of range \[2, 16\]"):
        Precision("fixed", {"a": AddPrecision(act_bits=17)})
