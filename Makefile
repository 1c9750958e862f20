# The two commands of the README are the contract: `make demo` and `make test`.
# Each creates .venv if missing and installs the project with the extras it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --quiet

.PHONY: test demo bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip

# One stamp per extras set, redone when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[$(subst +,$(comma),$*)]"
	@touch $@

comma := ,

test: $(VENV)/.stamp-all+dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.stamp-all
	$(BIN)/edgefleet demo $(DEMO_ARGS)

bench: $(VENV)/.stamp-all+dev
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.stamp-all+dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
