# The two commands of the README: `make run` and `make test`. Each does its own set-up.
PYTHON ?= python3
CONFIG ?= config/netswapd.toml

.PHONY: run test deps install-python bench clean

# Run the daemon on the embedded default config (needs root for /var/lib and /run).
run: install-python
	$(PYTHON) -m netswap --config $(CONFIG)

# The whole test suite, real clients included; installs what it needs first.
test: deps
	$(PYTHON) -m pytest -q tests

deps:
	PYTHON=$(PYTHON) .ci/install-deps

install-python:
	$(PYTHON) -m pip install -q -e .

bench: deps
	$(PYTHON) bench/fio_matrix.py

clean:
	rm -rf build *.egg-info daemon/*.egg-info daemon/netswap/_pool*.so daemon/netswap/_pool.c
