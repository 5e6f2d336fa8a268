# Two commands: `make demo` and `make test`. Both create .venv when missing.
# `make test-fast` is the inner loop (docs/testing.md says which tier holds what).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
OPS    := $(VENV)/.ds_ops_built
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1
# The venv's tools first, as in an activated shell: DeepSpeed's JIT ops are built with the venv's ninja, and a
# build by another ninja (the system's, another version) would not count as built and start over.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Compiled code that belongs to this venv's torch lives in the venv, built or compiled once, kept between runs:
# DeepSpeed's JIT ops (torch_extensions) and Inductor's kernels and graphs (inductor_cache).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TORCHINDUCTOR_CACHE_DIR ?= $(abspath $(VENV))/inductor_cache
# The fast tier: no multi-process runs, no SLURM, no MLflow server, no Inductor compilation, no multi-epoch chain.
FAST_TIER := not dist and not slurm and not mlflow_server and not compile and not chain
# Both tiers run in pytest-xdist workers, one per core; tests/conftest.py schedules the tests by work units
# (a module, or the SLURM modules together) and hands out the heaviest first.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder
# One worker per core, so one intra-op thread per worker and per process it starts, as the ranks already run:
# a second thread finds no free core and its OpenMP spin-waits cost CPU time (docs/testing.md).
test test-fast: export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test test-fast bench clean-demo

venv: $(OPS)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q ninja py-cpuinfo hjson msgpack pydantic psutil packaging
	$(PIP) show deepspeed >/dev/null 2>&1 || $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[test,demo]'
	touch $(STAMP)

# DeepSpeed JIT-builds its CPU ops on first use (the shared-memory all-reduce at every engine start, CPU Adam
# for ZeRO-Offload; about 80 s on 2 cores): built here, once per venv, so no run and no test pays for them.
$(OPS): $(STAMP)
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
	[a().create_op_builder(n).load() for n in ('ShareMemCommBuilder', 'CPUAdamBuilder')]"
	touch $(OPS)

demo: $(OPS)
	$(PY) -m itpn_ds.demo $(if $(TEACHER),--teacher-checkpoint $(TEACHER),) --out demo_out

test: $(OPS)
	$(PY) -m pytest $(XDIST)

test-fast: $(OPS)
	$(PY) -m pytest $(XDIST) -m "$(FAST_TIER)"

bench: $(OPS)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean-demo:
	rm -rf demo_out
