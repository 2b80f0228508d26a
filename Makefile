# `make run` and `make test` create .venv when missing and (re)install only when pyproject or constraints changed.
# CPU machines: torch is pinned through constraints-cpu.txt. A GPU user installs their own torch into .venv first and
# runs `make CONSTRAINTS= run` (see README).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: run test perf report clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -qq $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m bench run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

perf: $(STAMP)
	$(VENV)/bin/python -m bench perf

report: $(STAMP)
	$(VENV)/bin/python -m bench report

clean-venv:
	rm -rf $(VENV)
