# One command each: `make demo` sets up and runs the example sweep; `make test` sets up and runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/digits.yaml
# where the demo exports the best trial: out/ + the config's stem, as `hailo-sweep run`'s closing hint says
EXPORT := out/$(basename $(notdir $(CONFIG)))

.PHONY: demo test install data ui clean

# setuptools warns about every editable install; the warning is about folders named like the package, not ours
QUIET_BUILD := PYTHONWARNINGS="ignore:Editable installation"

$(BIN)/python:
	@echo "==> creating the virtual environment $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "==> installing hailo-sweep (editable) and its dependencies into $(VENV): MLflow with its UI, Optuna,"
	@echo "    ONNX Runtime, onnx, NumPy, scikit-learn, matplotlib, and the test tools (about 1 GB;"
	@echo "    3-10 minutes the first time, seconds when pip's cache has them)"
	@start=$$(date +%s); $(QUIET_BUILD) $(BIN)/python -m pip install -q -e '.[test]' && \
		echo "    installed in $$(( $$(date +%s) - start )) s"
	@touch $@

install: $(VENV)/.installed

data: install
	@echo "==> building the example data in sweeps/data/digits (scikit-learn's digits on 96x128 frames; seconds)"
	@$(BIN)/python -m hailo_sweep.examples.digits sweeps/data/digits

demo: data
	@echo "==> running the example sweep $(CONFIG): 30 trials on the embedded onnxruntime backend (1-3 minutes)"
	$(BIN)/hailo-sweep run $(CONFIG)
	@echo "==> exporting the best trial to $(EXPORT)/"
	$(BIN)/hailo-sweep best $(CONFIG) --export $(EXPORT)
	@echo
	@echo "Next, copy and paste (or first '. $(BIN)/activate' and drop the $(BIN)/ prefix):"
	@echo "  $(BIN)/hailo-sweep ui $(CONFIG)                  # the MLflow UI: trial runs sorted by the objective"
	@echo "  $(BIN)/hailo-sweep diagnose $(CONFIG) --trial $$($(BIN)/python -c 'import json; print(json.load(open("$(EXPORT)/manifest.json"))["trial"])')  # where the exported trial's error comes from"
	@echo "  $(BIN)/hailo-sweep verify $(EXPORT)                       # rebuild the exported model and compare"

ui: install
	$(BIN)/hailo-sweep ui $(CONFIG)

# the distributed tests use a private PostgreSQL cluster and an MLflow server, started and stopped around pytest
test: install
	VENV_PY=$(BIN)/python bash .ci/services.sh $(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf sweeps mlruns out
