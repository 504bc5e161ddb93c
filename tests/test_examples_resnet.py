"""CIFAR ResNets and the ``resnet20`` example: shape, seeded weights, training, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hwgen.cli import main
from hwgen.errors import HwgenError
from hwgen.examples import load_example
from hwgen.examples.resnet import (
    BasicBlock,
    CifarResNet,
    SubsamplePadShortcut,
    random_resnet20,
    resnet20_float_net,
    train_resnet20,
)
from hwgen.frontend import load_model


def test_resnet20_shape_and_parameters():
    model = random_resnet20(0)
    assert sum(p.numel() for p in model.parameters()) == 269_722
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    shortcuts = [m.shortcut for m in blocks]
    assert [type(s) for s in shortcuts].count(SubsamplePadShortcut) == 2
    assert [s.pad for s in shortcuts if isinstance(s, SubsamplePadShortcut)] == [8, 16]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_random_resnet20_is_seeded_with_real_batchnorm_statistics():
    a, b, c = random_resnet20(0), random_resnet20(0), random_resnet20(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    bn = a.layers[2][2].bn2
    assert not a.training and bn.momentum == 0.1
    assert bn.running_var.min() > 0 and not torch.allclose(bn.running_var, torch.ones(64))
    assert not torch.allclose(bn.running_mean, torch.zeros(64))


def test_resnet20_example_has_no_data():
    net, data = load_example("resnet20")
    assert data is None and net.name == "resnet20" and net.input_shape == (3, 32, 32)
    assert load_model("resnet20")[0] is net is resnet20_float_net()


def _cifar_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n)


def test_training_moves_the_weights_deterministically():
    x, y = _cifar_like(12)
    a = train_resnet20(x, y, epochs=1, batch_size=8, progress=False)
    b = train_resnet20(x, y, epochs=1, batch_size=8, progress=False)
    start = random_resnet20(0).state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not a.training
    assert not torch.equal(sa["linear.weight"], start["linear.weight"])


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64), r"\(N, 3, 32, 32\) images"),
        (np.zeros((2, 3, 32, 32), np.float32), np.array([0, 10]), "labels in 0..9"),
        (np.zeros((2, 3, 32, 32), np.float32), np.zeros(3, np.int64), "needs 2 labels"),
    ],
)
def test_training_data_checked(x, y, message):
    with pytest.raises(HwgenError, match=message) as e:
        train_resnet20(x, y, epochs=1, progress=False)
    assert "\n" not in str(e.value)


def test_option_b_and_shortcut_checks():
    model = CifarResNet((1, 1), (4, 8), shortcut="B")
    proj = model.layers[1][0].shortcut
    assert isinstance(proj, nn.Sequential) and isinstance(proj[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="option A"):
        BasicBlock(4, 6, 2, "A")


def test_cli_resnet20_needs_data_then_trains_on_it(tmp_path: Path, capsys):
    out = str(tmp_path / "r.hwq")
    assert main(["quantize", "resnet20", "--scheme", "pow2", "--bits", "5", "-o", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model resnet20: no bundled data" in err
    x, y = _cifar_like(8)
    np.savez(tmp_path / "c.npz", x=x[:4], x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    argv = ["quantize", "resnet20", "--scheme", "pow2", "--bits", "5", "-o", out]
    assert main([*argv, "--data", str(tmp_path / "c.npz")]) == 0
    assert "wrote" in capsys.readouterr().out and Path(out).is_file()
