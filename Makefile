# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
CHROMIUM := /usr/bin/chromium

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cirlab demo --out runs/demo

test: $(STAMP) | $(CHROMIUM)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# tests/test_web.py drives Debian's chromium (Playwright downloads no browser); it skips without one, fails under CI.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then root=; elif command -v sudo >/dev/null; then root=sudo; else root=none; fi; \
	{ [ "$$root" != none ] && $$root apt-get update && $$root apt-get install -y --no-install-recommends chromium; } \
		|| echo "make: could not install chromium; for the browser test run: sudo apt-get install chromium"

clean:
	rm -rf runs build *.egg-info src/*.egg-info
