"""Built-in examples by name: a float model, with its bundled data when it has some.

- ``digits``: a small CNN trained on scikit-learn's 8x8 digits (:mod:`hwgen.examples.digits`),
- ``digits-res``: a small residual CNN on the same data (:mod:`hwgen.examples.digits_res`),
- ``resnet20``: the CIFAR-10 ResNet-20 (:mod:`hwgen.examples.resnet`); no bundled data: it is
  trained on the user's arrays when given, else seeded random (for hardware benches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hwgen.frontend.graph import FloatNet

EXAMPLES = ("digits", "digits-res", "resnet20")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images as float32 NCHW arrays in [0, 1] and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_example(
    name: str, train: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[FloatNet, Dataset | None]:
    """The float graph of example ``name`` and its bundled data (None: it has none).

    ``train`` (images, labels) is what ``resnet20`` trains on; the bundled examples come
    trained and ignore it. Trained bundled models are cached per process.
    """
    if name == "digits":
        from hwgen.examples.digits import digits_float_net

        return digits_float_net()
    if name == "digits-res":
        from hwgen.examples.digits_res import digits_res_float_net

        return digits_res_float_net()
    if name == "resnet20":
        from hwgen.examples.resnet import resnet20_float_net

        return resnet20_float_net(train), None
    raise KeyError(name)
