# vitask — `make demo` and `make test` work on a fresh machine by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# Extras to install; CI adds deepspeed so the DeepSpeed presets are tested: make install EXTRAS=dev,deepspeed
EXTRAS ?= dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# The tests' tiny batches: one thread per process beats two threads fighting over two cores (about 10x here).
# The pipeline's batches are big enough for every core (measured on 2 cores: a 40-step stage-2 fit, start-up
# included, 21 s with two threads, 31 s with one), so demo, method and bench leave torch its default of one thread per core.
TEST_THREADS ?= 1
# glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh mmap and
# unmaps it on free, and gives the heap's free top back to the kernel once it exceeds the trim threshold (128 KiB
# once the mmap threshold is set), so on a CPU each step page-faults its large activations and logits afresh.
# Both thresholds raised, freed memory stays in the heap and is reused: on the proportional bench preset (2 cores)
# the full-logits step ran 625-879 ms -> 483-489 ms and the fused stage-2 step mapped 0 instead of up to 35k fresh
# pages (README, "Benchmark"). No effect off glibc or on CUDA memory.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295

.PHONY: help install test test-fast demo method style bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever pyproject.toml changes; a no-op otherwise.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first: the one pair that installs together here (see README, "Installation").
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)  ## create .venv (if missing) and install vitask with dev tools

test: install style  ## style checks, then the test suite offline (slow tests included)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q

test-fast: install  ## the tests not marked slow
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -m "not slow"

demo: install  ## the method offline (synthetic data, tiny generalist VLM), one seed; writes runs/demo/report.md
	$(VENV)/bin/vitask pipeline --config configs/pipeline/method.yaml --config configs/pipeline/demo.yaml
	@echo "report: runs/demo/report.md (results.json and plots in runs/demo/)"

style: install  ## ruff format --check and ruff check (make test runs it first)
	$(VENV)/bin/ruff format --check vitask_pl tests scripts
	$(VENV)/bin/ruff check vitask_pl tests scripts

clean:  ## remove runs and synthetic data (keeps .venv)
	rm -rf runs data

method: install  ## the method benchmark: every row, 3 seeds, probe ceilings (43 min on 2 cores, two stages at a time)
	$(VENV)/bin/vitask pipeline --config configs/pipeline/method.yaml --seeds 3
	@echo "report: runs/method/report.md"

bench: install  ## step-time / memory ratios of the training and evaluation variants (tiny model)
	$(VENV)/bin/vitask bench
