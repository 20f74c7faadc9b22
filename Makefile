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

# Debian packages some tests need (each skips, naming it, without it): espeak-ng synthesises the speech demo
# data; chromium renders the served /docs page as a browser would. Installed only when missing, and only as
# root: never a sudo prompt.
SYSTEM_PACKAGES := espeak-ng chromium

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  if command -v $$p >/dev/null; then echo "$$p: found at $$(command -v $$p)"; else missing="$$missing $$p"; fi; \
	done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "note:$$missing not installed, and installing needs root (not asked for here)."; \
	  echo "      The tests that need them will be skipped. To add them: sudo apt-get install$$missing"; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "note:$$missing not installed and there is no apt-get here: install them with your system's"; \
	  echo "      package manager (the tests that need them skip without them)."; \
	else \
	  echo "missing:$$missing; installing with apt-get"; \
	  { apt-get update -qq && apt-get install -y -qq $$missing; } \
	    || echo "warning: apt-get could not install$$missing; the tests that need them will be skipped"; \
	fi

quickstart: setup
	$(PY) jobs/quickstart.py

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/bench_train_throughput.py
