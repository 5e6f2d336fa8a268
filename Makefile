# Two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test bench clean-demo

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q ninja py-cpuinfo hjson msgpack pydantic psutil packaging
	$(PIP) show deepspeed >/dev/null 2>&1 || $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m itpn_ds.demo $(if $(TEACHER),--teacher-checkpoint $(TEACHER),) --out demo_out

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean-demo:
	rm -rf demo_out
