# `make demo` and `make test` each do all set-up (a venv at .venv, the install) first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
# Byte-code is written as modules are first imported (the install skips compiling): a machine that sets
# PYTHONDONTWRITEBYTECODE would otherwise compile torch, DeepSpeed, MLflow and Ray Train from source in
# every process Ray starts. Measured on 2 cores: `import deepspeed, ray.train, ray.data` 11.5 s of CPU
# from source, 4.4 s from byte-code; the placement test (now part of tests/system/test_scale.py) 118 s -> 65 s.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install chromium demo lint test test-scale test-fast test-browser bench clean

# The install goes through uv where pip can fetch it, else pip. Into a new venv on 2 cores: pip 99 s, uv 23 s
# with its cache empty and 9 s from it (measured 2026-12-08; the same versions resolved but pandas' patch release). uv reads none of
# pip's configuration, so UV_INSTALL hands it pip's own, as `pip config list` shows it (files and PIP_*
# variables alike): the index or none, extra indexes, find-links, constraints files, trusted hosts and CA
# bundle, with pip's rule of the best match across all indexes. Neither compiles byte-code: imports compile what they use (below).
define UV_INSTALL
import os, shlex, subprocess, sys
conf = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
args, env = ["--index-strategy", "unsafe-best-match"], dict(os.environ)
for line in conf.splitlines():
    key, _, value = line.partition("=")
    key, values = key.rpartition(".")[2], shlex.split(value)[0].split() if value else []
    if key in flags:
        args += [a for v in values for a in (flags[key], v)]
    elif key == "no-index" and values[:1] in (["1"], ["true"], ["yes"], ["on"]):
        args.append("--no-index")
    elif key == "cert" and values:
        env["SSL_CERT_FILE"] = values[0]
cmd = [sys.executable, "-m", "uv", "pip", "install", "-q", "--python", sys.executable, *args, *sys.argv[1:]]
sys.exit(subprocess.run(cmd, env=env).returncode)
endef

$(PY):
	python3 -m venv $(VENV)

# (the venv made first, an order-only prerequisite: make writes the script into it as it expands the recipe)
$(STAMP): pyproject.toml | $(PY)
	$(file >$(VENV)/uv-install.py,$(UV_INSTALL))
	$(PY) -m pip install -q uv && $(PY) $(VENV)/uv-install.py -e ".[test]" \
	  || { echo "installing with pip instead of uv"; $(PY) -m pip install -q --no-compile -e ".[test]"; }
	@# ...once, here, for what every training process imports: left to the suite, its first tens of processes
	@# (two test processes, a Ray's workers, four simulated nodes) start at once and each compiles the same
	@# modules from source before any has written their byte-code
	$(PY) -c "from omnistream.common.checkpoint import name_cpu_accelerator as n; n(); import torch._dynamo, deepspeed, ray.train.torch, ray.data, mlflow, pyarrow.parquet, omnistream.cluster.driver, omnistream.training.trainer"
	touch $(STAMP)

install: $(STAMP)

# The browser test (tests/browser) drives a Chromium of the system's: Playwright cannot download its own
# here. Debian's package, where apt-get can install it; else say what to do.
CHROMIUM_FOUND = $(or $(OMNISTREAM_CHROMIUM),$(shell command -v chromium chromium-browser google-chrome 2>/dev/null))
chromium:
ifeq ($(strip $(CHROMIUM_FOUND)),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "the browser test needs Chromium: install it (Debian: apt-get install chromium)," \
	       "or set OMNISTREAM_CHROMIUM=/path/to/chromium"; exit 1; \
	fi
endif

demo: install
	$(VENV)/bin/omnistream demo

# the house rules a tool checks (pyproject.toml [tool.ruff]): lint, then the formatting (`ruff format .` fixes it)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# two processes (pytest-xdist): a module's tests, and every test on the session's Ray, stay together
# (tests/conftest.py's scheduler); what one leaves idle the other uses. The scale rehearsal included.
test: install chromium lint
	$(VENV)/bin/pytest -q -n 2 tests

# the scale rehearsal alone (tests/system/test_scale.py: 8 ranks on 4 simulated Ray nodes, a node lost
# mid-run, 8 -> 3 -> 8 ranks, the placement run); about 4 minutes on 2 cores (see docs/scaling.md)
test-scale: install
	$(VENV)/bin/pytest -q tests/system/test_scale.py

# the MLflow UI in headless Chromium alone (make test runs it too); its screenshot lands in test-artifacts/
test-browser: install chromium
	$(VENV)/bin/pytest -q tests/browser

# unit tests only: no Ray, no subprocess (tests/unit), in two processes as `make test` runs them: 190 tests in
# 33 s on 2 cores (57 s in one process, measured 2026-12-07)
test-fast: install
	$(VENV)/bin/pytest -q -n 2 tests/unit

# bench.py's ratios; then what the trained demo model draws and dials, if `make demo` has trained one
bench: install
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/generation.py || echo "generation bench skipped: run make demo first"
	$(PY) benchmarks/scaling.py

clean:
	rm -rf runs mlflow.db bench.json .pytest_cache
