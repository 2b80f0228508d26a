# `make run` and `make test` create .venv when missing and (re)install only when pyproject or constraints changed.
# CPU machines: torch is pinned through constraints-cpu.txt. A GPU user installs their own torch into .venv first and
# runs `make CONSTRAINTS= run` (see README).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: run test browser perf report clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -qq $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m bench run

# Test files run in parallel, one worker per CPU (at most 2: each worker's torch uses one thread, see tests/conftest.py);
# a file stays on one worker, so its module fixtures (trained models) are built once.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(2, len(os.sched_getaffinity(0)))))")

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

# The HTML leaderboard tests render the page in headless Chromium: Debian's `chromium` package (a browser that downloads
# its own build, like playwright's or puppeteer's, cannot be installed without internet). `make browser` installs it
# when it is absent and can be installed here (apt-get, as root or with passwordless sudo); otherwise it prints one
# line saying why and what to do, and `make test` goes on: those four tests then skip, saying so (under CI=true they
# fail instead). Installing takes about 40 s; when Chromium is present this costs nothing.
NO_APT := this system has no apt-get; install Chromium (\`chromium\` on PATH) to run the HTML leaderboard tests
NO_ROOT := installing it needs root: run \`sudo make browser\` (or sudo apt-get install chromium)
APT_FAILED := \`apt-get install chromium\` failed (output above); the HTML leaderboard tests skip (fail if CI=true)

browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: Chromium is not installed and $(NO_APT)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "make browser: Chromium is not installed and $(NO_ROOT)"; exit 0; fi; \
	echo "make browser: installing Debian's chromium for the HTML leaderboard tests"; \
	if $$sudo apt-get update -qq >/dev/null && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     --no-install-recommends chromium >/dev/null; then :; \
	else echo "make browser: $(APT_FAILED)"; fi

perf: $(STAMP)
	$(VENV)/bin/python -m bench perf

report: $(STAMP)
	$(VENV)/bin/python -m bench report

clean-venv:
	rm -rf $(VENV)
