# Two commands for a fresh machine: `make bench` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
BENCH  ?= bench    # or one file (or part: BENCH="bench/test_bench_layer.py -k Gemma")
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.molf-installed

.PHONY: test bench clean

# Keep a torch that is already installed: .venv sees the system's packages, and when $(PYTHON) is itself
# a virtual environment holding torch (GPU images), a .pth file lends its site-packages to .venv.
# Without any torch, install the CPU build: torch==2.13.0 resolves to a local CPU wheel here, while a
# plain `torch` would pull a multi-GB CUDA build. --no-build-isolation: no download needed to build molf
# (a setuptools older than 71 builds the wheel with the `wheel` package, which offline GPU images carry).
# Offline (GPU machines: no index), a dev extra that is neither installed nor carried as a wheel makes the
# full install fail: molf alone is then installed (--no-deps) and the tests needing that extra skip.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	if ! $(PY) -c "import torch" 2>/dev/null && $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -c "import site; print('\n'.join(site.getsitepackages()))" \
	    > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_molf_host_site.pth"; fi
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import setuptools as s, sys; sys.exit(int(s.__version__.split('.')[0]) < 71)" 2>/dev/null \
	  || $(PY) -c "import wheel" 2>/dev/null || $(PY) -m pip install -q "setuptools>=71"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]" || { \
	  echo "molf: the dev extras could not be installed (offline?): installing molf alone; tests of a missing" \
	       "extra skip with its name"; $(PY) -m pip install -q --no-build-isolation --no-deps -e .; }
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q $(BENCH) -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-group-by=group

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
