"""Importers: PyTorch modules, ONNX files and built-in examples become a float graph.

The CLI names a model with one string (:func:`load_model`); the Python API imports an
``nn.Module`` directly (:func:`hwgen.frontend.torch_import.from_module`). An ONNX file that
is already quantized (Brevitas QONNX or QCDQ export) becomes an integer network directly,
with its own formats (:func:`load_quantized`, :mod:`hwgen.frontend.qonnx_import`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hwgen.errors import HwgenError

if TYPE_CHECKING:
    import numpy as np

    from hwgen.examples import Dataset
    from hwgen.frontend.graph import FloatNet
    from hwgen.ir import Network

_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_model(
    spec: str | Path, train: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[FloatNet, Dataset | None]:
    """Resolve a CLI MODEL: an ``.onnx`` file or a built-in example name (with its data).

    ``train`` is the user's training data (images, labels), for a built-in example that is
    trained on it (``resnet20``).
    """
    from hwgen.examples import EXAMPLES, load_example

    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from hwgen.frontend.onnx_import import from_onnx

        if _is_quantized_onnx(path):
            raise HwgenError(
                f"model {spec}: is quantized (QONNX/QCDQ): hwgen quantize keeps its formats "
                "with --scheme auto or without --scheme"
            )
        return from_onnx(path), None
    if suffix in _TORCH_SUFFIXES:
        raise HwgenError(
            f"model {spec}: a PyTorch {suffix} file needs the Python API with its module class "
            "(hwgen.frontend.torch_import: load_state_dict_file, then from_module), "
            "or export it to ONNX with torch.onnx.export(..., dynamo=False)"
        )
    if isinstance(spec, str) and spec in EXAMPLES:
        return load_example(spec, train)
    names = ", ".join(sorted(EXAMPLES))
    if path.exists():
        raise HwgenError(
            f"model {spec}: unsupported file type {suffix or '(none)'!r}; "
            f"expected an .onnx file or a built-in example ({names})"
        )
    raise HwgenError(f"model {spec!s}: no such file, and not a built-in example ({names})")


def _is_quantized_onnx(path: Path) -> bool:
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return False
    from hwgen.frontend.onnx_import import _load
    from hwgen.frontend.qonnx_import import is_quantized

    return is_quantized(_load(path))


def load_quantized(spec: str | Path) -> Network | None:
    """The integer network of an ONNX file quantized with QONNX ``Quant``/``BipolarQuant`` or
    QCDQ ``QuantizeLinear``/``DequantizeLinear`` nodes; None for any other model or name."""
    path = Path(spec)
    if not _is_quantized_onnx(path):
        return None
    from hwgen.frontend.qonnx_import import from_qonnx

    return from_qonnx(path).net
