# Two commands a user needs: `make demo` and `make test`. Both install on first use.
PYTHON311 ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# TFF's C++ worker must never outlive a command (it holds stdout open and CI hangs on it).
PYTEST := $(PY) -m pytest

.PHONY: install test test-e2e test-slow test-all demo audit bench bench-full lock clean

install: $(STAMP)

$(STAMP): requirements/lock.txt setup.py tff_medical/runtime/loopback_bind.c
	@command -v $(PYTHON311) >/dev/null 2>&1 || { \
	  echo "ERROR: Python 3.11 is required (TensorFlow Federated 0.87 supports 3.9-3.11) and '$(PYTHON311)' was not found."; \
	  echo "Install Python 3.11, or point PYTHON311 at it: make install PYTHON311=/path/to/python3.11"; \
	  exit 1; }
	@$(PYTHON311) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "ERROR: '$(PYTHON311)' is not Python 3.11 (TensorFlow Federated 0.87 needs 3.9-3.11)."; exit 1; }
	test -x $(PY) || $(PYTHON311) -m venv $(VENV)
	# --no-deps: the lock is complete, and TFF's jaxlib==0.4.14 pin would otherwise fail.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	# shutdown(): TFF's import-time default context otherwise prints a traceback at exit.
	$(PY) -c 'import tensorflow_federated, tff_medical.runtime as r; r.worker.loopback_shim_path(); r.shutdown()'
	touch $(STAMP)

# Unit and integration tests, a test file per process on TEST_WORKERS processes (each ends its
# own TFF worker); test-e2e is the end-to-end tier, one process (entry-point subprocesses, kill -9
# and resume, SuperLink processes, Chromium, the accuracy run). Both show their slowest tests.
TEST_WORKERS ?= 2
test: install
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not slow" --durations=15 tests

test-e2e: install
	$(PYTEST) -m slow --durations=15 tests

test-slow: test-e2e

test-all: install
	$(PYTEST) tests

# The main job: DP training on the embedded data. Rerunning resumes (or reports the finished run).
demo: install
	$(PY) experiments/train.py --config=configs/demo.py --root_output_dir=runs --experiment_name=demo

# The empirical privacy audit of the demo (docs/PRIVACY_AUDIT.md, rewritten with machine, date and
# command): the demo's training with canary clients per category; fails if a category's empirical
# epsilon exceeds its claim. A new run directory each time (an audit run is never deployable).
audit: install
	$(PY) experiments/audit.py --config=configs/demo.py --root_output_dir=runs \
	  --experiment_name=demo_audit_$$(date -u +%Y%m%d_%H%M%S) --doc=docs/PRIVACY_AUDIT.md

# Rewrite docs/BENCHMARKS.md, docs/benchmarks.json and the two SVG plots (use an otherwise idle
# machine). Quick by default: a few minutes, CI-sized; bench-full (or BENCH_MODE=full) is the
# study: scaling up to 59,000 clients and the privacy-utility grid, about 17 min on 2 cores.
BENCH_MODE ?= quick
bench: install
	$(PY) experiments/bench.py --mode=$(BENCH_MODE)

bench-full: install
	$(PY) experiments/bench.py --mode=full

# Re-resolve the pinned set from requirements/requirements.in (needs network).
lock:
	rm -rf /tmp/tff_medical_lock && $(PYTHON311) -m venv /tmp/tff_medical_lock
	/tmp/tff_medical_lock/bin/pip install --quiet -r requirements/requirements.in setuptools==75.8.0 wheel==0.45.1
	/tmp/tff_medical_lock/bin/pip install --quiet --no-deps tensorflow-federated==0.87.0
	{ head -n 2 requirements/lock.txt; /tmp/tff_medical_lock/bin/pip freeze --all | grep -v -E "^(tensorflow.federated|pip)=="; echo tensorflow-federated==0.87.0; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt

clean:
	rm -rf $(VENV) build *.egg-info tff_medical/runtime/_loopback_bind*.so
