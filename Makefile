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
# AVX2 build as Pillow-SIMD recommends (every x86-64 server of the last decade has it); SIMD_CC=cc for none.
SIMD_CC ?= cc -mavx2
simd: install
	apt-get update -q
	apt-get install -y -q libjpeg62-turbo-dev zlib1g-dev
	$(BIN)/pip uninstall -y -q pillow
	CC="$(SIMD_CC)" $(BIN)/pip install -q --no-deps --no-cache-dir pillow-simd
	$(BIN)/python -c "import PIL.features as f, PIL; print('Pillow', PIL.__version__, 'libjpeg-turbo', f.check_feature('libjpeg_turbo'))"

# Synthetic ImageNet-shaped data -> shards -> a short training run -> the profiler's table.
# DALI on the GPU (ResNet-50, bf16) when there is one; DALI on the CPU (ResNet-18, fp32, small crops) otherwise.
DEMO_TRAIN_GPU ?= --backend dali-gpu --arch resnet50 --precision bf16 --image-size 224 --batch-size 64 --num-threads 4
DEMO_TRAIN_CPU ?= --backend dali-cpu --arch resnet18 --precision fp32 --image-size 112 --batch-size 32 --num-threads 1
DEMO_PROFILE_GPU ?= --backends dali-gpu,dali-cpu,pytorch --arch resnet50 --precision bf16 --image-size 224 \
	--batch-size 128 --threads 4 --duration 10
DEMO_PROFILE_CPU ?= --backends dali-cpu,pytorch --arch resnet18 --precision fp32 --image-size 112 \
	--batch-size 32 --threads 1 --duration 6 --warmup 3 --windows 3

demo: install
	rm -rf $(DEMO)
	$(BIN)/saturate synth $(DEMO)/imagenet --classes $(DEMO_CLASSES) --train-per-class $(DEMO_TRAIN_PER_CLASS) \
		--val-per-class $(DEMO_VAL_PER_CLASS) --quirks --seed 0
	for split in train val; do \
		$(BIN)/saturate shards convert $(DEMO)/imagenet/$$split $(DEMO)/shards --split $$split \
			--names $(DEMO)/imagenet/LOC_synset_mapping.txt --shard-size 32MB || exit 1; \
	done
	$(BIN)/saturate shards verify $(DEMO)/shards --decode
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		train="$(DEMO_TRAIN_GPU)"; profile="$(DEMO_PROFILE_GPU)"; \
	else \
		echo "No CUDA GPU: training and profiling with DALI on the CPU"; \
		train="$(DEMO_TRAIN_CPU)"; profile="$(DEMO_PROFILE_CPU)"; \
	fi; \
	$(BIN)/saturate train --data $(DEMO)/shards --run-dir $(DEMO)/run --epochs 4 --warmup-epochs 1 \
		--base-lr 0.4 --log-every 10 $$train && \
	$(BIN)/saturate profile $(DEMO)/shards --out $(DEMO)/profile $$profile

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
