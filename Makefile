# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine; pyproject.toml itself declares a range.
TORCH_PIN ?= torch==2.13.0
# Where another machine should take torch from, e.g. --index-url https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.installed

.PHONY: demo test quick-demo table1 bench bench-gpu gpu-session test-minimum test-newest clean

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

# Not part of `make test`: the suite at the release lines of pyproject.toml's lower bounds, on Python 3.9
# (Slicer 5.4-5.8), and on Python 3.12 (Slicer 5.10 and later) with the newest releases; each in a
# virtual environment of its own. Name the interpreters where they are not on the PATH, e.g.
# make test-minimum PYTHON_OLDEST=~/.pyenv/versions/3.9.18/bin/python
PYTHON_OLDEST ?= python3.9
PYTHON_NEWEST ?= python3.12
test-minimum:
	test -x .venv-minimum/bin/python || $(PYTHON_OLDEST) -m venv .venv-minimum
	.venv-minimum/bin/python -m pip install --quiet --upgrade pip
	.venv-minimum/bin/python -m pip install --quiet "$$(grep '^torch==' Testing/minimum-versions.txt)" $(TORCH_PIP_ARGS)
	.venv-minimum/bin/python -m pip install --quiet -r Testing/minimum-versions.txt
	.venv-minimum/bin/python -m pip install --quiet -e ".[test]" -c Testing/minimum-versions.txt
	.venv-minimum/bin/python -m pytest -q -p no:cacheprovider

test-newest:
	test -x .venv-newest/bin/python || $(PYTHON_NEWEST) -m venv .venv-newest
	.venv-newest/bin/python -m pip install --quiet --upgrade pip
	.venv-newest/bin/python -m pip install --quiet "$(TORCH_PIN)" $(TORCH_PIP_ARGS)
	.venv-newest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH_PIN)"
	.venv-newest/bin/python -m pytest -q -p no:cacheprovider

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
	rm -rf $(VENV) .venv-minimum .venv-newest demo_out demo_quick_out runs .pytest_cache
