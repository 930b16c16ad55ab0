# Two commands for a fresh machine: `make bench` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.molf-installed

.PHONY: test bench plots clean

# --system-site-packages: a GPU image's own torch (and triton) stay visible and are kept.
# Without any torch, install the CPU build: torch==2.13.0 resolves to a local CPU wheel here,
# while a plain `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q bench -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-group-by=group

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
