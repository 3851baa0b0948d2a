# Everything builds from nothing into .venv; every target is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test test-slow demo bench bench-bus bench-runner bench-faults clean

venv: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU wheel; an unpinned torch pulls a
# multi-GB CUDA build. recbole is installed without dependencies: we only read
# the ML-100k files its wheel ships.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-deps recbole==1.2.1
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

demo: venv
	$(VENV)/bin/duet run scenarios/quickstart.yaml

bench: venv
	$(PY) bench/bench_model.py

bench-bus: venv
	$(PY) bench/bench_bus.py

bench-runner: venv
	$(PY) bench/bench_runner.py

bench-faults: venv
	$(PY) bench/bench_faults.py

clean:
	rm -rf $(VENV) .pytest_cache runs
