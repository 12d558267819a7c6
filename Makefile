# Quick start: `make demo` (train the tiny model on synthetic data, then chat with it) and
# `make test` (the test suite). Both set up what they need: a local virtual environment in
# .venv, the package in editable mode, and system packages (ffmpeg) through apt-get.
# The trained tiny model is a file target: a second `make demo` (or `make serve`) serves it at
# once; `make train-tiny` retrains it. The figures of a run depend on the seeds in the recipes and
# on the number of CPU threads (TINY_THREADS, 1 by default: the same numbers on every machine).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dev,demo,deepspeed,quant,serve,tracking
DATA := data/synthetic
OUT := output/tiny_synthetic
STAGE1 := $(OUT)/checkpoint_3.pth
STAGE2 := output/tiny_synthetic_chat/checkpoint_0.pth
TINY_THREADS ?= 1
TRAIN := OMP_NUM_THREADS=$(TINY_THREADS) $(PY) train.py --cfg-path
APT := apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3

.PHONY: setup sysdeps test test-fast demo serve data train-tiny eval-tiny tiny-asset bench clean

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
		$(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq ffmpeg chromium default-jre-headless >/dev/null; \
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

# Stage 1 (captions; writes eval_results.json on held-out clips), then stage 2 (conversations
# about clips and stills; then the per-question-type accuracy on held-out files).
$(STAGE1): train_configs/tiny_synthetic.yaml | $(DATA)/manifest.json
	$(TRAIN) train_configs/tiny_synthetic.yaml

$(STAGE2): $(STAGE1) train_configs/tiny_synthetic_chat.yaml
	$(TRAIN) train_configs/tiny_synthetic_chat.yaml
	$(MAKE) eval-tiny

eval-tiny: | $(STAMP)
	OMP_NUM_THREADS=$(TINY_THREADS) $(PY) -m videollm.tiny_chat_eval --cfg-path eval_configs/tiny.yaml --data $(DATA) --out output/tiny_chat_eval.json

train-tiny: | $(DATA)/manifest.json
	rm -f $(STAGE1) $(STAGE2)
	$(MAKE) $(STAGE2)

# The trained tiny model that tests/test_browser.py chats with: the stage-2 checkpoint of this
# recipe, copied (refresh it after changing the recipes: `make train-tiny tiny-asset`).
tiny-asset: $(STAGE2)
	cp $(STAGE2) tests/assets/tiny_chat_model.pth

demo: $(STAGE2)
	$(PY) demo.py --cfg-path eval_configs/tiny.yaml

serve: | $(STAMP)
	@test -f $(STAGE2) || { echo "no trained tiny model ($(STAGE2)): run 'make demo' (trains, then serves)"; exit 1; }
	$(PY) demo.py --cfg-path eval_configs/tiny.yaml

bench: $(STAMP)
	$(PY) bench/video_loading.py

clean:
	rm -rf $(VENV) output data .pytest_cache
