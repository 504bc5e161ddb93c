"""precision.toml: parse, write, add layers (output format only), overrides."""

from __future__ import annotations

import re

import pytest

from hwgen.errors import HwgenError
from hwgen.quant.precision import (
    AddPrecision,
    InputPrecision,
    LayerPrecision,
    Precision,
    check_bits,
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


def test_learned_schemes_round_trip_with_bits_per_layer():
    doc = 'scheme = "dqc"\n[layers.conv1]\nweight_bits = 3\n[layers.fc]\nweight_bits = 5\n'
    p = for_layers(parse(doc), ["conv1", "fc"])
    assert p.layers["conv1"].weight_bits == 3 and p.layers["fc"].weight_bits == 5
    assert parse(dumps(p)) == p
    q = p.override("amq", weight_bits=4)
    assert q.scheme == "amq" and {lp.weight_bits for lp in q.layers.values()} == {4}


@pytest.mark.parametrize(
    ("scheme", "bits", "message"),
    [
        ("bc", 2, "scheme bc has 1-bit weights, not 2"),
        ("lab", 2, "scheme lab has 1-bit weights, not 2"),
        ("twn", 3, "scheme twn has 2-bit weights, not 3"),
        ("lat", 1, "scheme lat has 2-bit weights, not 1"),
        ("ttq", 3, "scheme ttq has 2-bit weights, not 3"),
        ("dqc", 2, r"weight bits 2 out of range \[3, 5\] for dqc"),
        ("amq", 5, r"weight bits 5 out of range \[2, 4\] for amq"),
    ],
)
def test_learned_schemes_refuse_other_bits(scheme, bits, message):
    with pytest.raises(HwgenError, match=f"^--bits: {message}$"):
        check_bits(scheme, "--bits", bits, None)
    with pytest.raises(HwgenError, match=f"^layer c: {message}$"):
        parse(f'scheme = "{scheme}"\n[layers.c]\nweight_bits = {bits}\n')


@pytest.mark.parametrize("key", ["weight_frac = 3", "emax = -1"])
def test_learned_schemes_take_no_weight_frac_or_emax(key):
    name = key.split()[0]
    with pytest.raises(HwgenError, match=f"^layer c: scheme lat learns its weight scales; {name}"):
        parse(f'scheme = "lat"\n[layers.c]\n{key}\n')
    # a file of another scheme overridden by --scheme: the same one line
    with pytest.raises(HwgenError, match=f"^layer c: scheme bc learns its weight scales; {name}"):
        parse(f'scheme = "pow2"\n[layers.c]\n{key}\n').override("bc")


COMPRESSED = """\
scheme = "inq"
block = 4
lowrank = 3
lowrank_layers = ["conv2"]

[layers.conv2_h]
weight_bits = 5
prune = 0.75
"""


def test_compression_settings_parse_and_write_back():
    p = parse(COMPRESSED)
    assert (p.block, p.lowrank, p.lowrank_energy, p.lowrank_layers) == (4, 3, None, ("conv2",))
    assert p.layers["conv2_h"] == LayerPrecision(weight_bits=5, prune=0.75)
    assert p.pruned == {"conv2_h": 0.75}
    assert parse(dumps(p)) == p
    q = for_layers(p, ["conv1", "conv2_v", "conv2_h"]).override("pow2", weight_bits=4)
    assert (q.scheme, q.block, q.lowrank, q.lowrank_layers) == ("pow2", 4, 3, ("conv2",))
    assert q.layers["conv2_h"].prune == 0.75 and q.pruned == {"conv2_h": 0.75}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("[layers.fc]\nprune = 1.5\n", "layer fc: prune must be in [0, 1), not 1.5"),
        ('[layers.fc]\nprune = "a"\n', "precision: layers.fc.prune must be a number, not 'a'"),
        ("block = 0\n", "block must be a positive integer, not 0"),
        ("lowrank = 0\n", "lowrank must be a positive integer, not 0"),
        ("lowrank_energy = 1.5\n", "lowrank energy must be in (0, 1], not 1.5"),
        ("lowrank = 2\nlowrank_energy = 0.9\n", "give a low rank (2) or a kept energy (0.9)"),
        ('lowrank_layers = "conv2"\n', "lowrank_layers must be a list of names, not 'conv2'"),
    ],
)
def test_bad_compression_settings(doc, message):
    with pytest.raises(HwgenError, match=re.escape(message)):
        parse(f'scheme = "pow2"\n{doc}')


def test_prune_on_an_add_layer_is_an_error():
    p = parse('scheme = "fixed"\n[layers.add1]\nprune = 0.5\n')
    with pytest.raises(HwgenError, match="layer add1 is an add and has no weights: remove prune"):
        p.check_names(["conv1"], ["add1"])
