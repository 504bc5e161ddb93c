"""Machine-independent training helpers: the grid, the thread count, the default dtype."""

from __future__ import annotations

import pytest
import torch

from hwgen.reproducible import GRID, float64_init, one_thread, snap_


def test_snap_rounds_every_parameter_to_the_grid_and_keeps_grid_values():
    lin = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.7, 2.5 * GRID], [GRID, -1.0, 1e-12]]))
        lin.bias.copy_(torch.tensor([0.6 * GRID, -0.4 * GRID]))
    snap_(lin)
    assert lin.weight[0, 2].item() == 2 * GRID  # a tie goes to the even multiple
    assert lin.weight[1].tolist() == [GRID, -1.0, 0.0]
    assert lin.bias.tolist() == [GRID, 0.0]
    for p in lin.parameters():
        assert torch.equal(p / GRID, (p / GRID).round())
    before = [p.clone() for p in lin.parameters()]
    snap_(lin)
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters(), strict=True))


def test_one_thread_and_float64_init_restore_the_settings_even_on_errors():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError), one_thread(), float64_init():
        assert torch.get_num_threads() == 1
        assert torch.nn.Linear(2, 2).weight.dtype == torch.float64
        raise RuntimeError
    assert torch.get_num_threads() == threads
    assert torch.get_default_dtype() == torch.float32
