# Everything runs inside .venv, created on first use from this project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# -c pins torch to the CPU wheel on local disk (an unpinned torch pulls a CUDA build).
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test,plot]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/whiteboard demo --out demo-out

bench: $(STAMP)
	$(BIN)/python benchmarks/recurrent_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
