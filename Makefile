# The two commands of the README are the contract: `make demo` and `make test`.
# Each creates .venv if missing and installs the project with the extras it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --quiet

.PHONY: test demo bench lint typecheck clean
# The folders that install as edgefleet.<name> (pyproject's package-dir).
SUBPACKAGES := protocol infra agent coordinator models simulations federated console

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip

# One stamp per extras set, redone when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[$(subst +,$(comma),$*)]"
	@touch $@

comma := ,

# The suite over the machine's cores (at most 4), one test file per worker so module fixtures
# (brokers, trained models, PostgreSQL databases) are made once; PYTEST_ARGS=-n0 runs it serially.
PYTEST_ARGS ?= --numprocesses=auto --maxprocesses=4 --dist loadfile

test: $(VENV)/.stamp-all+dev
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# mypy cannot follow the editable install's import hook: check a view of the namespace made of
# symlinks (edgefleet/*.py plus edgefleet/<sub> -> <sub>/), from inside it.
typecheck: $(VENV)/.stamp-all+dev
	@rm -rf build/typecheck && mkdir -p build/typecheck/edgefleet
	@for f in edgefleet/*.py; do ln -s ../../../$$f build/typecheck/edgefleet/; done
	@for p in $(SUBPACKAGES); do ln -s ../../../$$p build/typecheck/edgefleet/$$p; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml

# DEMO_ARGS: e.g. --fl (then federated rounds on the agents, released and served), --agents N
demo: $(VENV)/.stamp-all
	$(BIN)/edgefleet demo $(DEMO_ARGS)

bench: $(VENV)/.stamp-all+dev
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.stamp-all+dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
