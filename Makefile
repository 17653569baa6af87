# Everything a fresh machine needs: `make demo` runs the demo, `make test` the tests.
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the builds that ship with this machine image (CPU use; CUDA works too).
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,plot,onnx]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/digits_demo.py

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
