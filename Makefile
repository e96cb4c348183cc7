# Quick start: `make run` (the tiny R1 pipeline on CPU) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch first: the CPU build when torch is absent (pyproject keeps torch>=2.6 unpinned for real users).
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/r1moe pipeline recipes/tiny/r1.yaml

test: $(STAMP)
	$(VPY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
