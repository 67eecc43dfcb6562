# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine; pyproject.toml itself declares a range.
TORCH_PIN ?= torch==2.13.0
# Where another machine should take torch from, e.g. --index-url https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.installed

.PHONY: demo test quick-demo table1 bench bench-gpu gpu-session clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vaeuda demo --out demo_out

quick-demo: $(STAMP)
	$(PY) -m vaeuda demo --out demo_quick_out --quick

test: $(STAMP)
	$(PY) -m pytest -q

# e.g. make table1 TABLE1_ARGS="--repeats 3"
TABLE1_ARGS ?=
table1: $(STAMP)
	$(PY) -m vaeuda synth runs/cohort --seed 0
	$(PY) -m vaeuda experiment table1 --data runs/cohort --out runs/table1 --preset cpu $(TABLE1_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_speed.py --out Docs/benchmarks.md

bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py --device cuda --out Docs/benchmarks_gpu.json

# a few minutes on a CUDA GPU, everything at once (benchmarks/gpu_session.sh says what). On a GPU
# machine without a network, skip make (it installs): PYTHON=python3 benchmarks/gpu_session.sh OUT
gpu-session: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu_session.sh runs/gpu_session

clean:
	rm -rf $(VENV) demo_out demo_quick_out runs .pytest_cache
