"""One module per command of the ``mmfree-fpga`` CLI."""
