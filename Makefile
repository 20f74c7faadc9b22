# The two commands a newcomer needs:  make quickstart   and   make test
# Both create the virtual environment on first use (about 4 minutes, 8 GB: torch CUDA wheels + Ray)
# and reuse it afterwards; it is rebuilt when pyproject.toml or constraints.txt changes.
# This is the reproducible path: every package at the exact version in constraints.txt. To install into
# an environment you already have, use pip with the ranges of pyproject.toml instead (README, "Install").

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ptm_ray-installed
EXTRAS ?= dev,demo,report,tracking
export HF_HUB_OFFLINE := 1

.PHONY: setup system-packages quickstart test bench

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-packages
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# espeak-ng (a Debian package) synthesises the speech demo data; the tests that need it skip without it.
# Installed only when missing, and only as root: never a sudo prompt.
system-packages:
	@if command -v espeak-ng >/dev/null; then \
	  echo "espeak-ng: found at $$(command -v espeak-ng)"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "note: espeak-ng is not installed, and installing it needs root (not asked for here)."; \
	  echo "      It synthesises the speech demo data; the tests that need it will be skipped."; \
	  echo "      To add it: sudo apt-get install espeak-ng   (or your system's package manager)"; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "note: espeak-ng is not installed and there is no apt-get here: install it with your system's"; \
	  echo "      package manager for the speech demo data (the tests that need it skip without it)."; \
	else \
	  echo "espeak-ng: missing, installing it with apt-get"; \
	  { apt-get update -qq && apt-get install -y -qq espeak-ng; } \
	    || echo "warning: apt-get could not install espeak-ng; the tests that need it will be skipped"; \
	fi

quickstart: setup
	$(PY) jobs/quickstart.py

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/bench_train_throughput.py
