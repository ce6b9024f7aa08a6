# The two set-up commands of the README. Each creates/uses .venv and installs what it needs.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch (CPU build, for the checkpoint-converter tests) is installed only where it is available locally
	$(PIP) install -q -e ".[test,wsi,fast]"
	-$(PIP) install -q "torch==2.13.0" 2>/dev/null || echo "torch not installed: converter tests that need it will skip"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m dualunet_jax.train --config=configs/demo.py --workdir=workdirs/demo
	$(PYTHON) -m dualunet_jax.eval --config=configs/demo.py --workdir=workdirs/demo

test: $(STAMP)
	$(PYTHON) -m pytest -n 2 --dist loadfile -q tests

clean:
	rm -rf $(VENV) workdirs
