# Every target creates (or reuses) .venv and installs what it needs, so each works from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are released in pairs: keep them pinned together.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# The stamp records what was installed, so a changed pin or pyproject reinstalls.
STAMP := $(VENV)/.resfast-installed

export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0

.PHONY: venv test train bench gpu-check gpu-check-quick lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
	$(PIP) install --quiet $(TORCH_PIN) ninja setuptools wheel
	RESFAST_REQUIRE_EXT=1 RESFAST_FAIL_ON_SPILLS=1 $(PIP) install --no-build-isolation -e ".[dev,train]"
	touch $(STAMP)

venv: $(STAMP)

# The whole suite on CPU; Triton kernels run under the interpreter.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

train: $(STAMP)
	$(PY) -m resfast.train $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(ARGS)

# On a GPU machine (torch already installed there): build, GPU tests, benchmarks; results under $$OUT.
gpu-check:
	OUT=$${OUT:-gpu-out} bash benchmarks/gpu_check.sh

# The same in one call of at most 8 minutes: each step stopped at its time limit, narrow benchmarks.
gpu-check-quick:
	OUT=$${OUT:-gpu-out} GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info resfast/*.so
