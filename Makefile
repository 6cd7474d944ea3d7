# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0; an unpinned torch may pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test bench clean

# The scans in C are built by the install (an editable install does not rebuild them by itself).
$(VENV)/.installed: pyproject.toml runtime/calibrate/native/scan.c runtime/calibrate/native/scan_body.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,data,hf,report]" "$(TORCH)"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ternqc demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) ternqc-out build *.egg-info
