"""hwgen: quantized CNNs to verified shift-and-add FPGA hardware."""

__version__ = "0.1.0"
