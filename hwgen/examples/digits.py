"""The built-in ``digits`` example: scikit-learn's bundled 8x8 handwritten digits.

Data: ``sklearn.datasets.load_digits()`` (1797 images, bundled with scikit-learn, no
download), pixel values 0..16 divided by 16 to [0, 1], shaped ``(N, 1, 8, 8)`` float32.

Split (fixed, so every number quoted for this example is reproducible)::

    train_test_split(x, y, test_size=360, random_state=0, stratify=y)

gives 1437 training and 360 test images, every class in the same proportion in both.

Model (``build_digits_model``), 3,818 parameters::

    conv1  Conv2d(1 -> 8, 3x3, pad 1) + ReLU      8x8x1  -> 8x8x8
    pool1  MaxPool2d(2)                           8x8x8  -> 4x4x8
    conv2  Conv2d(8 -> 16, 3x3, pad 1) + ReLU     4x4x8  -> 4x4x16
    flatten                                       4x4x16 -> 256
    fc     Linear(256 -> 10)                      logits

Training (``train_digits_model``): Adam (lr 2e-2), cross-entropy, mini-batches of 128,
30 epochs, seeded with ``torch.manual_seed`` and a seeded shuffling generator, on one
CPU thread, in float64 with the parameters snapped to a 2**-24 grid after every step
(:mod:`hwgen.reproducible`), so any machine, instruction set and thread count gives the
same weights, bit for bit. It takes a few seconds.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hwgen.examples import Dataset
from hwgen.frontend.graph import FloatNet
from hwgen.frontend.torch_import import from_module
from hwgen.reproducible import float64_init, one_thread, snap_

__all__ = [
    "Dataset",
    "accuracy",
    "build_digits_model",
    "digits_float_net",
    "load_digits_split",
    "train",
    "train_digits_model",
    "train_epoch",
]

TEST_SIZE = 360
SPLIT_SEED = 0
INPUT_SHAPE = (1, 8, 8)
EPOCHS = 30
BATCH_SIZE = 128
LR = 2e-2


def load_digits_split() -> Dataset:
    """The fixed train/test split of the module docstring."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    return Dataset(x_tr, y_tr, x_te, y_te)


def build_digits_model() -> nn.Module:
    """The untrained example CNN (layout in the module docstring)."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 8, 3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(8, 16, 3, padding=1),
            relu2=nn.ReLU(),
            flatten=nn.Flatten(),
            fc=nn.Linear(256, 10),
        )
    )


def train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    after_step: Callable[[nn.Module], None] | None = None,
) -> float:
    """One pass over ``(x, y)`` in a shuffled order; returns the mean loss.

    The parameters are snapped to the reproducible grid after every optimizer step
    (:func:`hwgen.reproducible.snap_`); ``after_step(model)`` runs after that (e.g. INQ
    re-imposes its frozen, already quantized weights there).
    """
    model.train()
    order = torch.randperm(len(x), generator=generator)
    total = 0.0
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        snap_(model)
        if after_step is not None:
            with torch.no_grad():
                after_step(model)
        total += loss.item() * len(idx)
    return total / len(x)


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int = EPOCHS,
    seed: int = 0,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    after_step: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Train a classifier on ``data`` with Adam and cross-entropy, deterministically.

    Trains on one CPU thread in float64 on the snapped grid (:mod:`hwgen.reproducible`), so
    the weights do not depend on the machine; returns the same ``model``, in float32 and eval
    mode (rounded the same way everywhere; exact below 1 in magnitude).
    """
    with one_thread():
        gen = torch.Generator().manual_seed(seed)
        x = torch.from_numpy(np.array(data.x_train, np.float64))
        y = torch.from_numpy(np.array(data.y_train))
        model.double()
        snap_(model)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            train_epoch(model, x, y, opt, batch_size, gen, after_step)
    return model.float().eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no gradients) on float images ``x``."""
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(np.array(x))).argmax(dim=1).numpy()
    return float(np.mean(pred == y))


def train_digits_model(seed: int = 0) -> nn.Module:
    """The example CNN trained on the fixed split (a fresh module on every call)."""
    model = build_digits_model()
    model.load_state_dict(_trained_state(seed))
    return model.eval()


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with float64_init():
        model = build_digits_model()
    model = train(model, load_digits_split(), seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def digits_float_net() -> tuple[FloatNet, Dataset]:
    """The trained example as a float graph, with a fresh copy of its data.

    The graph is trained and imported once per process (cached); the arrays of the
    Dataset are new on every call, so callers may modify them.
    """
    return _digits_float_net(), load_digits_split()


@functools.lru_cache(maxsize=1)
def _digits_float_net() -> FloatNet:
    return from_module(train_digits_model(0), INPUT_SHAPE, name="digits")
