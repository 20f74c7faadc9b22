# The two commands a newcomer needs:  make quickstart   and   make test
# Both create the virtual environment on first use (about 4 minutes, 8 GB: torch CUDA wheels + Ray)
# and reuse it afterwards; it is rebuilt when pyproject.toml changes.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ptm_ray-installed
export HF_HUB_OFFLINE := 1

.PHONY: setup quickstart test bench

$(STAMP): pyproject.toml
	command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng; } \
	  || echo "warning: could not install espeak-ng (speech demo data); run: sudo apt-get install espeak-ng"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(PY) jobs/quickstart.py

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/bench_train_throughput.py
