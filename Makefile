# `make book` builds the book (the main job); `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= auto

.PHONY: book test test-gpu demo bench-kernels clean

$(STAMP): requirements.txt
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	    echo "GPU torch found: keeping it (venv with system site-packages)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@# CPU-only machines: take the CPU build of torch, never the multi-GB CUDA wheels.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

book: $(STAMP)
	@# Until the chapters land: a generation demo on the embedded default model.
	$(PY) -m minivllm.make_checkpoint --preset qwen3-tiny --out checkpoints/qwen3-tiny
	$(PY) -m minivllm generate --model checkpoints/qwen3-tiny --prompt "The KV cache" --max-tokens 16

clean:
	rm -rf _build
