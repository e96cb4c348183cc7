# Quick start: `make run` (the tiny R1 pipeline on CPU) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint clean sandbox-tool

$(VPY):
	$(PY) -m venv $(VENV)

# torch first: the CPU build when torch is absent (pyproject keeps torch>=2.6 unpinned for real users).
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/r1moe pipeline recipes/tiny/r1.yaml

# The code reward's sandbox (and its tests) need bubblewrap: installed here when missing and we may (root + apt).
sandbox-tool:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	  else echo "make: bubblewrap (bwrap) is missing: install it (Debian/Ubuntu: sudo apt-get install -y bubblewrap)" >&2; exit 2; fi; }

test: $(STAMP) sandbox-tool
	$(VPY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
