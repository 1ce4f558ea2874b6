# PTQ Studio: `make run` starts the GUI, `make test` runs the whole suite headless.
# Works from a fresh clone; as root on Debian/Ubuntu it installs the system libraries Qt needs.

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PIP_INSTALL_FLAGS ?=

# Qt offscreen + QtWebEngine (what the test suite loads).
SYSDEPS_TEST := libegl1 libgl1 libglib2.0-0 libfontconfig1 libfreetype6 fonts-dejavu-core \
	libxkbcommon0 libdbus-1-3 libnss3 libnspr4 libasound2 libgbm1 libdrm2 \
	libx11-6 libx11-xcb1 libxcb1 libxcb-dri3-0 libxcomposite1 libxdamage1 libxext6 \
	libxfixes3 libxrandr2 libxrender1 libxtst6 libxkbfile1
# The xcb platform plugin, for a real (or virtual) X display.
SYSDEPS_RUN := $(SYSDEPS_TEST) libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
	libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 \
	libxkbcommon-x11-0 xvfb xauth

# Chromium (QtWebEngine) refuses to start as root unless its sandbox is off.
TEST_ENV := QT_QPA_PLATFORM=offscreen QTWEBENGINE_CHROMIUM_FLAGS=--no-sandbox
RUN_ENV := $(if $(filter 0,$(shell id -u)),QTWEBENGINE_CHROMIUM_FLAGS=--no-sandbox,)

# Install the packages in $(1) that dpkg does not list: apt-get as root, otherwise print the command.
define ensure_debs
	@missing=""; \
	if command -v dpkg >/dev/null 2>&1; then \
		for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	fi; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing system packages:$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "warning: missing system packages:$$missing (sudo apt-get install$$missing)" >&2; \
		fi; \
	fi
endef

.PHONY: help venv sysdeps sysdeps-test lint test run clean

help:
	@echo "make run    start the PTQ Studio GUI"
	@echo "make test   make lint, then the whole test suite headless"
	@echo "make lint   ruff and the import-linter layering contracts (pyproject.toml)"
	@echo "make venv   create $(VENV) and install ptq-studio[test] (editable)"

venv: $(STAMP)

# Re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@if ! command -v $(PYTHON) >/dev/null 2>&1 || ! $(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv; \
		else \
			echo "error: $(PYTHON) with the venv module is required (sudo apt-get install python3.11 python3.11-venv)" >&2; exit 1; \
		fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(PIP_INSTALL_FLAGS) -e '.[test]'
	@touch $@

sysdeps-test:
	$(call ensure_debs,$(SYSDEPS_TEST))

sysdeps:
	$(call ensure_debs,$(SYSDEPS_RUN))

# The layering is enforced, not described: core never imports app or Qt, quant sits below
# wrappers, wrappers below analysis and export (contracts in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python scripts/check_private_names.py

test: lint sysdeps-test
	PY=$(VENV)/bin/python $(TEST_ENV) bash scripts/run_tests.sh

# Without a display (a bare server, a container) the window opens on a virtual X server instead.
run: venv sysdeps
	@if [ -z "$${DISPLAY}$${WAYLAND_DISPLAY}" ] && [ -z "$${QT_QPA_PLATFORM}" ] && command -v xvfb-run >/dev/null 2>&1; then \
		echo "no display found: starting PTQ Studio under xvfb-run (set DISPLAY to see the window)"; \
		$(RUN_ENV) xvfb-run -a $(VENV)/bin/ptq-studio; \
	else \
		$(RUN_ENV) $(VENV)/bin/ptq-studio; \
	fi

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .import_linter_cache .grimp_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
