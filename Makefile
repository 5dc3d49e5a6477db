# `make book` builds the book (the main job); `make test` runs ruff and the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= auto

.PHONY: book test lint test-gpu lab demo bench-kernels clean

$(STAMP): requirements.txt pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	    echo "GPU torch found: keeping it (venv with system site-packages)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@# CPU-only machines: take the CPU build of torch, never the multi-GB CUDA wheels.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@# the package, editable (minivllm and kernels importable from anywhere, the `minivllm` command), and its extras
	$(PY) -m pip install -q -r requirements.txt
	@# papermill's kernel: a python3 kernelspec inside the venv that runs the venv's python
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (minivllm .venv)" >/dev/null
	@touch $(STAMP)

test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

# PROFILE=auto: the smoke profile into _build/smoke on a CPU machine; on a GPU box the full
# profile, published to book/NN_*.ipynb, and the published edition's HTML in _build/html.
book: $(STAMP)
	$(PY) book/build.py --profile $(PROFILE)

# The chapters in JupyterLab, on the project's .venv and its "Python 3 (minivllm .venv)" kernel. The
# kernel imports minivllm and kernels from this checkout (PYTHONPATH). Clear outputs before committing a
# chapter: notebooks/ holds sources only (make test checks).
LAB_PORT ?= 8888
lab: $(STAMP)
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
	  $(VENV)/bin/jupyter lab --notebook-dir=$(CURDIR) --port=$(LAB_PORT) notebooks/01_architecture.ipynb

clean:
	rm -rf _build
