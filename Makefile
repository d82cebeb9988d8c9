# One command each: `make demo`, `make test`.  Each sets up .venv first.
# torch is pinned here (not in pyproject, which says torch>=2.4 so GPU users
# keep their CUDA build): 2.13.0 is the CPU build this project's machines
# install from local disk; any other spec can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zero_sf-installed

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,deepspeed]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

demo: $(STAMP)
	$(PY) launch/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
