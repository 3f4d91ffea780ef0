# `make demo` and `make test` each do all set-up (a venv at .venv, the install) first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -e ".[test]"  # skip byte-compiling ~6 GB of wheels; imports compile what they use
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/omnistream demo

test: install
	$(VENV)/bin/pytest -q tests

# unit tests only: no Ray, no subprocess (tests/unit); under 3 minutes on 2 cores
test-fast: install
	$(VENV)/bin/pytest -q tests/unit

bench: install
	$(PY) benchmarks/bench.py

clean:
	rm -rf runs mlflow.db bench.json .pytest_cache
