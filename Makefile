# Two entry points: `make repro` (set up + run the whole pipeline) and `make test` (set up + tests).
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DVC_NO_ANALYTICS := 1
# OpenMP keeps its default wait policy here: `dvc repro` runs one stage at a time, and idle threads that
# spin are ~20% faster on the tiny models than sleeping ones. The tests, which run processes side by
# side, set OMP_WAIT_POLICY=PASSIVE themselves (tests/conftest.py).

.PHONY: repro test bench setup

setup:
	@scripts/setup.sh

repro: setup
	dvc repro

test:
	@scripts/setup.sh test
	python -m pytest -q

bench:
	@scripts/setup.sh test
	python benchmarks/bench_image_attacks.py
	python benchmarks/bench_text_attacks.py
	python benchmarks/bench_mmcoa_step.py
