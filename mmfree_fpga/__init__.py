"""mmfree-fpga: the MatMul-free language model (HGRN-bit) on FPGAs."""

__version__ = "0.1.0"
