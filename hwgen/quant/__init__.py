"""Quantizers: dynamic fixed point, INQ powers of two (ternary, binary), exact-grid detection."""

from hwgen.quant.quantize import QuantResult, quantize

__all__ = ["QuantResult", "quantize"]
