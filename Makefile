# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
PIPFLAGS = -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test install dev bench torchvision-test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIPFLAGS) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install $(PIPFLAGS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

demo: $(VENV)/.dev-installed
	$(PY) examples/demo.py

# pytest-xdist: one worker per core (the tests that share a module-scoped run are grouped
# onto one worker); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= auto
test: $(VENV)/.dev-installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: $(VENV)/.dev-installed
	$(PIP) install $(PIPFLAGS) -e ".[bench]"
	$(PY) benchmarks/compile_time.py
	$(PY) benchmarks/step_time.py

# torchvision (and timm, which needs it) want a different torch (2.14.1, a 5.5 GB build on
# this machine): own venv. The whole suite runs there, so it also checks the newer torch
# (2.14 changed Function.apply and checkpoint's entry points under fxfreeze's watches).
torchvision-test:
	$(PYTHON) -m venv .venv-tv
	.venv-tv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	.venv-tv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" timm
	.venv-tv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV) .venv-tv .pytest_cache build *.egg-info
