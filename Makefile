# Every target creates and reuses the project virtualenv; nothing else needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench mutation venv clean image

venv: $(STAMP)

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/histokt demo

# lint and types first (seconds), then the suite with its 15 slowest tests listed
test: lint
	$(PY) -m pytest -q -rs --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check histokt tests benchmarks
	$(VENV)/bin/ruff format --check histokt tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/standardize.py
	$(PY) benchmarks/reader.py
	$(PY) benchmarks/store_size.py
	$(PY) benchmarks/verify.py
	$(PY) benchmarks/stage.py

# slow, outside CI: mutants of the modules that hold the README's guarantees (pyproject.toml [tool.mutmut])
mutation: $(STAMP)
	$(VENV)/bin/mutmut run
	$(PY) benchmarks/mutation.py

# histokt.sif here, from the local Debian base and a wheelhouse, cached in ~/.cache/histokt (containers/build.sh)
image:
	bash containers/build.sh histokt.sif

clean:
	rm -rf $(VENV) build *.egg-info mutants
