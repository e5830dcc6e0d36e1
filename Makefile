# Two entry points: `make repro` (set up + run the whole pipeline) and `make test` (set up + tests).
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DVC_NO_ANALYTICS := 1
# Python caches the bytecode of what it imports (its default): where the environment says not to, every
# stage and test process would compile torch, open_clip and dvc anew, seconds each.
unexport PYTHONDONTWRITEBYTECODE
# OpenMP keeps its default wait policy: `dvc repro` and the tests run one torch process at a time, and
# threads that spin a moment before sleeping are ~20% faster on the tiny models than sleeping ones. Tests
# that run processes side by side (DDP ranks, concurrent CLI calls) set OMP_WAIT_POLICY=PASSIVE for them.

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
