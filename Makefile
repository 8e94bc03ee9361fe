# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv/ at the repo root and install everything once; a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo clean-venv

$(STAMP): pyproject.toml Makefile transfer/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	bash transfer/install_detectron2.sh $(PY)
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/mocobench sweep slurm/specs/demo.yaml

clean-venv:
	rm -rf $(VENV)
