# `make run` and `make test` create .venv when missing and (re)install only when pyproject or constraints changed.
# CPU machines: torch is pinned through constraints-cpu.txt. A GPU user installs their own torch into .venv first and
# runs `make CONSTRAINTS= run` (see README).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: run test browser slurm perf report clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -qq $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m bench run

# Test files run in parallel, one worker per CPU (at most 2: each worker's torch uses one thread, see tests/conftest.py);
# a file stays on one worker, so its module fixtures (trained models) are built once.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(2, len(os.sched_getaffinity(0)))))")

test: $(STAMP) browser slurm
	$(VENV)/bin/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

# Services the tests start come from Debian packages. `make browser` installs Chromium: the HTML leaderboard tests
# render the page in headless Chromium (a browser that downloads its own build, like playwright's, cannot be installed
# without internet). `make slurm` installs slurm-wlm and munge: the slurm executor's tests start a one-node SLURM
# cluster on 127.0.0.1 and submit through sbatch. Each installs when absent and possible (apt-get, as root or with
# passwordless sudo); otherwise it prints one line saying why and what to do, and `make test` goes on: those tests
# then skip, saying so (under CI=true they fail instead). Installing takes 20-40 s each; when present this costs
# nothing.
# $(call apt_install,TARGET,PACKAGES,TESTS)
define apt_install
if ! command -v apt-get >/dev/null 2>&1; then \
  echo "make $(1): $(2) not installed and this system has no apt-get; install it to run $(3)"; exit 0; fi; \
if [ "$$(id -u)" = 0 ]; then sudo=; \
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
else echo "make $(1): $(2) not installed and installing it needs root: run \`sudo make $(1)\`"; exit 0; fi; \
echo "make $(1): installing Debian's $(2) for $(3)"; \
if $$sudo apt-get update -qq >/dev/null && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
     --no-install-recommends $(2) >/dev/null; then :; \
else echo "make $(1): \`apt-get install $(2)\` failed (output above); $(3) skip (fail if CI=true)"; fi
endef

browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	$(call apt_install,browser,chromium,the HTML leaderboard tests)

slurm:
	@if command -v sbatch >/dev/null 2>&1 && PATH="$$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null 2>&1 \
	   && PATH="$$PATH:/usr/sbin:/sbin" command -v munged >/dev/null 2>&1; then exit 0; fi; \
	$(call apt_install,slurm,slurm-wlm munge,the slurm executor tests)

perf: $(STAMP)
	$(VENV)/bin/python -m bench perf

report: $(STAMP)
	$(VENV)/bin/python -m bench report

clean-venv:
	rm -rf $(VENV)
