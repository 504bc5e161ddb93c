"""The built-in ``digits-res`` example: a small residual CNN on the bundled 8x8 digits.

Data: the fixed split of the ``digits`` example (:func:`hwgen.examples.digits.load_digits_split`).

Model (``build_digits_res_model``, a :class:`~hwgen.examples.resnet.CifarResNet` with one
block per stage), 4,962 parameters::

    conv1 + bn1 + ReLU      Conv2d(1 -> 8, 3x3, pad 1)                      8x8x1  -> 8x8x8
    layers.0.0              BasicBlock 8 -> 8, identity shortcut            8x8x8  -> 8x8x8
    layers.1.0              BasicBlock 8 -> 16, stride 2, option-A shortcut 8x8x8  -> 4x4x16
                            (x[:, :, ::2, ::2] plus 4 zero channels on each side)
    pool                    global average pool over 4x4 = 16 values        4x4x16 -> 16
    linear                  Linear(16 -> 10)                                logits

Training: :func:`hwgen.examples.digits.train` (Adam, lr 2e-2, 40 epochs, mini-batches of
128, seeded, on one CPU thread), so two runs give identical weights; a few seconds.
"""

from __future__ import annotations

import functools

import torch

from hwgen.examples import Dataset
from hwgen.examples.digits import INPUT_SHAPE, load_digits_split, train
from hwgen.examples.resnet import CifarResNet
from hwgen.frontend.graph import FloatNet
from hwgen.frontend.torch_import import from_module
from hwgen.reproducible import float64_init

EPOCHS = 40
LR = 2e-2


def build_digits_res_model() -> CifarResNet:
    """The untrained example (layout in the module docstring)."""
    return CifarResNet(blocks=(1, 1), widths=(8, 16), in_channels=1, num_classes=10)


def train_digits_res_model(seed: int = 0) -> CifarResNet:
    """The example trained on the fixed split (a fresh module on every call)."""
    model = build_digits_res_model()
    model.load_state_dict(_trained_state(seed))
    return model.eval()  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with float64_init():
        model = build_digits_res_model()
    model = train(model, load_digits_split(), epochs=EPOCHS, seed=seed, lr=LR)
    return {k: v.clone() for k, v in model.state_dict().items()}


def digits_res_float_net() -> tuple[FloatNet, Dataset]:
    """The trained example as a float graph (cached per process), with a fresh copy of its
    data."""
    return _digits_res_float_net(), load_digits_split()


@functools.lru_cache(maxsize=1)
def _digits_res_float_net() -> FloatNet:
    return from_module(train_digits_res_model(0), INPUT_SHAPE, name="digits_res")
