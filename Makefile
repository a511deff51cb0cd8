# One command each: `make demo` sets up and runs the example sweep; `make test` sets up and runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/digits.yaml

.PHONY: demo test install data ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

data: install
	$(BIN)/python -m hailo_sweep.examples.digits sweeps/data/digits

demo: data
	$(BIN)/hailo-sweep run $(CONFIG)
	$(BIN)/hailo-sweep best $(CONFIG) --export out/digits
	@echo
	@echo "Open the MLflow UI on these runs:  $(BIN)/hailo-sweep ui $(CONFIG)"

ui: install
	$(BIN)/hailo-sweep ui $(CONFIG)

# the distributed tests use a private PostgreSQL cluster and an MLflow server, started and stopped around pytest
test: install
	VENV_PY=$(BIN)/python bash .ci/services.sh $(BIN)/python -m pytest -q

clean:
	rm -rf sweeps mlruns out
