# Quick start: `make demo` (train the tiny model on synthetic data, then chat with it) and
# `make test` (the test suite). Both set up what they need: a local virtual environment in
# .venv, the package in editable mode, and system packages (ffmpeg) through apt-get.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dev,demo,deepspeed,quant,serve,tracking
DATA := data/synthetic
OUT := output/tiny_synthetic

.PHONY: setup sysdeps test test-fast demo data train-tiny bench clean

$(STAMP): pyproject.toml
	@(command -v ffmpeg && command -v chromium && command -v java) >/dev/null 2>&1 || $(MAKE) sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13 first (a local wheel here); GPU users install their own torch.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# lmms-eval without its declared dependencies (torchvision, timm); the dev extra has what it imports
	$(PY) -m pip install -q --no-deps "lmms-eval==0.7.3"
	$(PY) -m pip install -q "torchcodec==0.13.0" || echo "torchcodec unavailable: the decord and PyAV backends remain"
	touch $(STAMP)

setup: $(STAMP)

sysdeps:
	@if [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg chromium default-jre-headless >/dev/null; \
	else \
		echo "ffmpeg/chromium missing: install them with your package manager (apt-get install ffmpeg chromium default-jre-headless)"; \
	fi

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

$(DATA)/manifest.json: | $(STAMP)
	$(PY) -m videollm.synthetic --out $(DATA) --seed 0 --num-videos 480

data: $(DATA)/manifest.json

# Stage 1 (captions; writes eval_results.json on held-out clips), then stage 2 (questions).
train-tiny: data
	$(PY) train.py --cfg-path train_configs/tiny_synthetic.yaml
	$(PY) train.py --cfg-path train_configs/tiny_synthetic_chat.yaml

demo: train-tiny
	$(PY) demo.py --cfg-path eval_configs/tiny.yaml

bench: $(STAMP)
	$(PY) bench/video_loading.py

clean:
	rm -rf $(VENV) output data .pytest_cache
