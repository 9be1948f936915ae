# Two commands a newcomer needs: `make demo` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first so the project's `torch>=...` range is already satisfied.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO   ?= demo
DEMO_CLASSES ?= 10
DEMO_TRAIN_PER_CLASS ?= 100
DEMO_VAL_PER_CLASS ?= 20

.PHONY: install demo test lint simd clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Optional: Pillow-SIMD, the drop-in faster Pillow for the CPU paths (`pytorch` backend, converter re-encodes).
# Source-only on PyPI, so it needs the JPEG and zlib headers. The code works the same on plain Pillow.
simd: install
	apt-get install -y -q libjpeg62-turbo-dev zlib1g-dev
	$(BIN)/pip uninstall -y -q pillow
	CC="cc -mavx2" $(BIN)/pip install -q --no-deps --no-build-isolation pillow-simd
	$(BIN)/python -c "import PIL; print('Pillow', PIL.__version__)"

# Synthetic ImageNet-shaped data -> shards -> a short training run -> the profiler's table.
# DALI on the GPU when there is one, DALI on the CPU otherwise.
demo: install
	rm -rf $(DEMO)
	$(BIN)/saturate synth $(DEMO)/imagenet --classes $(DEMO_CLASSES) --train-per-class $(DEMO_TRAIN_PER_CLASS) \
		--val-per-class $(DEMO_VAL_PER_CLASS) --quirks --seed 0
	$(BIN)/saturate shards convert $(DEMO)/imagenet/train $(DEMO)/shards --split train \
		--names $(DEMO)/imagenet/LOC_synset_mapping.txt --shard-size 64MB
	$(BIN)/saturate shards convert $(DEMO)/imagenet/val $(DEMO)/shards --split val \
		--names $(DEMO)/imagenet/LOC_synset_mapping.txt --shard-size 64MB
	$(BIN)/saturate shards verify $(DEMO)/shards
	$(BIN)/saturate train --config configs/demo.yaml --data $(DEMO)/shards --run-dir $(DEMO)/run
	$(BIN)/saturate profile $(DEMO)/shards --config configs/demo-profile.yaml --out $(DEMO)/profile

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
