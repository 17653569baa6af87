# Everything a fresh machine needs: `make demo` runs the demo, `make test` the tests.
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the builds that ship with this machine image (CPU use; CUDA works too).
TORCH  := torch==2.14.1 torchvision==0.29.1

# Debian's Fashion-MNIST package (the real-data tests read its files; with CI=true they fail without them).
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_PKG := dataset-fashion-mnist

.PHONY: demo test lint install data clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,plot,onnx,transformers]"
	touch $@

install: $(VENV)/.installed data

# Installs the package as root where apt-get exists; elsewhere (non-root, no apt) only a note, never a failure.
data:
	@if [ -d $(FASHION_MNIST_DIR) ]; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(FASHION_MNIST_PKG) (apt-get)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FASHION_MNIST_PKG); } || \
			echo "note: apt-get install $(FASHION_MNIST_PKG) failed; the Fashion-MNIST tests skip (fail with CI=true)"; \
	else \
		echo "note: $(FASHION_MNIST_DIR) is missing and apt-get cannot be run here (needs root and apt):" \
			"run 'sudo apt-get install $(FASHION_MNIST_PKG)'; the Fashion-MNIST tests skip (fail with CI=true)"; \
	fi

demo: install
	$(PY) examples/digits_demo.py

# Lint (ruff, imports sorted) and type-check (mypy) the package, then the tests: any failure fails CI.
lint: install
	$(PY) -m ruff check lightning_prune
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
