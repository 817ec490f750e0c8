# foxlab: `make demo` trains a tiny FoX and shows what it forgets; `make test` runs the whole suite.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
# A CPU build of torch installs in seconds; override for CUDA, e.g. make TORCH_SPEC="torch==2.13.0" ...
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest
# Notebooks run in their fast mode under the test suite.
export FOXLAB_FAST ?= 1

.PHONY: install browser-deps test test-unit test-interpret test-notebooks test-browser demo lab clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[notebooks,dev]"
	touch $@

test: browser-deps test-unit test-interpret test-notebooks test-browser

# Debian's chromium, for PNG export and the browser test (Playwright's own download does not work offline).
# Locally a machine without it only skips those tests; in CI it must be there.
browser-deps: $(STAMP)
	$(PY) tests/browser_setup.py || [ -z "$$CI" ]

test-unit: $(STAMP)
	$(PYTEST) tests -m "not interpret and not browser and not gpu"

# Triton kernels on the CPU: TRITON_INTERPRET must be set before triton is imported, hence its own process.
test-interpret: $(STAMP)
	TRITON_INTERPRET=1 $(PYTEST) tests -m interpret

test-notebooks: $(STAMP)
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		$(PYTEST) --nbval-lax --nbval-current-env -p no:randomly notebooks; \
	else echo "no notebooks yet"; fi

test-browser: $(STAMP)
	$(PYTEST) tests -m browser

demo: $(STAMP)
	$(PY) -m foxlab demo

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) runs .pytest_cache
