"""Built-in examples: a small trained model with its fixed train/test split, by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hwgen.frontend.graph import FloatNet

EXAMPLES = ("digits",)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images as float32 NCHW arrays in [0, 1] and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_example(name: str) -> tuple[FloatNet, Dataset]:
    """The trained float graph of example ``name`` and its data (cached per process)."""
    if name == "digits":
        from hwgen.examples.digits import digits_float_net

        return digits_float_net()
    raise KeyError(name)
