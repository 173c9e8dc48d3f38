# Two commands for a newcomer: `make demo` and `make test`. Both install everything first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeft-installed
PROFILE ?= x86-cpu
OUT ?= runs/demo

.PHONY: setup demo test test-all export clean

setup: $(STAMP)

# torch first (the CPU wheel, never a CUDA build), then everything else under the same pins.
# llama-cpp-python compiles llama.cpp (~5 min on 2 cores) the first time; pip caches the wheel.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[train,onnx,gguf,dev]"
	touch $(STAMP)

demo: setup
	@start=$$(date +%s); \
	$(BIN)/edgeft run --recipe recipes/demo.yaml --profile $(PROFILE) --out $(OUT) && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs dist .pytest_cache
