# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HUGE_PAGES ?= 160
PYTEST_ARGS ?=

.PHONY: all install test demo bench clean proto

all: install

$(VENV)/.installed: pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,tls,metrics]'
	touch $@

install: $(VENV)/.installed

# Reserves 2 MiB huge pages for the run when root and too few are free, and
# gives back what it added afterwards.
test: install
	$(PY) -m migrate.hugepages --ensure $(HUGE_PAGES) -- $(PY) -m pytest $(PYTEST_ARGS) tests

demo: install
	$(PY) -m migrate demo --size 1G

bench: install
	$(PY) -m migrate bench

proto: install
	PYTHON=$(PY) proto/generate.sh

clean:
	rm -rf build $(VENV) migrate/_native*.so migrate/_native.c native/*.o *.egg-info
