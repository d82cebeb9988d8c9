# One command each: `make demo`, `make test`.  Each sets up .venv first.
# torch is pinned here (not in pyproject, which says torch>=2.4 so GPU users
# keep their CUDA build): 2.13.0 is the CPU build this project's machines
# install from local disk; any other spec can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.zero_sf-core
STAMP  := $(VENV)/.zero_sf-installed

.PHONY: setup lint test test-all demo bench mutants fuzz compile-all check gpu-report dist-check clean

# What the demo needs: torch and zero_sf alone (about 1 minute; no Triton,
# DeepSpeed or transformers, which are 2.3 GB the CPU demo never imports).
$(CORE): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $(CORE)

# Everything the tests, benchmarks and lint use.
$(STAMP): $(CORE)
	$(PY) -m pip install -q -e ".[test,bench,deepspeed,integrations,lint]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

# ruff (pyflakes, pycodestyle, bugbear, import order) and mypy
# (check_untyped_defs) on zero_sf/; pyflakes and bugbear on the rest.  The
# rules live in pyproject.toml; CONTRIBUTING.md says why.
lint: $(STAMP)
	$(PY) -m ruff check zero_sf
	$(PY) -m ruff check --select F,B tests tools benchmarks launch
	$(PY) -m mypy

# The default run plus the tests marked slow (more world sizes or sizes of
# the same checks: sharded triton at 2 ranks, ZeRO at 4, checkpoints 4->2 and
# 2->1, ZeRO-3 2->2 and 2->1, the 200,003-element kernels, the demo's job).
test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m ""

# The main job: 2 CPU ranks (gloo) train a small GPT with ZeRO-2 Schedule-Free
# AdamW and save a sharded checkpoint; then 1 rank resumes it and continues.
demo: $(CORE)
	rm -rf runs/demo
	$(VENV)/bin/torchrun --nproc_per_node=2 launch/train.py --steps 300 --save runs/demo
	$(VENV)/bin/torchrun --nproc_per_node=1 launch/train.py --steps 340 --batch 32 --eval-every 40 --resume runs/demo

# Benchmarks (minutes on 2 CPU cores; on a GPU machine they time the kernels too).
bench: $(STAMP)
	$(PY) benchmarks/step_throughput.py
	$(PY) benchmarks/memory_scaling.py
	$(PY) benchmarks/fsdp_step.py
	$(PY) benchmarks/convergence.py

# The scenario generator (tests/scenarios) on random seeds for 30 minutes;
# every failure prints its seed and reproducer.  MINUTES=N for another budget.
MINUTES ?= 30
fuzz: $(STAMP)
	$(PY) -m tests.scenarios --minutes $(MINUTES) --json fuzz-results.json

# The sdist holds every tracked file, and the wheel installed into a fresh
# venv takes a fused CPU step (tools/dist_check.sh; ~2 minutes, not in CI).
dist-check: $(STAMP)
	$(PY) -m pip install -q build
	PY=$(PY) TORCH="$(TORCH)" bash tools/dist_check.sh

# Curated mutation testing (tools/mutants.py): each realistic bug must make
# its tests fail.  ~20 minutes on 2 cores; run before resolving an issue that
# touches spec.py, the kernels, sharding/ or the checkpoints.
mutants: $(STAMP)
	$(PY) tools/mutants.py

# Every kernel specialization the optimizers launch (620), compiled for sm_80
# and sm_90 down to cubin without a GPU (the default test run compiles a
# covering subset); ~10 minutes on 2 cores with an empty Triton cache.
compile-all: $(STAMP)
	env -u TRITON_INTERPRET $(PY) tools/aot.py --all

# The self-check a user runs on a new (GPU) machine: versions, kernels vs the
# spec, a ZeroOptimizer step, bandwidth.  On CPU it runs what it can.
check: $(STAMP)
	$(PY) -m zero_sf.check

# On a machine with a GPU (torch, Triton and pytest installed; no registry or
# DeepSpeed needed): the kernel tests compiled on the GPU, the self-check and
# the step benchmark, one JSON under benchmarks/results/ (tools/gpu_report.py;
# under 5 minutes).  Uses the machine's python, not .venv.
GPU_PYTHON ?= python3
gpu-report:
	$(GPU_PYTHON) tools/gpu_report.py

clean:
	rm -rf $(VENV) .pytest_cache
