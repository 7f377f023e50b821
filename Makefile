# Everything runs inside .venv, created on first use from this project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Headless Chromium for the browser tests (the inspect report's and the explorer's).
BROWSER := $(VENV)/.browser
# -c pins torch to the CPU wheel on local disk (an unpinned torch pulls a CUDA build).
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test demo bench clean

install: $(STAMP) $(BROWSER)

# Chromium comes from Debian where this runs as root with apt-get; elsewhere the browser
# tests skip with a note. Set-up belongs here, not in a test.
$(BROWSER): | $(STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
	    echo "note: Chromium could not be installed; the browser tests will be skipped"; \
	  else echo "note: no Chromium and no root apt-get to install it; the browser tests will be skipped"; fi; }
	touch $@

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test,plot,serve]'
	touch $(STAMP)

test: $(STAMP) $(BROWSER)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/whiteboard demo --out demo-out

bench: $(STAMP)
	$(BIN)/python benchmarks/recurrent_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
